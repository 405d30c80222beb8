"""ClaSP PE (`claspe`, the `score_power` selection) and foreground-aware random (`random_fg`): tiny
hand-checkable cases (docs/methods.md#clasp-pe)."""

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from dsal_tf.active import run_active_learning
from dsal_tf.config import resolve
from dsal_tf.errors import DsalError
from dsal_tf.strategies import QUERY_STRATEGIES, SELECTIONS
from dsal_tf.strategies.claspe import foreground_weighted_entropy, split_query, stratified_select
from dsal_tf.strategies.random_fg import foreground_random_select
from dsal_tf.strategies.ranking import geometric_beta, score_power_select

from .conftest import tiny_values

SCORES = np.array([0.30, 0.90, 0.10, 0.70, 0.50, 0.20, 0.80, 0.40, 0.60, 0.05])


def h(p):
    """Binary entropy in nats."""
    return -(p * np.log(p) + (1 - p) * np.log(1 - p))


# ------------------------------------------------------------------ power noising
def test_huge_beta_is_exactly_the_top_k_in_order():
    for seed in range(5):
        picked = score_power_select(SCORES, 4, 1e9, np.random.default_rng(seed))
        assert list(picked) == [1, 6, 3, 8]  # 0.9, 0.8, 0.7, 0.6


def test_beta_zero_is_the_seeded_uniform_draw():
    # beta = 0: the keys are the Gumbel noise alone, so the picks are exactly the top n of
    # rng.gumbel(size=N), a uniform draw without replacement; a tiny beta (scale 1e12) gives the same
    expected = np.argsort(-np.random.default_rng(7).gumbel(size=len(SCORES)), kind="stable")[:4]
    assert list(score_power_select(SCORES, 4, 0.0, np.random.default_rng(7))) == list(expected)
    assert list(score_power_select(SCORES, 4, 1e-12, np.random.default_rng(7))) == list(expected)
    # the scores do not matter at beta = 0
    assert list(score_power_select(SCORES[::-1], 4, 0.0, np.random.default_rng(7))) == list(expected)


def test_beta_one_draws_proportional_to_the_score():
    rng = np.random.default_rng(0)
    first = np.array([score_power_select(np.array([1.0, 2.0, 5.0]), 1, 1.0, rng)[0] for _ in range(20000)])
    np.testing.assert_allclose(np.bincount(first, minlength=3) / 20000, [1 / 8, 2 / 8, 5 / 8], atol=0.015)


def test_zero_scores_are_drawn_last_and_negative_scores_are_refused():
    picked = score_power_select(np.array([0.0, 0.5, 0.0, 0.2]), 4, 1.0, np.random.default_rng(0))
    assert set(picked[:2]) == {1, 3} and set(picked[2:]) == {0, 2}
    with pytest.raises(ValueError, match="scores >= 0"):
        score_power_select(np.array([0.1, -0.2]), 1, 1.0, np.random.default_rng(0))
    rule = SELECTIONS["score_power"]()
    with pytest.raises(DsalError, match="SELECTION = 'power'"):
        rule.choose(np.array([0.1, -0.2]), 1, np.random.default_rng(0))


def test_the_schedule_for_five_rounds_goes_from_1_to_100_geometrically():
    betas = [geometric_beta(1.0, 100.0, r, 5) for r in range(1, 6)]  # rounds 1..5 are t = 0..4
    np.testing.assert_allclose(betas, [1.0, 100 ** 0.25, 10.0, 100 ** 0.75, 100.0])
    assert geometric_beta(1.0, 100.0, 1, 1) == 1.0  # a single round: the start
    rule = SELECTIONS["score_power"].from_config(resolve({"nb_iterations": 5}))
    assert rule.nb_rounds == 5 and rule.beta(3) == pytest.approx(10.0)
    rule = SELECTIONS["score_power"].from_config(resolve({"nb_iterations": 3, "score_power_beta_end": 9.0}))
    assert rule.beta(2) == pytest.approx(3.0)
    with pytest.raises(DsalError, match="SCORE_POWER_BETA_START"):
        SELECTIONS["score_power"].Settings.from_values({"score_power_beta_start": 0})


