"""Issue 27.5: DSAL's score and lesion size. The predicted foreground fraction of each scored item, the
analysis columns of compare's spearman.csv (the score against size, the partial Spearman given size, the
picks' size against the pool's) and the size-strata selection rule, on tiny hand-checkable cases."""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from scipy.stats import rankdata

from dsal_tf.compare import aggregate, partial_spearman, score_table, size_bias, spearman_table
from dsal_tf.config import resolve
from dsal_tf.errors import DsalError
from dsal_tf.strategies import QUERY_STRATEGIES, SELECTIONS
from dsal_tf.strategies.base import foreground_fraction
from dsal_tf.strategies.ranking import proportional_quota, size_strata, size_strata_select

OLD_RUN = Path(__file__).parent / "fixtures" / "old_run"


# ------------------------------------------------------------------ the foreground fraction


def test_foreground_fraction_of_2d_and_3d_predictions():
    pred_2d = np.zeros((2, 2, 2, 1), bool)
    pred_2d[0, 0, 1] = True  # 1 of 4 pixels
    pred_2d[1] = True  # every pixel
    np.testing.assert_allclose(foreground_fraction(tf.constant(pred_2d)).numpy(), [0.25, 1.0])
    pred_3d = np.zeros((1, 2, 2, 2, 1), bool)
    pred_3d[0, 0, 0, :] = True  # 2 voxels
    pred_3d[0, 1, 1, 1] = True  # a third, of 8
    np.testing.assert_allclose(foreground_fraction(tf.constant(pred_3d)).numpy(), [0.375])


def fixed_heads(main):
    """A stand-in model whose three heads all return `main` (the scoring only calls it)."""
    def model(x, training=False):
        return {"main": main, "side_1": main, "side_2": main}
    return model


@pytest.mark.parametrize("shape", [(2, 1, 4, 1), (2, 1, 2, 2, 1)])  # two images 1x4, two volumes 1x2x2
def test_the_scoring_pass_writes_the_thresholded_main_heads_foreground(shape):
    prob = tf.constant(np.array([[0.9, 0.2, 0.6, 0.1], [0.1, 0.2, 0.3, 0.51]], np.float32).reshape(shape))
    strategy = QUERY_STRATEGIES["dsal"].from_config(resolve({}))
    out = strategy.score_batch(fixed_heads(prob), None, prob)
    # image 0: 0.9 and 0.6 are above 0.5 -> 2 of 4; image 1: only 0.51 -> 1 of 4
    np.testing.assert_allclose(out["foreground"].numpy(), [0.5, 0.25])


# ------------------------------------------------------------------ partial Spearman


def test_partial_spearman_removes_what_both_share_with_z():
    # ranks of z: 1 2 3 4. rank(x) = (1.5, 1.5, 3.5, 3.5) = 2.5 + 0.8 (z - 2.5) + residual (0.2, -0.6, 0.6, -0.2);
    # rank(y) = (1, 3, 2, 4) = 2.5 + 0.8 (z - 2.5) + residual (-0.3, 0.9, -0.9, 0.3): opposite residuals.
    # Spearman(x, y) = 2 / (2 sqrt 5) = 0.447, but with z held fixed they disagree perfectly: -1.
    # By the formula: r_xz = 4 / (2 sqrt 5) = 0.894, r_yz = 0.8, (0.447 - 0.894 * 0.8) / sqrt(0.2 * 0.36) = -1.
    x, y, z = [0, 0, 1, 1], [10, 30, 20, 40], [1, 2, 3, 4]
    assert partial_spearman(x, y, z) == pytest.approx(-1.0)


def test_partial_spearman_with_a_z_unrelated_to_both_is_the_plain_spearman():
    # rank(z) = (3.5, 1.5, 1.5, 3.5) is orthogonal to rank(x) = (1, 2, 3, 4) and rank(y) = (2, 1, 4, 3), so
    # r_xz = r_yz = 0 and the partial is Spearman(x, y) = 1 - 6 * 4 / (4 * 15) = 0.6
    x, y, z = [1, 2, 3, 4], [2, 1, 4, 3], [1, 0, 0, 1]
    assert partial_spearman(x, y, z) == pytest.approx(0.6)


def test_partial_spearman_is_the_correlation_of_the_rank_residuals():
    rng = np.random.default_rng(0)
    z = rng.normal(size=60)
    x, y = z + rng.normal(size=60), z ** 3 + rng.normal(size=60)
    rz = np.c_[np.ones(60), rankdata(z)]

    def residual(v):
        r = rankdata(v)
        return r - rz @ np.linalg.lstsq(rz, r, rcond=None)[0]

    assert partial_spearman(x, y, z) == pytest.approx(np.corrcoef(residual(x), residual(y))[0, 1])


