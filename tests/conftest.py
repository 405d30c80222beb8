"""Shared fixtures: a tiny synthetic dataset on disk and a tiny configuration over it."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest  # noqa: E402

from dsal_tf.config import resolve  # noqa: E402
from dsal_tf.synthetic import make_synthetic  # noqa: E402


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
    )
    return {**values, **extra}


@pytest.fixture
def tiny_cfg(tiny_data, tmp_path):
    return resolve(tiny_values(tiny_data, tmp_path))
