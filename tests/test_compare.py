import numpy as np
import pandas as pd
import pytest

from dsal_tf.compare import (
    aulc,
    bootstrap_ci,
    bootstrap_ratio_ci,
    full_supervision_config,
    image_aulc,
    paired_differences,
    parse_strategy_spec,
    run_comparison,
    spearman_table,
)
from dsal_tf.config import resolve
from dsal_tf.errors import DsalError

from .conftest import tiny_values


def test_aulc_is_the_mean_dice_over_the_label_range():
    # trapezoids: (0.5+0.7)/2*10 + (0.7+0.7)/2*10 = 6 + 7 = 13, over 20 labels -> 0.65
    assert aulc([10, 20, 30], [0.5, 0.7, 0.7]) == pytest.approx(0.65)
    assert aulc([10], [0.4]) == pytest.approx(0.4)


def test_image_aulc_matches_aulc_per_image():
    dice = np.array([[0.5, 0.2], [0.7, 0.4], [0.7, 0.9]])
    np.testing.assert_allclose(image_aulc(np.array([10, 20, 30]), dice),
                               [aulc([10, 20, 30], dice[:, 0]), aulc([10, 20, 30], dice[:, 1])])


def test_bootstrap_interval_on_synthetic_differences_with_known_answers():
    # every image of every seed differs by exactly 0.02: the interval is the point [0.02, 0.02]
    mean, lo, hi = bootstrap_ci(np.full((3, 50), 0.02))
    assert mean == lo == hi == pytest.approx(0.02)
    # two seeds, constant within each (0.01 and 0.05): resampling seeds gives means 0.01, 0.03, 0.05
    # with probabilities 1/4, 1/2, 1/4, so the 95% interval is exactly [0.01, 0.05]
    mean, lo, hi = bootstrap_ci(np.stack([np.full(40, 0.01), np.full(40, 0.05)]))
    assert (mean, lo, hi) == pytest.approx((0.03, 0.01, 0.05))
    # one seed, 400 images of +-0.1: mean 0, and the interval is the normal one, 1.96 * 0.1 / sqrt(400)
    diffs = np.tile([0.1, -0.1], 200)[None]
    mean, lo, hi = bootstrap_ci(diffs, reps=4000)
    assert mean == pytest.approx(0.0, abs=1e-12)
    assert lo == pytest.approx(-0.0098, rel=0.1) and hi == pytest.approx(0.0098, rel=0.1)


def test_bootstrap_ratio_interval_with_known_answers():
    # two seeds, each constant: a gap recovered of 0.01/0.02 in one and 0.03/0.02 in the other; the seed
    # draws (A,A), (A,B), (B,B) give 0.5, 1.0, 1.5 with probabilities 1/4, 1/2, 1/4
    num = np.stack([np.full(30, 0.01), np.full(30, 0.03)])
    ratio, lo, hi = bootstrap_ratio_ci(num, np.full((2, 30), 0.02))
    assert (ratio, lo, hi) == pytest.approx((1.0, 0.5, 1.5))
    # a ratio of means, not a mean of ratios: (0.01 + 0.03) / (0.01 + 0.05) = 2/3, not (1 + 0.6) / 2
    ratio, _, _ = bootstrap_ratio_ci(num, np.stack([np.full(30, 0.01), np.full(30, 0.05)]))
    assert ratio == pytest.approx(2 / 3)
    # the same draws as bootstrap_ci: with a constant denominator the interval is bootstrap_ci's, scaled
    rng = np.random.default_rng(3)
    diffs = rng.normal(0.01, 0.05, (3, 40))
    _, lo_d, hi_d = bootstrap_ci(diffs)
    _, lo_r, hi_r = bootstrap_ratio_ci(diffs, np.full((3, 40), 0.02))
    assert (lo_r, hi_r) == pytest.approx((lo_d / 0.02, hi_d / 0.02))
    with pytest.raises(ValueError, match="pair"):
        bootstrap_ratio_ci(np.zeros((2, 3)), np.zeros((3, 3)))


def _curve(n_oracle, dice):
    dice = np.asarray(dice, float)
    return np.asarray(n_oracle, float), pd.DataFrame(dice, columns=[f"img{i}" for i in range(dice.shape[1])])


