"""Trainers receive the unlabelled pool: `train.FitJob.unlabelled`, read lazily as a stream."""

import numpy as np
import pytest

from dsal_tf.config import resolve
from dsal_tf.data import Normalizer, Rows
from dsal_tf.space import space_for
from dsal_tf.trainers import TRAINERS
from dsal_tf.trainers.base import fit_plain

from .conftest import tiny_values


def test_the_unlabelled_stream_gives_normalised_images_of_the_pool_rows(tmp_path):
    cfg = resolve({"img_rows": 16, "img_cols": 16, "batch_size": 4, "augment": False})
    pool = np.random.default_rng(0).integers(0, 255, (10, 16, 16, 3), dtype=np.uint8)
    norm = Normalizer.fit(pool, "zscore")
    rows = Rows(np.lib.format.open_memmap(tmp_path / "p.npy", "w+", np.uint8, pool.shape), np.array([1, 4, 7]))
    rows.array[:] = pool
    seen = []
    for x in space_for(cfg).image_stream(rows, norm, seed=0, repeat=False):
        seen.append(x.numpy())
    got = np.concatenate(seen)
    assert got.shape == (3, 16, 16, 3) and got.dtype == np.float32
    want = norm.numpy(pool[[1, 4, 7]])
    # shuffled: each unlabelled row exactly once, normalised like training images
    assert sorted(map(float, got.sum(axis=(1, 2, 3)))) == pytest.approx(sorted(map(float, want.sum(axis=(1, 2, 3)))),
                                                                        rel=1e-5)


@pytest.mark.slow
def test_a_trainer_sees_the_rounds_unlabelled_pool(tiny_data, tmp_path):
    """A registered trainer gets the pool images not yet labelled, every round, and can read them."""
    from dsal_tf.active import run_active_learning
    from dsal_tf.pool import Pool
    from dsal_tf.run import Run

    seen = []

    class Probe:
        name = "probe"

        @classmethod
        def fit_job(cls, job):
            stream = job.unlabelled_stream(seed=job.seed)
            batch = next(iter(stream))
            seen.append((len(job.unlabelled), tuple(batch.shape), job.unlabelled.index.copy()))
            return fit_plain(job)

    TRAINERS["probe"] = Probe
    try:
        cfg = resolve(tiny_values(tiny_data, tmp_path, trainer="probe", nb_iterations=1))
        run_active_learning(cfg, log=lambda m: None)
    finally:
        del TRAINERS["probe"]
    run = Run(cfg.run_dir)
    assert [n for n, _, _ in seen] == [24 - 8, 24 - 8 - 4]  # round 0, then after 4 oracle labels
    assert seen[0][1] == (8, 32, 32, 3)
    assert np.array_equal(seen[1][2], Pool.load(run.pool_file(1)).unlabelled)
