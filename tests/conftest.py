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

# Tests run their tf.functions eagerly (Keras's train, test and predict steps, the traced scoring and
# inference), except those marked `compiled`: a tiny model's step costs 4-5 s to trace and a few
# milliseconds to run, so tracing was most of the suite (8 min 14 s traced, 4 min 7 s eager, warm,
# bench/results/speed.md). The compiled tier runs the product's graphs as a run does: determinism and
# bit-for-bit resume, bf16, every trainer's step, volume inference, predict, the planner's timings. Every
# test that starts `python main.py`, `dsal` or `test.py` in a subprocess runs them compiled too.
# DSAL_TEST_COMPILED=1 runs the whole suite compiled. tf.data functions are always traced.
EAGER = os.environ.get("DSAL_TEST_COMPILED", "") in ("", "0")


@pytest.fixture(scope="session", autouse=True)
def _eager_from_the_start():
    """Before the first session fixture (a trained tiny run) is made: autouse fixtures come first in a scope."""
    import tensorflow as tf

    tf.config.run_functions_eagerly(EAGER)


@pytest.fixture(autouse=True)
def _graphs_only_where_marked(request):
    import tensorflow as tf

    compiled = not EAGER or request.node.get_closest_marker("compiled") is not None
    tf.config.run_functions_eagerly(not compiled)
    yield
    tf.config.run_functions_eagerly(EAGER)  # session fixtures made between tests run eagerly too


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
    import tensorflow as tf

    from dsal_tf.active import run_active_learning

    cfg = resolve(tiny_values(tiny_data, tmp_path_factory.mktemp("shared")))
    tf.config.run_functions_eagerly(False)  # traced, as a run is: the determinism tests compare fresh
    try:  # interpreters (which trace) with it bit for bit
        run_active_learning(cfg, log=lambda m: None)
    finally:
        tf.config.run_functions_eagerly(EAGER)
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



# The longest tests (seconds of one worker in the two-worker suite, `--durations`), by node id or id prefix.
# pytest-xdist's worksteal gives each worker one half of the collection in order and lets an idle worker
# steal the tail of the other's queue: a long test late in a half makes the other worker wait for it at the
# end. Started first instead (longest first, each to the half with less such work so far), the halves end
# together and the tails that move are short tests. A `.py` entry is one unit: its tests share a fixture
# built once per worker (keep them in one worker), its cost is the whole module's; any other entry's cost is
# each matching test's. Approximate costs are enough; unknown tests keep their place after these.
LONG_TESTS = {  # measured 2026-12-05, eager suite with its compiled tier
    "tests/test_serve.py::test_label_studio_end_to_end": 80,
    "tests/test_plan.py::test_preset_auto_plans_once_and_stores_the_plan": 24,
    "tests/test_reliability.py::test_sigkill_at_random_moments_then_resume": 24,
    "tests/test_volume_space.py::test_a_volume_round_killed_after_its_pseudo_labels_resumes_bit_for_bit": 20,
    "tests/test_devices.py": 20,
    "tests/test_speed.py::test_bf16_loop_is_deterministic_and_resumes_bit_for_bit": 17,
    "tests/test_determinism.py::test_two_processes_give_the_same_weights": 16,
    "tests/test_plan.py::test_plan_cli_measures_and_writes_a_usable_constants_file": 14,
    "tests/test_determinism.py::test_two_runs_in_one_process_are_bit_identical": 12,
    "tests/test_plan.py::test_plan_takes_the_next_recipe_when_the_planned_loss_collapses": 10,
    "tests/test_cli.py::test_a_fresh_main_py_prints_no_tensorflow_banner": 10,
    "tests/test_teacher_student.py::test_noisy_teacher_workflow_resumes": 10,
    "tests/test_volume_trainers.py::test_every_trainer_takes_steps_on_volumes": 7,
    "tests/test_compare.py::test_tiny_comparison_shares_the_initial_model": 8,
    "tests/test_plan_volumes.py::test_dsal_plan_on_volumes_writes_a_plan_the_run_accepts": 7,
}


def _long_test_cost(nodeid: str) -> tuple[str, float] | None:
    for key, cost in LONG_TESTS.items():
        if nodeid == key or nodeid.startswith(key + "[") or (key.endswith(".py") and nodeid.startswith(key + "::")):
            return key, cost
    return None


@pytest.hookimpl(trylast=True)  # after -k / -m deselection: the halves are those of the items that run
def pytest_collection_modifyitems(config, items):
    """Long tests first in each xdist half (see LONG_TESTS); every worker computes the same order."""
    units: dict[str, list] = {}
    costs: dict[str, float] = {}
    for item in items:
        found = _long_test_cost(item.nodeid)
        if found is None:
            continue
        key, cost = found
        unit = key if key.endswith(".py") else item.nodeid
        units.setdefault(unit, []).append(item)
        costs[unit] = cost
    if not units:
        return
    heads: list[list] = [[], []]
    load = [0.0, 0.0]
    for unit in sorted(units, key=lambda u: -costs[u]):  # stable: ties keep the collection order
        side = 0 if load[0] <= load[1] else 1
        heads[side] += units[unit]
        load[side] += costs[unit]
    moved = {id(item) for head in heads for item in head}
    rest = [item for item in items if id(item) not in moved]
    fill = max(0, len(items) // 2 - len(heads[0]))
    items[:] = heads[0] + rest[:fill] + heads[1] + rest[fill:]

