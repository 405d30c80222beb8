"""A run folder written by an earlier dsal-tf (before the components refactor) resumes with today's code."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from dsal_tf.active import run_active_learning
from dsal_tf.pool import Pool
from dsal_tf.run import Run

FIXTURE = Path(__file__).parent / "fixtures" / "old_run"


@pytest.mark.slow
def test_a_run_saved_before_the_refactor_resumes(tiny_data, tmp_path):
    data = tiny_data  # the data the fixture was made on: make_synthetic(counts=(24, 8, 8), size=48, seed=3)
    run = Run(tmp_path / "exp" / "old-run")
    shutil.copytree(FIXTURE, run.path)
    old = json.loads(run.config_file.read_text())
    assert "mc_passes" in old and "settings" not in old  # the flat, 84-field config.json of before
    cfg = run.saved_config().replace(data_path=str(data), exp_dir=str(tmp_path / "exp"), nb_iterations=2)
    before = {p: p.read_bytes() for p in run.round_dir(1).rglob("*") if p.is_file()}
    run_active_learning(cfg, log=lambda m: None)
    assert run.completed() == [0, 1, 2]
    assert all(p.read_bytes() == b for p, b in before.items())  # the old rounds are untouched
    pool = Pool.load(run.pool_file(2))
    assert len(pool.labelled) == 12 + 4 and np.all(pool.labelled_map[Pool.load(run.pool_file(1)).labelled] > 0)
    assert len(pool.pseudo_idx) == 3 + 1  # PSEUDO_EPOCH = 1: 3, then PSEUDO_RATE = 1 more
    new = json.loads(run.config_file.read_text())
    assert new["mc_passes"] == old["mc_passes"] or "mc_passes" not in new  # unused by DSAL: may be dropped
    assert new["ds_ascend"] is True and new["data_path"] == str(data)
