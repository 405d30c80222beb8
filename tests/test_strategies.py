import numpy as np
import pytest
import tensorflow as tf

from dsal_tf.config import resolve
from dsal_tf.strategies import PSEUDO_POLICIES, QUERY_STRATEGIES, histogram_select
from dsal_tf.strategies.dsal import agreement
from dsal_tf.strategies.pseudo import confidence_select


def masks(*rows):
    """Hand-made 1xW masks as [N,1,W,1] probabilities."""
    return tf.constant(np.array(rows, np.float32).reshape(len(rows), 1, -1, 1))


def test_agreement_on_hand_made_masks():
    main = masks([1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0])
    side_1 = masks([1, 1, 0, 0], [0.9, 0.2, 0, 0], [0, 0, 0, 0])
    side_2 = masks([1, 1, 0, 0], [0, 0, 1, 1], [1, 0, 0, 0])
    # image 0: both sides agree -> (5/5 + 5/5)/2 = 1
    # image 1: Dice(B0,B1) = (2*1+1)/(2+1+1) = 0.75; Dice(B0,B2) = (0+1)/(2+2+1) = 0.2 -> 0.475
    # image 2: Dice(empty, empty) = 1; Dice(empty, 1 px) = 1/2 -> 0.75
    np.testing.assert_allclose(agreement(main, side_1, side_2).numpy(), [1.0, 0.475, 0.75], rtol=1e-6)


def fixed_model(main, side_1, side_2):
    """A stand-in 'model' returning fixed head outputs (the strategy only calls it)."""
    def model(x, training=False):
        return {"main": main, "side_1": side_1, "side_2": side_2}
    return model


def test_dsal_ranks_least_agreeing_first_and_ascend_reverses():
    main = masks([1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0])
    side_1 = masks([1, 1, 0, 0], [0.9, 0.2, 0, 0], [0, 0, 0, 0])
    side_2 = masks([1, 1, 0, 0], [0, 0, 1, 1], [1, 0, 0, 0])
    cfg = resolve({})
    strategy = QUERY_STRATEGIES["dsal"].from_config(cfg)
    scores = {k: v.numpy() for k, v in strategy.score_batch(fixed_model(main, side_1, side_2), None, main).items()}
    assert list(strategy.select(scores, 3, np.random.default_rng(0))) == [1, 2, 0]
    assert list(QUERY_STRATEGIES["dsal"].from_config(cfg.replace(ds_ascend=False)).select(scores, 1, None)) == [0]
    # confidence = mean |p - 0.5| of the main head; true Dice against y = main is 1
    np.testing.assert_allclose(scores["confidence"], [0.5, 0.5, 0.5])
    np.testing.assert_allclose(scores["true_dice"], [1, 1, 1])


def test_confidence_select_uses_top_bin_then_agreement():
    conf = np.array([0.10, 0.49, 0.48, 0.20, 0.50, 0.30])
    cert = np.array([0.99, 0.10, 0.50, 0.98, 0.20, 0.97])
    # 10 bins over [0.1, 0.5]: the top bin is conf >= 0.46 -> candidates {1, 2, 4};
    # the 2 most certain of them are 2 (0.5) and 4 (0.2)
    assert list(confidence_select(conf, cert, 2)) == [2, 4]
    # asking for 4 fills up with the most certain non-candidate (0), then ranks by certainty
    assert list(confidence_select(conf, cert, 4)) == [0, 2, 4, 1]
    # CONF_THRES off: plain ranking by certainty
    assert list(confidence_select(conf, cert, 2, use_histogram=False)) == [0, 3]


def test_pseudo_policies_choose_only_available_images():
    cfg = resolve({})
    scores = {"confidence": np.linspace(0, 0.5, 10), "uncertainty": np.linspace(1, 0, 10)}
    available = np.array([0, 2, 4, 6, 8])
    # confidence: of the available, conf 0.5 (image 8) alone is in the top bin; then certainty
    assert list(PSEUDO_POLICIES["confidence"].from_config(cfg).select(scores, available, 3, None)) == [8, 6, 4]
    assert list(PSEUDO_POLICIES["confidence"].from_config(cfg).select(scores, available, 2, None)) == [8, 6]
    # random pseudo policy: exactly the seeded permutation of the available images
    picked = PSEUDO_POLICIES["random"].from_config(cfg).select(scores, available, 3, np.random.default_rng(0))
    assert list(picked) == list(np.random.default_rng(0).permutation(available)[:3])
    assert len(PSEUDO_POLICIES["none"].from_config(cfg).select(scores, available, 3, None)) == 0