def test_partial_spearman_is_nan_where_undefined():
    assert np.isnan(partial_spearman([1, 2, 3], [3, 1, 2], [5, 6, 7]))  # x ranked exactly like z
    assert np.isnan(partial_spearman([1, 1, 1], [3, 1, 2], [1, 3, 2]))  # a constant
    assert np.isnan(partial_spearman([], [], []))


# ------------------------------------------------------------------ the size columns of one round


def hand_scores(**extra) -> pd.DataFrame:
    """Four pool images: foreground 0.1..0.4, uncertainty ranked (1, 3, 2, 4), error (0, 0, 1, 1)."""
    return pd.DataFrame({"index": [0, 1, 2, 3], "uncertainty": [0.1, 0.3, 0.2, 0.4],
                         "true_dice": [1.0, 1.0, 0.0, 0.0], "chosen": ["", "oracle", "pseudo", "oracle"], **extra})


def test_size_bias_of_one_round_by_hand():
    got = size_bias(hand_scores(foreground=[0.1, 0.2, 0.3, 0.4]))
    assert got["spearman_fg"] == pytest.approx(0.8)  # ranks (1, 3, 2, 4) against (1, 2, 3, 4): 1 - 6*2/60
    assert got["partial_spearman_fg"] == pytest.approx(-1.0)  # the first partial Spearman case above
    assert got["picks_fg"] == pytest.approx(0.3)  # images 1 and 3
    assert got["pool_fg"] == pytest.approx(0.25)


def test_size_bias_without_a_foreground_column_is_nan():
    got = size_bias(hand_scores())
    assert set(got) == {"spearman_fg", "partial_spearman_fg", "picks_fg", "pool_fg"}
    assert all(np.isnan(v) for v in got.values())


def test_score_table_reads_old_and_new_scores_files(tmp_path):
    (tmp_path / "round_01").mkdir()
    (tmp_path / "round_02").mkdir()
    hand_scores().to_csv(tmp_path / "round_01" / "scores.csv", index=False)  # before the column existed
    hand_scores(foreground=[0.1, 0.2, 0.3, 0.4]).to_csv(tmp_path / "round_02" / "scores.csv", index=False)
    old, new = score_table(tmp_path)
    assert old["round"] == 1 and old["spearman"] == pytest.approx(1 / np.sqrt(5)) and np.isnan(old["spearman_fg"])
    assert new["round"] == 2 and new["spearman_fg"] == pytest.approx(0.8) and new["picks_fg"] == pytest.approx(0.3)
    assert spearman_table(tmp_path) == [{"round": 1, "spearman": pytest.approx(1 / np.sqrt(5))},
                                        {"round": 2, "spearman": pytest.approx(1 / np.sqrt(5))}]


def fake_finished_run(folder: Path, strategy: str, keep_foreground: bool) -> None:
    """A finished run (rounds 0 and 1) from the old fixture's config and scores, with its evaluation
    written, so `aggregate` reads it without training or evaluating anything."""
    folder.mkdir(parents=True)
    config = json.loads((OLD_RUN / "config.json").read_text())
    config.update(exp_dir=str(folder.parents[1]), exp_name=f"{folder.parent.name}/{folder.name}",
                  query_strategy=strategy)
    (folder / "config.json").write_text(json.dumps(config))
    shutil.copyfile(OLD_RUN / "learning_curve.csv", folder / "learning_curve.csv")
    scores = pd.read_csv(OLD_RUN / "round_01" / "scores.csv")
    for r in (0, 1):
        (folder / f"round_{r:02d}").mkdir()
        (folder / f"round_{r:02d}" / "DONE").write_text("done\n")
        pd.DataFrame({"name": ["a", "b"], "dice": [0.5 + 0.1 * r, 0.6]}).to_csv(
            folder / f"round_{r:02d}" / "test_metrics.csv", index=False)
    (scores if keep_foreground else scores.drop(columns="foreground")).to_csv(
        folder / "round_01" / "scores.csv", index=False)
    pd.DataFrame({"round": [0, 1], "n_oracle": [8, 12], "n_pseudo": [0, 3], "dice_mean": [0.55, 0.6],
                  "iou_mean": [0.4, 0.45], "hd95_mean": [3.0, 2.5], "hd95_penalized_mean": [3.0, 2.5]}).to_csv(
        folder / "evaluation.csv", index=False)


