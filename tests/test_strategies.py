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
    strategy = QUERY_STRATEGIES["dsal"](cfg)
    scores = {k: v.numpy() for k, v in strategy._step(fixed_model(main, side_1, side_2), None, main).items()}
    assert list(strategy.select(scores, 3, np.random.default_rng(0))) == [1, 2, 0]
    assert list(QUERY_STRATEGIES["dsal"](cfg.replace(ds_ascend=True)).select(scores, 1, None)) == [0]
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
    for name in ("confidence", "random"):
        picked = PSEUDO_POLICIES[name](cfg).select(scores, available, 3, np.random.default_rng(0))
        assert len(picked) == 3 and set(picked) <= set(available)
    assert list(PSEUDO_POLICIES["confidence"](cfg).select(scores, available, 2, None)) == [8, 6]
    assert len(PSEUDO_POLICIES["none"](cfg).select(scores, available, 3, None)) == 0


def test_random_query_is_seeded():
    cfg = resolve({"query_strategy": "random"})
    s = {"uncertainty": np.zeros(50)}
    a = QUERY_STRATEGIES["random"](cfg).select(s, 5, np.random.default_rng(4))
    b = QUERY_STRATEGIES["random"](cfg).select(s, 5, np.random.default_rng(4))
    assert list(a) == list(b) and len(set(a)) == 5


def test_histogram_select_parts():
    rng = np.random.default_rng(0)
    scores = np.concatenate([np.zeros(20), rng.uniform(0.0, 0.2, 200), np.linspace(0.9, 1.0, 10)])
    picked = histogram_select(scores, 35, rng)
    assert len(picked) == 35 and len(set(picked)) == 35
    assert set(range(10)) <= set(picked[:10]) | set(range(20))  # lowest scores first
    assert scores[picked[:10]].max() == 0.0
    # the 10 top-bin picks are the high-score tail
    assert (scores[picked[-10:]] >= 0.9).all()


@pytest.mark.parametrize("n", [1, 7, 35])
def test_histogram_select_returns_n_distinct(n):
    scores = np.random.default_rng(n).uniform(size=60)
    picked = histogram_select(scores, n, np.random.default_rng(0))
    assert len(picked) == n == len(set(picked))


def test_entropy_query_on_hand_made_probabilities():
    from dsal_tf.strategies.entropy import binary_entropy

    main = masks([0.5, 0.5, 0.5, 0.5], [1, 0, 1, 0], [0.5, 0.5, 0, 0])
    strategy = QUERY_STRATEGIES["entropy"](resolve({}))
    out = strategy._step(fixed_model(main, main, main), None, main)
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
    out = QUERY_STRATEGIES["ceal"](cfg)._step(MCModel(), None, passes[0])
    # population variance at the centre pixel: ((1-.8)^2 + (.6-.8)^2) / 2 = 0.04, weight 1
    np.testing.assert_allclose(out["uncertainty"].numpy(), [0.04], rtol=1e-5)
    assert MCModel.calls == 2


def test_ceal_selection_is_histogram_by_default_and_pseudo_from_fullest_bin():
    from dsal_tf.strategies.ceal import most_populated_bin

    cfg = resolve({"query_strategy": "ceal"})
    u = np.concatenate([np.zeros(5), np.full(30, 0.5), np.linspace(0.9, 1.0, 5)])
    picked = QUERY_STRATEGIES["ceal"](cfg).select({"uncertainty": u}, 7, np.random.default_rng(0))
    np.testing.assert_array_equal(np.sort(picked), np.sort(histogram_select(u, 7, np.random.default_rng(0))))
    assert set(most_populated_bin(u)) == set(range(5, 35))
    available = np.arange(0, 40, 2)
    chosen = PSEUDO_POLICIES["ceal"](cfg).select({"uncertainty": u}, available, 4, np.random.default_rng(1))
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