def test_random_query_is_seeded():
    cfg = resolve({"query_strategy": "random"})
    s = {"uncertainty": np.zeros(50)}
    a = QUERY_STRATEGIES["random"].from_config(cfg).select(s, 5, np.random.default_rng(4))
    b = QUERY_STRATEGIES["random"].from_config(cfg).select(s, 5, np.random.default_rng(4))
    assert list(a) == list(b) and len(set(a)) == 5


def test_histogram_select_parts():
    # 80 bins over [0, 0.8): bin b holds [b/100, (b+1)/100). Hand-made populations:
    #   20 zeros (bin 0, the mode), 1 each in bins 3..7 (below the band [mode+6, 47) = [6, 47)),
    #   30 in the band (bins 10..39), top bins 75..79 with 3, 1, 2, 1, 2 images
    band = [b / 100 + 0.005 for b in range(10, 40)]
    top = {75: 3, 76: 1, 77: 2, 78: 1, 79: 2}
    scores = np.array([0.0] * 20 + [b / 100 + 0.005 for b in range(3, 8)] + band
                      + [b / 100 + 0.001 * k + 0.002 for b, c in top.items() for k in range(c)] + [0.8])
    # 0.8 is the histogram's right edge: it falls in bin 79, which now holds 3
    which = np.minimum((scores * 100).astype(int), 79)
    picked = histogram_select(scores, 35, np.random.default_rng(0))
    assert len(picked) == 35 and len(set(picked)) == 35
    assert scores[picked[:10]].max() == 0.0  # 10 of 35: the lowest scores
    middle = picked[10:25]  # 15 of 35: a random draw from the band, never outside it
    assert ((which[middle] >= 6) & (which[middle] < 47)).all()
    expected_middle = np.random.default_rng(0).permutation(np.flatnonzero((which >= 6) & (which < 47)))[:15]
    assert list(middle) == list(expected_middle)
    # 10 of 35 from the top 5 bins, least-populated first (ties: higher bin first), highest score first
    tail = picked[25:]
    assert list(which[tail]) == [78, 76, 77, 77, 79, 79, 79, 75, 75, 75]
    assert scores[tail[4]] == 0.8


@pytest.mark.parametrize("n", [1, 7, 35])
def test_histogram_select_returns_n_distinct(n):
    scores = np.random.default_rng(n).uniform(size=60)
    picked = histogram_select(scores, n, np.random.default_rng(0))
    assert len(picked) == n == len(set(picked))


def test_entropy_query_on_hand_made_probabilities():
    from dsal_tf.strategies.entropy import binary_entropy

    main = masks([0.5, 0.5, 0.5, 0.5], [1, 0, 1, 0], [0.5, 0.5, 0, 0])
    strategy = QUERY_STRATEGIES["entropy"].from_config(resolve({}))
    out = strategy.score_batch(fixed_model(main, main, main), None, main)
    np.testing.assert_allclose(out["uncertainty"].numpy(), [np.log(2), 0.0, np.log(2) / 2], atol=1e-5)
    np.testing.assert_allclose(binary_entropy(tf.constant([0.25])).numpy(),
                               [-(0.25 * np.log(0.25) + 0.75 * np.log(0.75))], rtol=1e-5)


def test_ceal_score_on_hand_made_mc_passes():
    from dsal_tf.strategies.ceal import normalized_edt

    # two dropout passes over one 1x5 image
    passes = [masks([0, 1, 1.0, 1, 0]), masks([0, 1, 0.6, 1, 0])]

    class MCModel:
        calls = 0

        def __call__(self, x, training=False):
            assert training  # MC dropout: dropout on
            p = passes[MCModel.calls % 2]
            MCModel.calls += 1
            return {"main": p}

    # mean [0, 1, .8, 1, 0] -> binary [0, 1, 1, 1, 0] -> EDT [0, 1, 2, 1, 0] / 2
    np.testing.assert_allclose(normalized_edt(np.array([0, 1, 1, 1, 0], bool).reshape(1, 1, 5, 1)).ravel(),
                               [0, 0.5, 1, 0.5, 0])
    cfg = resolve({"query_strategy": "ceal", "mc_passes": 2})
    out = QUERY_STRATEGIES["ceal"].from_config(cfg).score_batch(MCModel(), None, passes[0])
    # population variance at the centre pixel: ((1-.8)^2 + (.6-.8)^2) / 2 = 0.04, weight 1
    np.testing.assert_allclose(out["uncertainty"].numpy(), [0.04], rtol=1e-5)
    assert MCModel.calls == 2


