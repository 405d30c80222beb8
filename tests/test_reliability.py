"""Runs that survive anything: SIGKILL at random moments, a full disk, a NaN loss."""

import errno
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from dsal_tf.active import completed_rounds, run_active_learning
from dsal_tf.cli import cli
from dsal_tf.config import resolve
from dsal_tf.errors import DsalError
from dsal_tf.pool import Pool
from dsal_tf.train import StopOnNaN

from .conftest import tiny_values

ROOT = Path(__file__).resolve().parents[1]


def set_args(values: dict) -> list[str]:
    out = []
    for k, v in values.items():
        out += ["--set", f"{k.upper()}={v}"]
    return out


def digest(run: Path, r: int) -> dict:
    rd = run / f"round_{r:02d}"
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(rd.iterdir()) if f.is_file()}


def test_nan_loss_names_the_round_and_epoch():
    cb = StopOnNaN("round 3")
    cb.on_epoch_begin(1)
    cb.on_train_batch_end(0, {"loss": 0.5})
    with pytest.raises(DsalError, match=r"round 3, epoch 2: the training loss became nan"):
        cb.on_train_batch_end(1, {"loss": float("nan")})
    with pytest.raises(DsalError, match="became inf"):
        cb.on_train_batch_end(2, {"loss": float("inf")})


@pytest.mark.slow
def test_full_disk_is_one_line_and_keeps_complete_rounds(tiny_data, tmp_path, monkeypatch):
    values = tiny_values(tiny_data, tmp_path, exp_name="disk", nb_iterations=1, depth=3)
    real = os.replace

    def full_disk(src, dst, *a, **k):
        if Path(dst).name == "DONE" and "round_01" in str(dst):
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return real(src, dst, *a, **k)

    (tmp_path / "none.py").write_text("")  # an empty constants file: defaults + --set
    monkeypatch.setattr(os, "replace", full_disk)
    result = CliRunner().invoke(cli, ["run", "--constants", str(tmp_path / "none.py"), *set_args(values)])
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1 and "Traceback" not in result.output, result.output
    assert "No space left on device" in errors[0] and "round_01" in errors[0]
    run = resolve(values).run_dir
    assert completed_rounds(run) == [0]
    monkeypatch.setattr(os, "replace", real)
    run_active_learning(resolve(values), log=lambda m: None)  # space again: it goes on
    assert completed_rounds(run) == [0, 1]


@pytest.mark.slow
@pytest.mark.compiled  # the in-process resume is compared bit for bit with the traced shared run
def test_sigkill_at_random_moments_then_resume(tiny_run, tmp_path):
    """`dsal run` SIGKILLed in round 0 (a new run folder: its first files half-written), then again in
    round 2 (a query round with pseudo labels), each at a random moment after the process says it works
    on that round (independent of the machine's speed); then resumed to the end, which must equal the
    uninterrupted shared run bit for bit. Round 1 is a query round like round 2 without pseudo labels, and
    the last resume runs in this process (fresh interpreters are `test_determinism`'s): two interpreters,
    not four."""
    import threading

    import keras

    ref = tiny_run.run_dir
    values = tiny_values(tiny_run.data_path, tmp_path, exp_name="killed")
    (tmp_path / "none.py").write_text("")
    cmd = [sys.executable, "-m", "dsal_tf.cli", "run", "--constants", str(tmp_path / "none.py"), *set_args(values)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1"}
    run = resolve(values).run_dir
    rng = np.random.default_rng(0)
    seen: dict[int, dict] = {}

    def completed_rounds_unchanged():
        for r in completed_rounds(run):  # a completed round never changes afterwards
            seen.setdefault(r, digest(run, r))
            assert digest(run, r) == seen[r], f"round {r} changed after a resume"

    for target, delay in ((0, rng.uniform(0.5, 3.0)), (2, rng.uniform(0.0, 1.0))):
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        lines: list[str] = []
        reader = threading.Thread(target=lambda p=proc, out=lines: out.extend(p.stdout), daemon=True)
        reader.start()
        said_at = None
        deadline = time.monotonic() + 600
        while proc.poll() is None and time.monotonic() < deadline:
            if said_at is None and any(x.startswith(f"round {target}") for x in list(lines)):
                said_at = time.monotonic()
            if said_at is not None and time.monotonic() - said_at >= delay:
                break
            time.sleep(0.05)
        alive = proc.poll() is None
        if alive:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        reader.join(timeout=10)
        assert alive, f"the run ended (exit code {proc.returncode}) before round {target} could be interrupted:\n" \
                      + "".join(lines)
        completed_rounds_unchanged()
    assert completed_rounds(run) == [0, 1]  # killed in round 2
    logs: list[str] = []
    run_active_learning(resolve(values), log=logs.append)
    assert any("resuming" in m for m in logs)
    completed_rounds_unchanged()
    assert completed_rounds(run) == [0, 1, 2]
    for r in range(3):
        a, b = Pool.load(ref / f"round_{r:02d}" / "pool.npz"), Pool.load(run / f"round_{r:02d}" / "pool.npz")
        assert np.array_equal(a.labelled_map, b.labelled_map), f"round {r}"
        assert np.array_equal(a.pseudo_idx, b.pseudo_idx), f"round {r}"
        wa, wb = (keras.models.load_model(d / f"round_{r:02d}" / "best.keras", compile=False).get_weights()
                  for d in (ref, run))
        assert all(x.tobytes() == y.tobytes() for x, y in zip(wa, wb)), f"round {r}: other weights"
    assert len(Pool.load(run / "round_02" / "pool.npz").pseudo_idx) == 3  # the pseudo labels were compared too


@pytest.mark.slow
def test_sharded_scoring_merges_to_the_single_pass(tiny_run, tmp_path):
    from dsal_tf.active import score_shard, shard_positions

    from .conftest import copy_run

    assert [len(shard_positions(20, i, 3, 4)) for i in range(3)] == [8, 8, 4]  # whole batches of 4
    assert np.array_equal(np.concatenate([shard_positions(21, i, 2, 8) for i in range(2)]), np.arange(21))
    # the shared run's round 0, alone (as after a run with NB_ITERATIONS = 0); the reference is its round 1
    cfg = copy_run(tiny_run, tmp_path, keep_rounds=1, exp_name="shards", nb_iterations=1)
    assert completed_rounds(cfg.run_dir) == [0]
    for i in (1, 0):  # any order, any process
        score_shard(cfg, 1, i, 2, log=lambda m: None)
    logs = []
    run = run_active_learning(cfg, log=logs.append)
    assert any("merged 2 score parts" in m for m in logs)
    a, b = (Pool.load(d / "round_01" / "pool.npz") for d in (tiny_run.run_dir, run))
    assert np.array_equal(a.labelled_map, b.labelled_map)
    with pytest.raises(DsalError, match="already chosen"):
        score_shard(cfg, 1, 0, 2, log=lambda m: None)
