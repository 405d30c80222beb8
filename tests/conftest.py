"""Shared fixtures: a tiny synthetic dataset on disk, a tiny configuration over it, and one finished tiny run
that the slow tests which only read a run share (train it once per session instead of once per test).

Under pytest-xdist (pytest.ini: two workers) a session fixture runs once per worker that needs it. A fresh
model costs about 5 s of tracing, a fresh interpreter 4 s of imports: share runs, and resume copies of them
(`copy_run`), rather than train new ones."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest.ini runs two pytest-xdist workers on the two cores: one TensorFlow thread per pool in each
    # (set before TensorFlow starts; 7% faster than a pool per core in each worker). The interpreters a
    # test starts inherit it, so runs compared across processes are made under the same settings.
    os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")
    os.environ.setdefault("TF_NUM_INTEROP_THREADS", "1")

import pytest  # noqa: E402

from dsal_tf.config import resolve  # noqa: E402
from dsal_tf.synthetic import make_synthetic  # noqa: E402


@pytest.fixture(autouse=True)
def _same_start_for_every_test():
    """Every test starts from the same process-wide state, whatever ran before it in this process
    (pytest-xdist hands tests to its workers by timing, so that differs from run to run): the same global
    seeds (Python, NumPy, TensorFlow, Keras), so a model built without a seed is the same in every run;
    and Keras's float32 policy, as a fresh process has (a run sets the process-wide policy from
    MIXED_PRECISION, bf16 by default on a CPU with AVX512-BF16, and leaves it set)."""
    import keras

    keras.utils.set_random_seed(0)
    yield
    keras.mixed_precision.set_global_policy("float32")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("orgData")
    make_synthetic(root, counts=(24, 8, 8), size=48, seed=3)
    return root


def tiny_values(data_path, tmp_path, **extra) -> dict:
    values = dict(
        data_path=str(data_path), exp_dir=str(tmp_path / "exp"), exp_name="tiny",
        img_rows=32, img_cols=32, base_filters=2, depth=4, batch_size=8,
        nb_labeled=8, nb_iterations=2, nb_next_sample=4, pseudo_epoch=2, nb_pseudo_initial=3,
        pseudo_rate=1, nb_initial_epochs=1, nb_active_epochs=1, progress=False, nb_overlays=2,
        # fp32: the tests recompute scores eagerly and compare at 1e-5, which bf16 (the default since issue
        # 24, where the CPU has it) does not meet between a traced and an eager pass; tests/test_speed.py
        # runs the loop in bf16 for determinism and resume
        mixed_precision="off",
    )
    return {**values, **extra}


@pytest.fixture
def tiny_cfg(tiny_data, tmp_path):
    return resolve(tiny_values(tiny_data, tmp_path))


def _digest(folder) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def tiny_run(tiny_data, tmp_path_factory):
    """The config of one finished default tiny run (rounds 0, 1, 2), trained once per session.

    Read-only: a test that changes a run works on `copy_run(tiny_run, tmp_path)`. The session checks at
    its end that no test changed a file of it."""
    from dsal_tf.active import run_active_learning

    cfg = resolve(tiny_values(tiny_data, tmp_path_factory.mktemp("shared")))
    run_active_learning(cfg, log=lambda m: None)
    before = _digest(cfg.run_dir)
    yield cfg
    assert _digest(cfg.run_dir) == before, "a test changed the shared tiny run; copy it with copy_run first"


def copy_run(cfg, tmp_path, keep_rounds=None, **changes):
    """A private copy of a finished run at `tmp_path/exp/<name>` (EXP_DIR may change on resume); with
    `keep_rounds`, only rounds below it are kept, as if the run had been started with fewer rounds."""
    new = cfg.replace(exp_dir=str(tmp_path / "exp"), **changes)
    ignore = None
    if keep_rounds is not None:
        ignore = shutil.ignore_patterns(*(f"round_{r:02d}" for r in range(keep_rounds, 100)))
    shutil.copytree(cfg.run_dir, new.run_dir, ignore=ignore)
    saved = new.run_dir / "config.json"  # what a resume with the new settings would record
    saved.write_text(json.dumps({**json.loads(saved.read_text()), "exp_dir": new.exp_dir, **changes}, indent=2,
                                sort_keys=True))
    if keep_rounds is not None:
        curve = new.run_dir / "learning_curve.csv"
        lines = curve.read_text().splitlines(keepends=True)
        curve.write_text("".join([lines[0], *(x for x in lines[1:] if int(x.split(",")[0]) < keep_rounds)]))
    return new