def test_ceal_selection_is_histogram_by_default_and_pseudo_from_fullest_bin():
    from dsal_tf.strategies.ceal import most_populated_bin

    cfg = resolve({"query_strategy": "ceal"})
    u = np.concatenate([np.zeros(5), np.full(30, 0.5), np.linspace(0.9, 1.0, 5)])
    picked = QUERY_STRATEGIES["ceal"].from_config(cfg).select({"uncertainty": u}, 7, np.random.default_rng(0))
    np.testing.assert_array_equal(np.sort(picked), np.sort(histogram_select(u, 7, np.random.default_rng(0))))
    assert set(most_populated_bin(u)) == set(range(5, 35))
    available = np.arange(0, 40, 2)
    chosen = PSEUDO_POLICIES["ceal"].from_config(cfg).select({"uncertainty": u}, available, 4, np.random.default_rng(1))
    assert set(chosen) <= set(range(6, 35, 2)) and len(chosen) == 4


def test_ensemble_scores_on_hand_made_members():
    from dsal_tf.strategies.ensemble import ensemble_scores
    from dsal_tf.strategies.entropy import binary_entropy

    # two members, one pixel each image: image 0 they agree (0.5, 0.5); image 1 they disagree (0.9, 0.1)
    probs = tf.constant(np.array([[0.5, 0.5], [0.9, 0.1]], np.float32).reshape(2, 1, 1, 1, 2))
    h_s, js = ensemble_scores(probs)
    h09 = float(binary_entropy(tf.constant(0.9)))
    np.testing.assert_allclose(h_s.numpy(), [np.log(2), np.log(2)], rtol=1e-5)  # both means are 0.5
    np.testing.assert_allclose(js.numpy(), [0.0, np.log(2) - h09], atol=1e-6)  # only image 1 disagrees


def test_k_center_greedy_skips_duplicates():
    from dsal_tf.strategies import k_center_greedy

    # candidates in priority order; 1 and 2 duplicate 0, 3 is far, 4 is farther from {0, 3} than 1, 2
    feats = np.array([[0, 0], [0, 0], [0, 0], [5, 0], [0, 3]], np.float32)
    assert list(k_center_greedy(feats, 3)) == [0, 3, 4]
    # only when nothing else is left do duplicates come, earliest first
    assert list(k_center_greedy(feats, 5)) == [0, 3, 4, 1, 2]


def test_diverse_selection_skips_near_duplicates_among_the_top_candidates():
    cfg = resolve({"selection": "diverse", "diverse_factor": 2})
    # the 4 most uncertain are 0..3 (0, 1, 2 the same image); the pick of 2 is 0 and 3
    scores = {"uncertainty": np.array([0.9, 0.89, 0.88, 0.5, 0.1, 0.05]),
              "features": np.array([[1, 1], [1, 1], [1, 1], [4, 5], [9, 9], [9, 8]], np.float32)}
    assert list(QUERY_STRATEGIES["dsal"].from_config(cfg).select(scores, 2, np.random.default_rng(0))) == [0, 3]
    assert list(QUERY_STRATEGIES["dsal"].from_config(cfg.replace(selection="rank")).select(scores, 2, None)) == [0, 1]
    # random + diverse: a random candidate draw of 4, thinned the same way
    cand = np.random.default_rng(0).permutation(6)[:4]
    from dsal_tf.strategies import k_center_greedy

    expected = cand[k_center_greedy(scores["features"][cand], 2)]
    got = QUERY_STRATEGIES["random"].from_config(cfg).select(scores, 2, np.random.default_rng(0))
    assert list(got) == list(expected)


@pytest.mark.compiled  # the strategies' scores through the traced scoring pass
def test_diverse_scoring_returns_bottleneck_features_from_the_same_pass(tiny_cfg):
    from dsal_tf import train
    from dsal_tf.data import Normalizer

    cfg = tiny_cfg.replace(selection="diverse", mc_passes=2)
    model = train.new_model(cfg, 0)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (5, 32, 32, 3), dtype=np.uint8)
    masks = (images[..., :1] > 127).astype(np.uint8)
    norm = Normalizer.fit(images, "zscore")
    from dsal_tf.model import with_features
    from dsal_tf.space import space_for

    space = space_for(cfg.replace(batch_size=4))
    for name in ("dsal", "ceal", "entropy", "random"):
        query = QUERY_STRATEGIES[name].from_config(cfg)
        assert query.selection.needs_features
        scores = space.score_pool(query, model, images, masks, norm, with_features=with_features)
        assert scores["features"].shape == (5, 2 * 2**4)  # base 2 filters, depth 4: 32 channels
        assert len(scores["uncertainty"]) == 5


