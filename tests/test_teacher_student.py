"""The noisy-teacher workflow and the weighting trainers inside the active-learning loop."""

import json

import keras
import numpy as np
import pandas as pd
import pytest

from dsal_tf.active import run_active_learning
from dsal_tf.config import resolve
from dsal_tf.data import Normalizer, load_splits
from dsal_tf.errors import DsalError
from dsal_tf.evaluate import evaluate_model, summarize
from dsal_tf.teacher_student import VARIANTS, _train_once, run_noisy_teacher, student_config
from dsal_tf.trainers import get_trainer

from .conftest import tiny_values


@pytest.mark.parametrize("reweight_loss, expected", [("bce_dice", "bce_dice"), ("run", "dice"), ("bce", "bce")])
def test_every_student_trains_on_the_noisy_teacher_loss(reweight_loss, expected):
    """`equal` compiles the U-Net with `LOSS`, the paired trainers take `loss_for`: both say BCE + Dice
    by default although the run's LOSS is Dice."""
    cfg = resolve({"loss": "dice", "reweight_loss": reweight_loss})
    for variant in VARIANTS:
        if VARIANTS[variant] is None:  # the teacher keeps LOSS
            continue
        vcfg = student_config(cfg, variant)
        assert vcfg.loss == expected, variant
        trainer = get_trainer(vcfg.trainer)
        if hasattr(trainer, "loss_for"):
            assert trainer.loss_for(vcfg) == expected, variant


def test_a_finished_student_with_another_loss_is_not_reused(tmp_path):
    calls = []
    _train_once(tmp_path / "a", lambda: calls.append(1), "bce_dice", "dice")
    assert (tmp_path / "a" / "DONE").read_text() == "bce_dice"
    _train_once(tmp_path / "a", lambda: calls.append(1), "bce_dice", "dice")  # resumed: not trained again
    assert calls == [1]
    with pytest.raises(DsalError, match="delete that folder"):
        _train_once(tmp_path / "a", lambda: calls.append(1), "dice", "dice")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "DONE").write_text("ok")  # before the loss was recorded: every model used LOSS
    _train_once(tmp_path / "old", lambda: calls.append(1), "dice", "dice")
    with pytest.raises(DsalError, match="'dice'"):
        _train_once(tmp_path / "old", lambda: calls.append(1), "bce_dice", "dice")
    assert calls == [1]


@pytest.mark.slow
def test_noisy_teacher_workflow_resumes(tiny_data, tmp_path):
    cfg = resolve(tiny_values(tiny_data, tmp_path, depth=3))
    # `equal` (a plain fit, ~6 s more) is left out: its config is checked above, the workflow is the same
    variants = ["teacher", "uniform", "rgsm+al"]
    summary = run_noisy_teacher(cfg, 8, variants, [0], "nt", log=lambda m: None)
    assert list(summary["variant"]) == variants
    assert list(summary["loss"]) == [cfg.loss] + ["bce_dice"] * 2  # the teacher keeps LOSS (dice)
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


@pytest.fixture(scope="session")  # session: built once per (xdist) process
def plain_round_0(tiny_data, tmp_path_factory):
    """One finished round 0 (the standard trainer: no pseudo labels yet) that the weighting trainers'
    runs start from, as the strategies of `dsal compare` share theirs."""
    cfg = resolve(tiny_values(tiny_data, tmp_path_factory.mktemp("init"), nb_iterations=0, depth=3))
    return run_active_learning(cfg, log=lambda m: None) / "round_00"


@pytest.mark.slow
@pytest.mark.parametrize("trainer, extra", [("rgs", {"rgs_query": True}), ("mwnet", {"meta_size": 4})])
def test_dsal_with_weighted_pseudo_labels(plain_round_0, tiny_data, tmp_path, trainer, extra):
    """Round 1, the first with pseudo labels, trains with the weighting trainer (from a shared round 0)."""
    cfg = resolve(tiny_values(tiny_data, tmp_path, trainer=trainer, nb_iterations=1, pseudo_epoch=1,
                              depth=3, **extra))
    run = run_active_learning(cfg, log=lambda m: None, initial_model=plain_round_0)
    history = pd.read_csv(run / "round_01" / "history.csv")
    assert {"kept_fraction", "mean_weight", "clean_loss", "val_main_dice"} <= set(history.columns)  # it ran
    assert json.loads((run / "config.json").read_text())["trainer"] == trainer
    assert len(pd.read_csv(run / "learning_curve.csv")) == 2 and history["mean_weight"].notna().all()
    model = keras.models.load_model(run / "round_01" / "best.keras", compile=False)
    assert set(model.output_names) == {"main", "side_1", "side_2"}  # checkpoints stay plain U-Nets


def test_student_differences_are_paired_against_uniform(tmp_path):
    from dsal_tf.teacher_student import student_differences

    for seed, (u, r) in enumerate((([0.5, 0.7], [0.6, 0.9]), ([0.4, 0.4], [0.5, 0.6]))):
        for variant, d in (("uniform", u), ("rgs", r)):
            (tmp_path / f"s{seed}" / variant).mkdir(parents=True)
            pd.DataFrame({"name": ["b", "a"], "dice": d}).to_csv(tmp_path / f"s{seed}" / variant / "test_metrics.csv",
                                                              index=False)
    out = student_differences(tmp_path, ["uniform", "rgs"], [0, 1]).set_index("seeds")
    assert out.loc["0", "diff"] == pytest.approx(0.15) and out.loc["1", "diff"] == pytest.approx(0.15)
    assert out.loc["all", "diff"] == pytest.approx(0.15) and set(out["baseline"]) == {"uniform"}