def test_the_selection_draws_with_the_round_s_beta():
    rule = SELECTIONS["score_power"].from_config(resolve({"nb_iterations": 5}))
    for r, beta in ((1, 1.0), (5, 100.0)):
        got = rule.choose(SCORES, 4, np.random.default_rng(3), r)
        assert list(got) == list(score_power_select(SCORES, 4, beta, np.random.default_rng(3)))


# ------------------------------------------------------------------ scores
def test_foreground_weighted_entropy_on_a_hand_made_map():
    # two 1x4 images: [0.5, 0.5, 0, 0] and [0.9, 0.1, 0.9, 0.1]
    prob = tf.constant(np.array([[0.5, 0.5, 0.0, 0.0], [0.9, 0.1, 0.9, 0.1]], np.float32).reshape(2, 1, 4, 1))
    pe, fg = foreground_weighted_entropy(prob)
    # image 0: PE = (ln 2 + ln 2 + 0 + 0) / 4 = ln2 / 2, mean p = 0.25 -> ln2 / 8
    # image 1: PE = H(0.9) (H(0.1) = H(0.9)), mean p = 0.5 -> H(0.9) / 2
    np.testing.assert_allclose(pe.numpy(), [np.log(2) / 2, h(0.9)], rtol=1e-5)
    np.testing.assert_allclose(fg.numpy(), [np.log(2) / 8, h(0.9) / 2], rtol=1e-5)


def test_foreground_weighted_entropy_on_a_volume():
    # one 2x1x2 volume [N,D,H,W,1]: p = 0.5 in one voxel of four -> PE = ln2 / 4, mean p = 1/8
    prob = tf.constant(np.array([0.5, 0.0, 0.0, 0.0], np.float32).reshape(1, 2, 1, 2, 1))
    pe, fg = foreground_weighted_entropy(prob)
    np.testing.assert_allclose(pe.numpy(), [np.log(2) / 4], rtol=1e-5)
    np.testing.assert_allclose(fg.numpy(), [np.log(2) / 32], rtol=1e-5)


# ------------------------------------------------------------------ stratification
def test_split_rounds_half_up():
    assert split_query(10, 0.66) == (7, 3)  # 6.6 -> 7
    assert split_query(5, 0.66) == (3, 2)  # 3.3 -> 3
    assert split_query(4, 0.5) == (2, 2) and split_query(3, 0.5) == (2, 1)  # 1.5 -> 2 (half up)
    assert split_query(1, 0.66) == (1, 0) and split_query(0, 0.66) == (0, 0)
    assert split_query(10, 0.0) == (0, 10) and split_query(10, 1.0) == (10, 0)


def test_a_query_of_10_takes_7_by_fg_entropy_then_3_by_entropy_without_duplicates():
    # the two keys rank the same items first: the entropy part must skip what the first part took
    fg = np.arange(20, 0, -1, dtype=float)  # item 0 highest
    pe = np.arange(20, 0, -1, dtype=float)

    def top(key, k):
        return np.argsort(-key, kind="stable")[:k]

    picked = stratified_select(fg, pe, 10, 0.66, top)
    assert list(picked) == list(range(10))  # 0..6 by fg_entropy, then 7, 8, 9: the best entropy left
    pe2 = np.arange(20, dtype=float)  # entropy ranks item 19 first
    assert list(stratified_select(fg, pe2, 10, 0.66, top)) == [0, 1, 2, 3, 4, 5, 6, 19, 18, 17]
    # the real rule: 10 distinct items, 7 and 3, whatever the seed
    rule = SELECTIONS["score_power"](nb_rounds=5)
    rng = np.random.default_rng(0)
    for r in range(1, 6):
        got = stratified_select(fg, pe, 10, 0.66, lambda key, k: rule.choose(key, k, rng, r))
        assert len(got) == 10 == len(set(got.tolist()))
    assert len(stratified_select(fg[:6], pe[:6], 10, 0.66, top)) == 6  # a pool smaller than the query


