"""The noisy-teacher workflow and the weighting trainers inside the active-learning loop."""

import json

import keras
import numpy as np
import pandas as pd
import pytest

from dsal_tf.active import run_active_learning
from dsal_tf.config import resolve
from dsal_tf.data import Normalizer, load_splits
from dsal_tf.evaluate import evaluate_model, summarize
from dsal_tf.teacher_student import run_noisy_teacher

from .conftest import tiny_values

pytestmark = pytest.mark.slow


def test_noisy_teacher_workflow_resumes(tiny_data, tmp_path):
    cfg = resolve(tiny_values(tiny_data, tmp_path))
    variants = ["teacher", "equal", "uniform", "rgsm+al"]
    summary = run_noisy_teacher(cfg, 8, variants, [0], "nt", log=lambda m: None)
    assert list(summary["variant"]) == variants
    out = tmp_path / "exp" / "nt" / "s0"
    # the table is the saved checkpoints' test scores: re-evaluate two of them independently
    splits = load_splits(cfg)
    normalizer = Normalizer.fit(splits["train"].images, cfg.normalization)
    for variant in ("teacher", "uniform"):
        model = keras.models.load_model(out / variant / "best.keras", compile=False)
        per_image, _ = evaluate_model(model, splits["test"], normalizer, cfg.batch_size)
        row = summary.set_index("variant").loc[variant]
        assert row["dice_mean"] == pytest.approx(summarize(per_image)["dice_mean"], abs=1e-4)
    history = pd.read_csv(out / "uniform" / "history.csv")  # the control went through the paired trainer
    assert np.allclose(history["kept_fraction"], 1.0) and np.allclose(history["mean_weight"], 1 / cfg.batch_size)
    stamp = (out / "rgsm+al" / "best.keras").stat().st_mtime_ns
    again = run_noisy_teacher(cfg, 8, variants, [0], "nt", log=lambda m: None)
    assert (out / "rgsm+al" / "best.keras").stat().st_mtime_ns == stamp  # finished students are kept
    pd.testing.assert_frame_equal(summary, again)


@pytest.mark.parametrize("trainer, extra", [("rgs", {"rgs_query": True}), ("mwnet", {"meta_size": 4})])
def test_dsal_with_weighted_pseudo_labels(tiny_data, tmp_path, trainer, extra):
    cfg = resolve(tiny_values(tiny_data, tmp_path, trainer=trainer, nb_iterations=1, pseudo_epoch=1, **extra))
    run = run_active_learning(cfg, log=lambda m: None)
    history = pd.read_csv(run / "round_01" / "history.csv")
    assert {"kept_fraction", "mean_weight", "clean_loss", "val_main_dice"} <= set(history.columns)  # it ran
    assert json.loads((run / "config.json").read_text())["trainer"] == trainer
    model = keras.models.load_model(run / "round_01" / "best.keras", compile=False)
    assert set(model.output_names) == {"main", "side_1", "side_2"}  # checkpoints stay plain U-Nets