def test_ds_ascend_changes_only_dsal_and_keeps_the_reference_meaning():
    u = np.array([0.1, 0.9, 0.5, 0.3])
    scores = {"uncertainty": u, "features": np.zeros((4, 1))}
    on, off = resolve({}), resolve({"ds_ascend": False})
    assert QUERY_STRATEGIES["dsal"].from_config(on).settings.ds_ascend  # the reference default: plain DSAL
    assert list(QUERY_STRATEGIES["dsal"].from_config(on).select(scores, 2, None)) == [1, 2]  # least agreeing first
    assert list(QUERY_STRATEGIES["dsal"].from_config(off).select(scores, 2, None)) == [0, 3]  # ablation
    for name in ("entropy", "ceal"):
        a = QUERY_STRATEGIES[name].from_config(on).select(scores, 2, np.random.default_rng(0))
        b = QUERY_STRATEGIES[name].from_config(off).select(scores, 2, np.random.default_rng(0))
        assert list(a) == list(b)


def test_each_strategy_has_its_own_weak_labeler_unless_overridden():
    from dsal_tf.strategies import pseudo_policy_name

    assert pseudo_policy_name(resolve({"query_strategy": "ceal"})) == "ceal"
    for name in ("dsal", "random", "entropy"):
        assert pseudo_policy_name(resolve({"query_strategy": name})) == "confidence"
    assert pseudo_policy_name(resolve({"query_strategy": "ceal", "pseudo_policy": "confidence"})) == "confidence"


def test_random_query_scores_like_dsal_so_its_pseudo_labels_follow_agreement():
    main = masks([1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0])
    side_1 = masks([1, 1, 0, 0], [0.9, 0.2, 0, 0], [0, 0, 0, 0])
    side_2 = masks([1, 1, 0, 0], [0, 0, 1, 1], [1, 0, 0, 0])
    cfg = resolve({"query_strategy": "random", "conf_thres": False})
    out = QUERY_STRATEGIES["random"].from_config(cfg).score_batch(fixed_model(main, side_1, side_2), None, main)
    scores = {k: v.numpy() for k, v in out.items()}
    np.testing.assert_allclose(scores["agreement"], [1.0, 0.475, 0.75], rtol=1e-6)
    # not file order: of the available images 1 and 2, the more agreeing (2) is pseudo-labelled
    pseudo = PSEUDO_POLICIES["confidence"].from_config(cfg)
    assert list(pseudo.select(scores, np.array([1, 2]), 1, np.random.default_rng(0))) == [2]


def test_ceal_weak_labeler_draws_only_from_the_fullest_bin_of_the_available():
    cfg = resolve({"query_strategy": "ceal"})
    # available images 0..7: uncertainties with the fullest 80-bin bin at 0.3 (images 2, 4, 5, 7)
    u = np.array([0.0, 0.9, 0.3, 0.8, 0.3, 0.3, 0.1, 0.3, 0.3])
    available = np.arange(8)
    chosen = PSEUDO_POLICIES["ceal"].from_config(cfg).select({"uncertainty": u}, available, 3, np.random.default_rng(5))
    assert list(chosen) == list(np.random.default_rng(5).permutation([2, 4, 5, 7])[:3])


def test_ceal_weight_on_an_all_foreground_prediction_is_the_distance_to_the_border():
    from dsal_tf.strategies.ceal import normalized_edt

    full = np.ones((1, 1, 5, 1), bool)
    # padded with background: distances 1, 2, 3, 2, 1 (the 1-pixel-high image: 1 everywhere)
    np.testing.assert_allclose(normalized_edt(full).ravel(), [1, 1, 1, 1, 1])
    full = np.ones((1, 5, 5, 1), bool)
    d = normalized_edt(full)[0, ..., 0]
    np.testing.assert_allclose(d[2], [1 / 3, 2 / 3, 1, 2 / 3, 1 / 3])
    assert d[2, 2] == 1.0 and d[0, 0] == pytest.approx(1 / 3)
    assert not normalized_edt(np.zeros((1, 3, 3, 1), bool)).any()


