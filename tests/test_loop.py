"""The whole loop on tiny synthetic data: real files, real Keras models, real checkpoints."""

import json

import numpy as np
import pandas as pd
import pytest

from dsal_tf.active import completed_rounds, run_active_learning
from dsal_tf.config import resolve
from dsal_tf.errors import DsalError
from dsal_tf.evaluate import evaluate_run
from dsal_tf.pool import Pool

from .conftest import copy_run, tiny_values

pytestmark = pytest.mark.slow


def test_two_rounds_end_to_end_then_resume_and_evaluate(tiny_run, tmp_path):
    # the shared run is `tiny_cfg`'s run; this test interrupts, resumes and extends a copy of it
    tiny_cfg = copy_run(tiny_run, tmp_path)
    run = tiny_cfg.run_dir
    logs = []
    assert completed_rounds(run) == [0, 1, 2]
    curve = pd.read_csv(run / "learning_curve.csv")
    assert list(curve["n_oracle"]) == [8, 12, 16]
    assert list(curve["n_pseudo"]) == [0, 0, 3]  # pseudo labels from round PSEUDO_EPOCH = 2
    assert json.loads((run / "config.json").read_text())["nb_labeled"] == 8
    scores = pd.read_csv(run / "round_02" / "scores.csv")
    assert len(scores) == 24 - 12  # every unlabelled image was scored
    assert (scores["chosen"] == "oracle").sum() == 4 and (scores["chosen"] == "pseudo").sum() == 3
    _check_scores_against_the_round_1_model(tiny_cfg, run, scores)
    # the oracle took the least-agreeing images
    oracle = scores[scores["chosen"] == "oracle"]["agreement"]
    assert oracle.max() <= scores[scores["chosen"] != "oracle"]["agreement"].min()
    pool = Pool.load(run / "round_02" / "pool.npz")
    assert sorted(np.bincount(pool.labelled_map)[1:]) == [4, 4, 8]
    assert set(pool.pseudo_idx) == set(scores[scores["chosen"] == "pseudo"]["index"])

    # interrupted during round 2's training: its decisions are kept and reused; the resumed run is
    # also a longer one (NB_ITERATIONS may change on resume: one model load and trace less than two calls)
    (run / "round_02" / "DONE").unlink()
    (run / "round_02" / "best.keras").unlink()
    before = (run / "round_01" / "best.keras").stat().st_mtime_ns
    logs.clear()
    phases = []  # round 2 reuses its selection and trains; round 3 scores, then trains (dsal serve's states)
    run_active_learning(tiny_cfg.replace(nb_iterations=3), log=logs.append, on_phase=phases.append)
    assert phases == ["training", "scoring", "training"]
    assert any("resuming" in m for m in logs) and any("reusing the saved selection" in m for m in logs)
    assert completed_rounds(run) == [0, 1, 2, 3]
    logs.clear()
    run_active_learning(tiny_cfg.replace(nb_iterations=3), log=logs.append)
    assert any("already complete" in m for m in logs)
    assert (run / "round_01" / "best.keras").stat().st_mtime_ns == before  # finished rounds untouched
    again = Pool.load(run / "round_02" / "pool.npz")
    assert np.array_equal(again.labelled_map, pool.labelled_map)
    assert np.array_equal(again.pseudo_idx, pool.pseudo_idx)

    table = evaluate_run(tiny_cfg, log=logs.append)
    assert list(table["round"]) == [0, 1, 2, 3]
    for r, row in table.set_index("round").iterrows():  # the table is the mean of the per-image files
        per_image = pd.read_csv(run / f"round_{r:02d}" / "test_metrics.csv")
        assert row["dice_mean"] == pytest.approx(per_image["dice"].mean(), abs=1e-4)
        assert row["n_undefined"] == per_image["hd95"].isna().sum()
        if per_image["hd95"].notna().any():
            assert row["hd95_mean"] == pytest.approx(per_image["hd95"].mean(skipna=True), abs=1e-4)
    per_image = pd.read_csv(run / "round_03" / "test_metrics.csv")
    assert len(per_image) == 8 and set(per_image.columns) >= {"dice", "iou", "hd95", "asd"}
    assert (run / "learning_curve.png").stat().st_size > 0
    assert (run / "overlays" / "round_03.png").is_file()

    # changing a setting that shapes the run is refused, and nothing is touched
    with pytest.raises(DsalError, match="NB_LABELED"):
        run_active_learning(tiny_cfg.replace(nb_labeled=9), log=logs.append)
    assert completed_rounds(run) == [0, 1, 2, 3]


def _check_scores_against_the_round_1_model(cfg, run, scores):
    """Round 2 scored the pool with round 1's best model: recompute agreement and true Dice."""
    import keras

    from dsal_tf.data import Normalizer, load_split
    from dsal_tf.strategies.base import binary_dice
    from dsal_tf.strategies.dsal import agreement

    model = keras.models.load_model(run / "round_01" / "best.keras", compile=False)
    pool = load_split(cfg, "train")
    idx = scores["index"].to_numpy()
    x = Normalizer.load(run / "normalizer.json").numpy(pool.images[idx])
    out = model(x, training=False)
    want = agreement(out["main"], out["side_1"], out["side_2"]).numpy()
    np.testing.assert_allclose(scores["agreement"], want, atol=1e-5)
    np.testing.assert_allclose(scores["uncertainty"], 1.0 - want, atol=1e-5)
    true = binary_dice(pool.masks[idx] > 0.5, out["main"] > 0.5).numpy()
    np.testing.assert_allclose(scores["true_dice"], true, atol=1e-5)


def test_random_strategy_with_random_pseudo_and_too_few_images(tiny_data, tmp_path):
    cfg = resolve(tiny_values(tiny_data, tmp_path, query_strategy="random", pseudo_policy="random",
                              nb_iterations=1, pseudo_epoch=1, depth=3))
    run = run_active_learning(cfg, log=lambda m: None)
    scores = pd.read_csv(run / "round_01" / "scores.csv")
    assert (scores["chosen"] == "pseudo").sum() == 3
    with pytest.raises(DsalError, match="NB_LABELED = 99 .* only 24"):
        run_active_learning(cfg.replace(nb_labeled=99, exp_name="other"), log=lambda m: None)


def test_ensemble_strategy_trains_and_keeps_its_members(tiny_data, tmp_path):
    cfg = resolve(tiny_values(tiny_data, tmp_path, query_strategy="ensemble_js", nb_ensemble=2, nb_iterations=1,
                              depth=3))
    run = run_active_learning(cfg, log=lambda m: None)
    assert (run / "round_00" / "member_1" / "best.keras").is_file()
    scores = pd.read_csv(run / "round_01" / "scores.csv")
    assert (scores["uncertainty"] >= -1e-6).all() and scores["uncertainty"].nunique() > 1
