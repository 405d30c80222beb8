"""The noisy-teacher workflow and the re-weighting trainer inside the active-learning loop."""

import pandas as pd
import pytest

from dsal_tf.active import run_active_learning
from dsal_tf.config import resolve
from dsal_tf.teacher_student import run_noisy_teacher

from .conftest import tiny_values

pytestmark = pytest.mark.slow


def test_noisy_teacher_workflow_resumes(tiny_data, tmp_path):
    cfg = resolve(tiny_values(tiny_data, tmp_path))
    summary = run_noisy_teacher(cfg, 8, ["teacher", "equal", "rgsm+al"], [0], "nt", log=lambda m: None)
    assert list(summary["variant"]) == ["teacher", "equal", "rgsm+al"]
    assert summary["dice_mean"].between(0, 1).all()
    out = tmp_path / "exp" / "nt" / "s0"
    stamp = (out / "rgsm+al" / "best.keras").stat().st_mtime_ns
    again = run_noisy_teacher(cfg, 8, ["teacher", "equal", "rgsm+al"], [0], "nt", log=lambda m: None)
    assert (out / "rgsm+al" / "best.keras").stat().st_mtime_ns == stamp  # finished students are kept
    pd.testing.assert_frame_equal(summary, again)


def test_dsal_with_trust_reweighted_pseudo_labels(tiny_data, tmp_path):
    cfg = resolve(tiny_values(tiny_data, tmp_path, trainer="rgs", rgs_query=True, nb_iterations=1, pseudo_epoch=1))
    run = run_active_learning(cfg, log=lambda m: None)
    history = pd.read_csv(run / "round_01" / "history.csv")
    assert {"kept_fraction", "mean_weight", "val_main_dice"} <= set(history.columns)  # the re-weighting trainer ran
    import keras

    model = keras.models.load_model(run / "round_01" / "best.keras", compile=False)
    assert set(model.output_names) == {"main", "side_1", "side_2"}  # checkpoints stay plain U-Nets