def test_paired_differences_per_seed_and_pooled():
    n = [10, 20]
    curves = {
        ("random", 0): _curve(n, [[0.5, 0.5, 0.5], [0.6, 0.6, 0.6]]),
        ("random", 1): _curve(n, [[0.5, 0.5, 0.5], [0.6, 0.6, 0.6]]),
        ("dsal", 0): _curve(n, [[0.5, 0.5, 0.5], [0.7, 0.7, 0.7]]),  # +0.1 at the end, AULC +0.05
        ("dsal", 1): _curve(n, [[0.5, 0.5, 0.5], [0.6, 0.6, 0.6]]),  # no difference
        ("full", 0): _curve([30], [[0.8, 0.8, 0.8]]),
    }
    rows = pd.DataFrame(paired_differences({k: v for k, v in curves.items() if k[0] != "full"}, "random"))
    got = {(r.metric, r.seeds): (r.diff, r.ci_low, r.ci_high, r.outside_noise) for r in rows.itertuples()}
    assert got[("final_dice", "0")] == pytest.approx((0.1, 0.1, 0.1, True))
    assert got[("aulc", "0")] == pytest.approx((0.05, 0.05, 0.05, True))
    assert got[("final_dice", "1")] == pytest.approx((0.0, 0.0, 0.0, False))
    # pooled over the two seeds: mean 0.05, and a seed draw of (1, 1) gives 0, so 0 is inside
    assert got[("final_dice", "all")] == pytest.approx((0.05, 0.0, 0.1, False))
    vs_full = pd.DataFrame(paired_differences(curves, "full"))
    assert set(vs_full["metric"]) == {"final_dice"}  # full supervision has no learning curve
    dsal_vs_full = vs_full[(vs_full["strategy"] == "dsal")].iloc[0]
    assert dsal_vs_full["seeds"] == "0" and dsal_vs_full["diff"] == pytest.approx(-0.1)


def test_strategy_specs():
    assert parse_strategy_spec("dsal") == {"query_strategy": "dsal"}
    assert parse_strategy_spec("dsal+diverse") == {"query_strategy": "dsal", "selection": "diverse"}
    with pytest.raises(DsalError, match="diversee"):
        parse_strategy_spec("dsal+diversee")
    with pytest.raises(DsalError, match="dsl"):
        parse_strategy_spec("dsl")
    assert parse_strategy_spec("dsal+power") == {"query_strategy": "dsal", "selection": "power"}
    assert parse_strategy_spec("dsal@minfg") == {"query_strategy": "dsal", "pseudo_min_foreground": 0.01}
    assert parse_strategy_spec("dsal@pre8") == {"query_strategy": "dsal", "side_upsampling": "bilinear",
                                                "dropout_at": "bottleneck+deepest"}
    with pytest.raises(DsalError, match="@pre9"):
        parse_strategy_spec("dsal@pre9")


def test_spearman_of_uncertainty_against_real_error(tmp_path):
    rd = tmp_path / "round_01"
    rd.mkdir()
    pd.DataFrame({"uncertainty": [0.1, 0.2, 0.3, 0.4], "true_dice": [0.9, 0.8, 0.7, 0.1]}).to_csv(
        rd / "scores.csv", index=False)
    rd2 = tmp_path / "round_02"
    rd2.mkdir()
    pd.DataFrame({"uncertainty": [0.0, 0.0], "true_dice": [0.9, 0.8]}).to_csv(rd2 / "scores.csv", index=False)
    rows = spearman_table(tmp_path)
    assert rows[0] == {"round": 1, "spearman": pytest.approx(1.0)}
    assert np.isnan(rows[1]["spearman"])


def test_full_supervision_config(tiny_cfg):
    full = full_supervision_config(tiny_cfg)
    assert full.nb_labeled == 24 and full.nb_iterations == 0
    assert full.nb_initial_epochs == tiny_cfg.nb_initial_epochs + 2 * tiny_cfg.nb_active_epochs


@pytest.mark.slow
def test_tiny_comparison_shares_the_initial_model(tiny_data, tmp_path):
    cfg = resolve(tiny_values(tiny_data, tmp_path, nb_iterations=1, pseudo_epoch=1, mc_passes=2, depth=3))
    specs = ["dsal", "ceal+diverse"]  # two strategies: each spec part (weak labeler, selection) shows once
    summary = run_comparison(cfg, specs, [0], "cmp", log=lambda m: None, baseline="dsal")
    out = tmp_path / "exp" / "cmp"
    assert set(summary["strategy"]) == {*specs, "full"}
    # each row names its weak labeler: CEAL its own, the others DSAL's confidence rule
    assert dict(zip(summary["strategy"], summary["pseudo"])) == {
        "dsal": "confidence", "ceal+diverse": "ceal", "full": "none"}
    assert dict(zip(summary["strategy"], summary["selection"]))["ceal+diverse"] == "diverse"
    init = (out / "init-s0" / "round_00" / "best.keras").read_bytes()
    for s in specs:
        assert (out / f"{s}-s0" / "round_00" / "best.keras").read_bytes() == init
    comparison = pd.read_csv(out / "comparison.csv")
    assert len(comparison) == 2 * 2  # 2 strategies x rounds 0..1
    assert (out / "learning_curves.png").is_file() and (out / "spearman.csv").is_file()
    diffs = pd.read_csv(out / "differences.csv")
    vs_dsal = diffs[diffs["baseline"] == "dsal"]
    assert set(zip(vs_dsal["strategy"], vs_dsal["metric"])) == {
        ("ceal+diverse", m) for m in ("final_dice", "aulc")}
    assert (diffs["ci_low"] <= diffs["diff"]).all() and (diffs["diff"] <= diffs["ci_high"]).all()
    # a rerun with one strategy finds it finished and still summarizes every finished run
    again = run_comparison(cfg, ["dsal"], [0], "cmp", log=lambda m: None, baseline="dsal")
    pd.testing.assert_frame_equal(summary, again, check_exact=False, atol=1e-4)