def test_scoring_graph_is_rebuilt_for_a_new_model_object(tiny_cfg):
    from dsal_tf import train
    from dsal_tf.data import Normalizer

    rng = np.random.default_rng(1)
    images = rng.integers(0, 255, (3, 32, 32, 3), dtype=np.uint8)
    masks = np.zeros((3, 32, 32, 1), np.uint8)
    norm = Normalizer.fit(images, "zscore")
    from dsal_tf.space import space_for

    strategy = QUERY_STRATEGIES["entropy"].from_config(tiny_cfg)
    space = space_for(tiny_cfg.replace(batch_size=4))
    for seed in (0, 1):  # the first model is freed before the second is made
        model = train.new_model(tiny_cfg, seed)
        got = space.score_pool(strategy, model, images, masks, norm)["pred"]
        want = (model(norm(images.astype(np.float32)), training=False)["main"].numpy() > 0.5).astype(np.uint8)
        assert np.array_equal(got, want)
        del model


def test_power_select_draws_proportional_to_rank_score_power():
    """Scores [5, 7, 9] have rank scores s = [1/3, 2/3, 1]; with beta = 2 the first draw has
    probabilities s**2 / sum = [1/14, 4/14, 9/14] (beta ignored would give [1/6, 2/6, 3/6])."""
    from dsal_tf.strategies.base import power_select

    rng = np.random.default_rng(0)
    first = np.array([power_select(np.array([5.0, 7.0, 9.0]), 1, 2.0, rng)[0] for _ in range(20000)])
    np.testing.assert_allclose(np.bincount(first, minlength=3) / len(first), [1 / 14, 4 / 14, 9 / 14], atol=0.01)
    # without replacement: all three drawn once
    assert sorted(power_select(np.array([5.0, 7.0, 9.0]), 3, 2.0, rng)) == [0, 1, 2]


def test_power_select_limits_random_and_top_k():
    from dsal_tf.strategies.base import power_select

    u = np.array([0.1, 0.9, 0.5, 0.7, 0.3])
    assert list(power_select(u, 3, 1e6, np.random.default_rng(1))) == [1, 3, 2]  # large beta: top-k in order
    # beta = 0 ignores the scores: the same seed draws the same positions whatever the scores are
    a = power_select(u, 3, 0.0, np.random.default_rng(2))
    b = power_select(-u, 3, 0.0, np.random.default_rng(2))
    assert list(a) == list(b)


def test_power_beta_schedule_and_the_seeded_dsal_pick():
    from dsal_tf.strategies.ranking import power_beta

    cfg = resolve({"nb_iterations": 5, "selection": "power", "power_beta_start": 1.0, "power_beta_end": 4.0})
    assert [power_beta(1.0, 4.0, r, cfg.nb_iterations) for r in (1, 3, 5)] == [1.0, 2.5, 4.0]
    scores = {"uncertainty": np.linspace(0, 1, 50)}
    q = QUERY_STRATEGIES["dsal"].from_config(cfg)
    a = q.select(scores, 10, np.random.default_rng(7), 5)
    assert list(a) == list(q.select(scores, 10, np.random.default_rng(7), 5))  # the seed fixes the draw
    assert len(set(a)) == 10


def test_pseudo_min_foreground_skips_an_all_background_candidate():
    def with_foreground(scores, available, share):
        return PSEUDO_POLICIES["confidence"].from_config(resolve({"pseudo_min_foreground": share})).candidates(
            scores, available)

    scores = {"foreground": np.array([0.0, 0.2, 0.001, 0.05])}
    available = np.array([0, 1, 2, 3])
    assert list(with_foreground(scores, available, 0.0)) == [0, 1, 2, 3]  # the reference rule
    assert list(with_foreground(scores, available, 0.01)) == [1, 3]
    # the confidence rule's most certain candidate is the empty image 0 unless it is skipped
    scores.update(confidence=np.array([0.5, 0.4, 0.45, 0.3]), uncertainty=np.array([0.0, 0.2, 0.1, 0.3]))
    policy = PSEUDO_POLICIES["confidence"].from_config(resolve({"conf_thres": False}))
    assert list(policy.select(scores, available, 1, None)) == [0]
    assert list(policy.select(scores, with_foreground(scores, available, 0.01), 1, None)) == [1]
