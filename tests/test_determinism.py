"""DETERMINISTIC: the same command twice gives bit-identical weights and pool states."""

import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest

from dsal_tf.active import run_active_learning
from dsal_tf.config import resolve
from dsal_tf.pool import Pool

from .conftest import tiny_values

pytestmark = pytest.mark.slow


def _state(run):
    weights = keras.models.load_model(run / "round_02" / "best.keras", compile=False).get_weights()
    pool = Pool.load(run / "round_02" / "pool.npz")
    return weights, pool


def _assert_same(a, b):
    (wa, pa), (wb, pb) = a, b
    assert len(wa) == len(wb)
    for x, y in zip(wa, wb):
        assert x.tobytes() == y.tobytes()  # bit for bit, not allclose
    assert np.array_equal(pa.labelled_map, pb.labelled_map)
    assert np.array_equal(pa.pseudo_idx, pb.pseudo_idx)
    assert pa.pseudo_masks.tobytes() == pb.pseudo_masks.tobytes()


def test_two_runs_in_one_process_are_bit_identical(tiny_data, tmp_path):
    # dsal with the diverse selection and augmentation covers every random source of the loop:
    # init, shuffles, augmentation, dropout, the query and the pseudo labels
    values = tiny_values(tiny_data, tmp_path, selection="diverse", augment=True)
    runs = [run_active_learning(resolve({**values, "exp_name": f"det{i}"}), log=lambda m: None) for i in (0, 1)]
    _assert_same(_state(runs[0]), _state(runs[1]))
    scores = [(r / "round_02" / "scores.csv").read_text() for r in runs]
    assert scores[0] == scores[1]


def test_two_processes_give_the_same_weights(tiny_data, tmp_path):
    code = textwrap.dedent(f"""
        from dsal_tf.active import run_active_learning
        from dsal_tf.config import resolve
        from tests.conftest import tiny_values
        import pathlib, sys
        run_active_learning(resolve(tiny_values(pathlib.Path({str(tiny_data)!r}), pathlib.Path({str(tmp_path)!r}),
                                                exp_name=sys.argv[1], nb_iterations=2)), log=lambda m: None)
    """)
    for name in ("p0", "p1"):
        subprocess.run([sys.executable, "-c", code, name], check=True, timeout=600, cwd=Path(__file__).parents[1])
    exp = tmp_path / "exp"
    _assert_same(_state(exp / "p0"), _state(exp / "p1"))