def test_claspe_strategy_scores_and_picks():
    p = np.array([[0.5, 0.5, 0.5, 0.5], [0.9, 0.9, 0.9, 0.9], [0.1, 0.1, 0.1, 0.1], [0.5, 0.5, 0.0, 0.0]],
                 np.float32).reshape(4, 1, 4, 1)
    main = tf.constant(p)
    cfg = resolve({"query_strategy": "claspe", "selection": "rank", "claspe_class_share": 0.5})
    strategy = QUERY_STRATEGIES["claspe"].from_config(cfg)
    out = {k: v.numpy() for k, v in strategy.score_batch(lambda x, training=False: {"main": main}, None, main).items()}
    # PE: ln2, H(0.9), H(0.9), ln2/2; fg_entropy: ln2/2, 0.9 H(0.9), 0.1 H(0.9), ln2/8
    np.testing.assert_allclose(out["uncertainty"], [np.log(2), h(0.9), h(0.9), np.log(2) / 2], rtol=1e-5)
    np.testing.assert_allclose(out["fg_entropy"], [np.log(2) / 2, 0.9 * h(0.9), 0.1 * h(0.9), np.log(2) / 8],
                               rtol=1e-5)
    # ranked (SELECTION = "rank"), query of 2 at share 0.5: 1 by fg_entropy (item 0: ln2/2 = 0.347 beats
    # item 1: 0.9 H(0.9) = 0.293), then 1 by entropy among the rest (item 3: ln2/2 = 0.347 > H(0.9) = 0.325)
    assert list(strategy.select(out, 2, None)) == [0, 3]
    # its own rule is score_power: the round's seed decides, and the same seed picks the same items
    own = QUERY_STRATEGIES["claspe"].from_config(resolve({"query_strategy": "claspe"}))
    assert own.selection.name == "score_power"
    a = own.select(out, 3, np.random.default_rng([0, 1]), 1)
    assert list(a) == list(own.select(out, 3, np.random.default_rng([0, 1]), 1)) and len(set(a.tolist())) == 3


# ------------------------------------------------------------------ foreground-aware random
def test_random_fg_picks_only_foreground_items_when_enough_qualify():
    fg = np.array([0.0, 0.2, 0.0005, 0.3, 0.0, 0.01, 0.0, 0.5])
    eligible = np.array([1, 3, 5, 7])  # above 0.001
    picked = foreground_random_select(fg, 3, 0.001, np.random.default_rng(2))
    assert set(picked) <= set(eligible) and len(set(picked.tolist())) == 3
    assert list(picked) == list(np.random.default_rng(2).permutation(eligible)[:3])


def test_random_fg_falls_back_to_plain_random_for_the_rest():
    fg = np.array([0.0, 0.2, 0.0, 0.3, 0.0, 0.0])
    picked = foreground_random_select(fg, 4, 0.001, np.random.default_rng(5))
    assert set(picked[:2]) == {1, 3}  # every eligible item first
    rng = np.random.default_rng(5)
    first = rng.permutation(np.array([1, 3]))
    assert list(picked) == [*first, *rng.permutation(np.array([0, 2, 4, 5]))[:2]]
    assert len(foreground_random_select(np.zeros(3), 5, 0.001, np.random.default_rng(0))) == 3  # none qualify