def test_a_comparison_with_an_old_scores_file_still_aggregates(tmp_path):
    out = tmp_path / "exp" / "cmp"
    fake_finished_run(out / "dsal-s0", "dsal", keep_foreground=False)  # a scores.csv from before the column
    fake_finished_run(out / "dsal-s1", "dsal", keep_foreground=True)
    fake_finished_run(out / "random-s0", "random", keep_foreground=True)
    aggregate(out, log=lambda m: None)
    rho = pd.read_csv(out / "spearman.csv")
    assert list(rho.columns) == ["strategy", "round", "seed", "spearman", "spearman_fg", "partial_spearman_fg",
                                 "picks_fg", "pool_fg"]
    assert list(zip(rho["strategy"], rho["round"], rho["seed"])) == [("dsal", 1, 0), ("dsal", 1, 1)]  # no random
    old, new = rho.iloc[0], rho.iloc[1]
    assert old["spearman"] == pytest.approx(new["spearman"], abs=1e-4)  # the same scores either way
    assert np.isnan(old["spearman_fg"]) and np.isnan(old["pool_fg"])
    fixture = pd.read_csv(OLD_RUN / "round_01" / "scores.csv")
    assert new["pool_fg"] == pytest.approx(fixture["foreground"].mean(), abs=1e-4)


# ------------------------------------------------------------------ size-strata selection


def test_size_strata_are_quantile_bins_with_ties_kept_together():
    # the median of seven values is 0, and a value equal to an edge goes to the lower stratum
    np.testing.assert_array_equal(size_strata([0, 0, 0, 0, 0.5, 0.6, 0.7], 2), [0, 0, 0, 0, 1, 1, 1])
    # quartile edges 0.0225, 0.035, 0.235 (linear quantiles of 0.01..0.04, 0.3, 0.4): 2, 1, 1 and 2 items
    np.testing.assert_array_equal(size_strata([0.01, 0.02, 0.03, 0.04, 0.3, 0.4], 4), [0, 0, 1, 2, 3, 3])


def test_proportional_quota_rounds_by_largest_remainder():
    np.testing.assert_array_equal(proportional_quota([4, 3], 3), [2, 1])  # 12/7 = 1.71, 9/7 = 1.29
    np.testing.assert_array_equal(proportional_quota([1, 1, 1], 2), [1, 1, 0])  # equal remainders: lower first
    np.testing.assert_array_equal(proportional_quota([5, 0, 5], 3), [2, 0, 1])  # an empty stratum gets none
    np.testing.assert_array_equal(proportional_quota([2, 2], 4), [2, 2])


def test_size_strata_take_the_top_of_each_stratum():
    key = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2]
    fg = [0.01, 0.02, 0.03, 0.04, 0.3, 0.4, 0.5, 0.6]  # the score ranks the small lesions first
    # two strata of four (small, large), two picks each; plain ranking would take 0, 1, 2, 3
    np.testing.assert_array_equal(size_strata_select(key, fg, 4, 2), [0, 1, 4, 5])
    # one stratum is plain ranking
    np.testing.assert_array_equal(size_strata_select(key, fg, 3, 1), [0, 1, 2])


def test_size_strata_with_uneven_strata_ties_and_a_large_n():
    key = [0.1, 0.5, 0.3, 0.2, 0.9, 0.8, 0.7]
    fg = [0, 0, 0, 0, 0.5, 0.6, 0.7]  # strata of 4 and 3 -> quotas 2 and 1 of 3 picks
    # stratum 0's best are 1 (0.5) and 2 (0.3), stratum 1's is 4 (0.9); in priority order (rank: 4, 5, 6)
    np.testing.assert_array_equal(size_strata_select(key, fg, 3, 2), [4, 1, 2])
    everything = size_strata_select(key, fg, 10, 3)
    assert sorted(everything) == list(range(7))  # n above the pool: every item once, no duplicates
    np.testing.assert_array_equal(size_strata_select([0.5, 0.5, 0.5, 0.5], [0.1, 0.1, 0.1, 0.1], 2, 2), [0, 1])


def test_dsal_with_the_size_strata_rule_by_name():
    cfg = resolve({"query_strategy": "dsal", "selection": "size_strata", "size_strata_bins": 2})
    strategy = QUERY_STRATEGIES["dsal"].from_config(cfg)
    scores = {"uncertainty": np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4]),
              "foreground": np.array([0.1, 0.1, 0.1, 0.3, 0.3, 0.3])}
    np.testing.assert_array_equal(strategy.select(scores, 2, np.random.default_rng(0)), [0, 3])
    with pytest.raises(DsalError, match="foreground"):
        strategy.select({"uncertainty": scores["uncertainty"]}, 2, np.random.default_rng(0))
    with pytest.raises(DsalError, match="size_strata"):  # a strategy that picks from keys alone
        SELECTIONS["size_strata"]().choose(scores["uncertainty"], 2, None)


def test_the_other_rules_ignore_the_extra_scores():
    key = np.array([0.2, 0.9, 0.5])
    rank = SELECTIONS["rank"]()
    np.testing.assert_array_equal(rank.choose_from(key, {"foreground": np.array([1.0, 0.0, 0.5])}, 2, None),
                                  rank.choose(key, 2, None))
