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

pytestmark = [pytest.mark.slow, pytest.mark.compiled]  # the product's traced graphs


def _state(run, r=2):
    weights = keras.models.load_model(run / f"round_{r:02d}" / "best.keras", compile=False).get_weights()
    pool = Pool.load(run / f"round_{r:02d}" / "pool.npz")
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
    # init, shuffles, augmentation, dropout, the query and the pseudo labels (all in round 1 here)
    values = tiny_values(tiny_data, tmp_path, selection="diverse", augment=True, depth=3, nb_iterations=1,
                         pseudo_epoch=1)
    runs = [run_active_learning(resolve({**values, "exp_name": f"det{i}"}), log=lambda m: None) for i in (0, 1)]
    _assert_same(_state(runs[0], 1), _state(runs[1], 1))
    assert len(_state(runs[0], 1)[1].pseudo_idx) == 3  # the pseudo labels were compared too
    scores = [(r / "round_01" / "scores.csv").read_text() for r in runs]
    assert scores[0] == scores[1]


def test_two_processes_give_the_same_weights(tiny_run, tmp_path):
    """A fresh interpreter gives what this one gave (the shared run, trained in this process)."""
    tiny_data = tiny_run.data_path
    code = textwrap.dedent(f"""
        from dsal_tf.active import run_active_learning
        from dsal_tf.config import resolve
        from tests.conftest import tiny_values
        import pathlib, sys
        run_active_learning(resolve(tiny_values(pathlib.Path({str(tiny_data)!r}), pathlib.Path({str(tmp_path)!r}),
                                                exp_name=sys.argv[1], nb_iterations=2)), log=lambda m: None)
    """)
    subprocess.run([sys.executable, "-c", code, "p0"], check=True, timeout=600, cwd=Path(__file__).parents[1])
    _assert_same(_state(tmp_path / "exp" / "p0"), _state(tiny_run.run_dir))