def test_random_fg_share_takes_its_part_from_foreground_items_and_the_rest_from_all_others():
    """RANDOM_FG_SHARE 0.67 of a query of 6: 4 (round(4.02)) drawn among the eligible items, then 2 drawn
    uniformly among every item not taken yet (eligible or not), with the same generator in that order."""
    fg = np.array([0.0, 0.2, 0.0, 0.3, 0.0, 0.4, 0.0, 0.5, 0.6, 0.0])
    eligible = np.array([1, 3, 5, 7, 8])
    picked = foreground_random_select(fg, 6, 0.001, np.random.default_rng(3), share=0.67)
    rng = np.random.default_rng(3)
    first = rng.permutation(eligible)[:4]
    rest = rng.permutation(np.setdiff1d(np.arange(10), first))[:2]
    assert list(picked) == [*first, *rest] and len(set(picked.tolist())) == 6
    rng = np.random.default_rng(3)
    rng.permutation(eligible)  # share 0 still draws the (empty) foreground part first: the same generator calls
    assert list(foreground_random_select(fg, 6, 0.001, np.random.default_rng(3), share=0.0)) == list(
        rng.permutation(np.arange(10))[:6])  # then plain random over every item
    tie = foreground_random_select(fg, 5, 0.001, np.random.default_rng(4), share=0.5)  # 2.5 half up: 3 (even: 2)
    rng = np.random.default_rng(4)
    first = rng.permutation(eligible)[:3]
    assert list(tie) == [*first, *rng.permutation(np.setdiff1d(np.arange(10), first))[:2]]
    # share 1 is the foreground-only draw the tests above check (every eligible item before any other)
    one = foreground_random_select(fg, 6, 0.001, np.random.default_rng(3), share=1.0)
    assert set(one[:5]) == set(eligible)


def test_random_fg_strategy_reads_the_predicted_foreground_share():
    cfg = resolve({"query_strategy": "random_fg", "random_fg_min_foreground": 0.25, "random_fg_share": 1.0})
    strategy = QUERY_STRATEGIES["random_fg"].from_config(cfg)
    scores = {"uncertainty": np.zeros(5), "foreground": np.array([0.1, 0.3, 0.25, 0.9, 0.0])}
    assert set(strategy.select(scores, 2, np.random.default_rng(0))) == {1, 3}  # strictly above 0.25
    with pytest.raises(DsalError, match="RANDOM_FG_MIN_FOREGROUND"):
        QUERY_STRATEGIES["random_fg"].Settings.from_values({"random_fg_min_foreground": 1.5})
    with pytest.raises(DsalError, match="RANDOM_FG_SHARE"):
        QUERY_STRATEGIES["random_fg"].Settings.from_values({"random_fg_share": -0.1})


# ------------------------------------------------------------------ the loop
@pytest.mark.slow
def test_the_loop_runs_claspe_by_name(tiny_data, tmp_path):
    cfg = resolve(tiny_values(tiny_data, tmp_path, query_strategy="claspe", nb_iterations=1, depth=3))
    run = run_active_learning(cfg, log=lambda m: None)
    scores = pd.read_csv(run / "round_01" / "scores.csv")
    assert (scores["chosen"] == "oracle").sum() == 4
    assert (scores["fg_entropy"] <= scores["uncertainty"] + 1e-6).all() and (scores["fg_entropy"] >= 0).all()


def test_under_diverse_the_own_rule_keeps_the_round_and_the_run_settings():
    """SELECTION = "diverse" thins the strategy's own pick: claspe's score_power draw must use the round's
    beta and the run's SCORE_POWER_BETA_END, as without "diverse" (it once drew at round 1 with the
    default settings whatever the round)."""
    cfg = resolve({"query_strategy": "claspe", "selection": "diverse", "nb_iterations": 5,
                   "score_power_beta_end": 9.0, "diverse_factor": 2})
    strategy = QUERY_STRATEGIES["claspe"].from_config(cfg)
    assert strategy.base_selection.settings.score_power_beta_end == 9.0
    assert strategy.base_selection.beta(5) == pytest.approx(9.0)
    rng = np.random.default_rng(4)
    n_pool, n = 40, 4
    scores = {"uncertainty": rng.random(n_pool), "fg_entropy": rng.random(n_pool),
              "features": rng.normal(size=(n_pool, 3)).astype(np.float32)}
    picks = {}
    for round_ in (1, 5):
        cand = strategy.pick(scores, 2 * n, np.random.default_rng(11), round_)
        want = strategy.selection.thin(cand, scores["features"], n)
        picks[round_] = strategy.select(scores, n, np.random.default_rng(11), round_)
        assert list(picks[round_]) == list(want)
    # the same seed draws differently at beta 1 and beta 9: the round reached the draw
    assert list(strategy.pick(scores, 2 * n, np.random.default_rng(11), 1)) != \
        list(strategy.pick(scores, 2 * n, np.random.default_rng(11), 5))
