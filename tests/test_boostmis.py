"""BoostMIS: the threshold rule, VAT, density, the class-balanced union, the loop, classify/features."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tensorflow as tf

from dsal_tf.strategies.boostmis import (
    LearningStatus,
    alternate_union,
    balanced_rank,
    bernoulli_kl,
    boostmis_select,
    categorical_kl,
    class_thresholds,
    confident,
    global_threshold,
    knn_density,
    status_counts,
    vat_score,
)


# ------------------------------------------------------------------ adaptive threshold
def test_status_counts_per_class_above_threshold():
    conf = np.array([0.99, 0.6, 0.97, 0.96, 0.8])
    cls = np.array([0, 0, 1, 1, 2])
    np.testing.assert_array_equal(status_counts(conf, cls, 0.95, 3).numpy(), [1, 2, 0])


def test_global_threshold_rule():
    # eps = 0.9 min(1, 30/40) + 0.05 * 20 / (2 * 10) = 0.675 + 0.05
    assert float(global_threshold(30, 40, 20, 10)) == pytest.approx(0.725)
    # growing confident count: ratio capped at 1; no experts yet: 0.9
    assert float(global_threshold(50, 40, 0, 10)) == pytest.approx(0.9)
    # no previous count: ratio 1; clipped at 0.99
    assert float(global_threshold(5, 0, 100, 10)) == pytest.approx(0.99)


def test_learning_status_averages_counts_over_steps():
    st = LearningStatus(2, 0.9, n_active=0, queries=10, momentum=0.5)
    conf = np.array([0.95, 0.95, 0.95, 0.5])
    tau = st.thresholds(conf, np.array([0, 0, 1, 1])).numpy()  # counts [2, 1], eps 0.9, one global cutoff
    np.testing.assert_allclose(tau, [0.9, 0.9], rtol=1e-6)
    # next batch: counts [0, 1] -> average [1, 1]; Count 2 after 3: eps = 0.9 * 2/3
    tau = st.thresholds(np.array([0.5, 0.95]), np.array([0, 1])).numpy()
    np.testing.assert_allclose(tau, [0.6, 0.6], rtol=1e-6)
    assert float(st.steps) == 2 and float(st.threshold) == pytest.approx(0.6)


def test_class_thresholds_are_floored():
    # sigma = [1, .5, 0]: eps sigma / (2 - sigma) = [0.9, 0.3, 0], floored at max(0.9 / 2, 1/3 + 0.05) = 0.45
    np.testing.assert_allclose(class_thresholds([10, 5, 0], 0.9).numpy(), [0.9, 0.45, 0.45], rtol=1e-6)
    # two classes: the floor 1/2 + 0.05 = 0.55 is above eps / 2
    np.testing.assert_allclose(class_thresholds([10, 0], 0.9).numpy(), [0.9, 0.55], rtol=1e-6)
    # nothing counted yet: every class at eps
    np.testing.assert_allclose(class_thresholds([0, 0], 0.9).numpy(), [0.9, 0.9], rtol=1e-6)


# hand-made class probabilities, 3 classes; confident (>= 0.95) counts [4, 3, 0]
HAND_P = np.array([[0.97, 0.02, 0.01]] * 4 + [[0.93, 0.05, 0.02], [0.90, 0.05, 0.05]]
                  + [[0.02, 0.96, 0.02]] * 3 + [[0.30, 0.60, 0.10], [0.25, 0.50, 0.25]]
                  + [[0.25, 0.25, 0.50], [0.30, 0.25, 0.45]], np.float32)


@pytest.mark.parametrize("rule,keep", [
    # eps = 0.9 min(1, 1) + 0.05 * 10 / (2 * 10) = 0.925 for every class
    ("global", [1, 1, 1, 1, 1, 0, 1, 1, 1, 0, 0, 0, 0]),
    # sigma = [1, .75, 0]: tau = [0.925, 0.925 * .75 / 1.25 = 0.555, floor 0.925 / 2 = 0.4625]
    ("per_class", [1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 0, 1, 0]),
])
def test_cutoff_on_hand_made_probabilities(rule, keep):
    st = LearningStatus(3, 0.95, n_active=10, queries=10, rule=rule)
    conf, cls = HAND_P.max(1), HAND_P.argmax(1)
    tau = st.thresholds(conf, cls)
    assert float(st.threshold) == pytest.approx(0.925)
    np.testing.assert_array_equal(confident(conf, cls, tau).numpy(), keep)


# ------------------------------------------------------------------ VAT
def test_vat_on_logistic_model_matches_closed_form():
    """p = sigmoid(w.x): KL depends on the perturbation only through w.r, so the one power
    iteration must land on +-w/|w| and the score equal KL(p || sigmoid(w.x +- eps |w|))."""
    w = tf.constant([[2.0], [-1.0], [0.5]])
    x = tf.constant([[0.3, 0.1, -0.2], [-1.0, 0.5, 0.0]])

    def prob(z):
        return tf.sigmoid(z @ w)

    def kl(p, q):
        return tf.reduce_sum(bernoulli_kl(p, q), axis=1)

    eps = 0.7
    score = vat_score(prob, x, xi=1e-2, eps=eps, seed=(1, 2), kl=kl).numpy()
    p = tf.sigmoid(x @ w).numpy()[:, 0]
    norm = float(tf.norm(w))
    for i in range(2):
        candidates = []
        for sign in (1.0, -1.0):
            q = 1 / (1 + math.exp(-(float((x[i:i + 1] @ w)[0, 0]) + sign * eps * norm)))
            candidates.append(p[i] * math.log(p[i] / q) + (1 - p[i]) * math.log((1 - p[i]) / (1 - q)))
        assert min(abs(score[i] - c) for c in candidates) < 1e-4
        # and no random unit direction beats the better side (brute force)
        rng = np.random.default_rng(0)
        dirs = rng.normal(size=(2000, 3))
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        brute = kl(tf.constant(np.repeat(p[i:i + 1, None], 2000, 0), tf.float32),
                   prob(tf.constant(x[i].numpy() + eps * dirs, tf.float32))).numpy()
        assert brute.max() <= max(candidates) + 1e-5


def test_vat_categorical_zero_for_constant_model():
    def prob(z):
        return tf.nn.softmax(0.0 * z[:, :2] + tf.constant([1.0, 2.0]))

    s = vat_score(prob, tf.ones((3, 4)), seed=(0, 1), kl=categorical_kl).numpy()
    np.testing.assert_allclose(s, 0.0, atol=1e-6)


# ------------------------------------------------------------------ density and selection
def test_knn_density_by_hand():
    # a, b at 0 and 90 degrees, c at 45 degrees; cos(a,b) = 0, cos(a,c) = cos(b,c) = 1/sqrt2
    f = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    r = 1 / math.sqrt(2)
    np.testing.assert_allclose(knn_density(f, 1), [r, r, r])
    np.testing.assert_allclose(knn_density(f, 2), [r / 2, r / 2, r])
    np.testing.assert_allclose(knn_density(f, 2, chunk=1), [r / 2, r / 2, r])


def test_balanced_rank_takes_classes_in_turn():
    nan = np.nan
    s = np.array([[0.9, nan], [0.8, nan], [0.7, nan], [nan, 0.1], [nan, 0.2]])
    np.testing.assert_array_equal(balanced_rank(s), [0, 4, 1, 3, 2])


def test_alternate_union_and_boostmis_select():
    np.testing.assert_array_equal(alternate_union(np.array([3, 1, 2]), np.array([3, 0, 4]), 4), [3, 1, 0, 2])
    vat = np.array([0.1, 0.9, 0.5, 0.8, 0.2])
    nan = np.nan
    dae = np.array([[0.9, nan], [nan, 0.1], [0.3, nan], [nan, 0.7], [0.8, nan]])
    taken = np.array([True, False, False, False, False])  # sample 0 is the pseudo labeller's
    # vat order among free: 1, 3, 2, 4; balanced dae among free: 4 (c0), 3 (c1), 2, 1
    np.testing.assert_array_equal(boostmis_select(vat, dae, taken, 3), [1, 4, 3])
    # a shortfall is filled from the taken samples last
    np.testing.assert_array_equal(boostmis_select(vat, dae, taken, 5)[-1], 0)


# ------------------------------------------------------------------ the segmentation loop
@pytest.mark.slow
def test_boostmis_query_and_trainer_run_the_loop(tiny_data, tmp_path):
    import pandas as pd

    from dsal_tf.active import run_active_learning
    from dsal_tf.config import resolve
    from tests.conftest import tiny_values

    cfg = resolve(tiny_values(tiny_data, tmp_path, query_strategy="boostmis", trainer="boostmis",
                              nb_iterations=1, pseudo_epoch=1, depth=3))
    run = run_active_learning(cfg, log=lambda m: None)
    curve = pd.read_csv(run / "learning_curve.csv")
    assert list(curve["round"]) == [0, 1]
    assert list(curve["n_oracle"]) == [8, 12]
    assert (curve["n_pseudo"] == 0).all()  # its unlabelled stream is the pool: no whole-image pseudo labels
    history = pd.read_csv(run / "round_01" / "history.csv")
    assert (history["kept_fraction"] > 0).any()  # pseudo labels kept on the pool's pixels
    scores = pd.read_csv(run / "round_01" / "scores.csv")
    assert scores["uncertainty"].notna().all() and (scores["uncertainty"] >= 0).all()

    # `dsal features` on the trained run: one pooled bottleneck vector per image, ISIC-style labels
    from dsal_tf.classify import extract_features

    names = sorted(f.stem for f in (tiny_data / "testImg").iterdir())
    labels = tmp_path / "classes.csv"
    pd.DataFrame({"image_id": names, "melanoma": [1.0, 0.0] * (len(names) // 2),
                  "seborrheic_keratosis": [0.0, 1.0] * (len(names) // 2)}).to_csv(labels, index=False)
    out = extract_features(cfg, tiny_data / "testImg", tmp_path / "feats", "test", "last", labels, log=lambda m: None)
    f = np.load(out / "test-features.npy")
    assert f.shape == (len(names), 2 * 2**3) and f.dtype == np.float32  # base 2 filters, depth 3
    np.testing.assert_array_equal(np.load(out / "test-targets.npy"), [1, 2] * (len(names) // 2))
    assert (out / "test-names.txt").read_text().split() == names


def test_boostmis_trainer_labels_from_the_online_model():
    from dsal_tf.model import build_unet
    from dsal_tf.trainers import make_trainer

    unet = build_unet((16, 16, 1), base_filters=2, depth=3)
    trainer = make_trainer("boostmis", unet, loss="bce", n_active=10, queries=10)
    # the online model moves away from the EMA copy (the wrapped segmenter)
    trainer.online.set_weights([w + 0.3 * np.sign(np.sin(np.arange(w.size))).reshape(w.shape)
                                for w in trainer.online.get_weights()])
    x = tf.random.stateless_normal((2, 16, 16, 1), seed=(1, 1))
    target, keep = trainer.pseudo_labels(x)
    p = trainer.online(x)["main"].numpy()
    assert (p > 0.5).astype(np.float32).tolist() != (unet(x)["main"].numpy() > 0.5).astype(np.float32).tolist()
    np.testing.assert_array_equal(target.numpy(), (p > 0.5).astype(np.float32))
    # first step: ratio 1, eps = 0.9 + 0.05 * 10 / 20, one global cutoff
    assert float(trainer.status.threshold) == pytest.approx(0.925)
    np.testing.assert_array_equal(keep.numpy(), (np.maximum(p, 1 - p) >= 0.925).astype(np.float32))


def test_boostmis_trainer_n_active_is_the_last_rounds_labels(monkeypatch):
    """NB_LABELED 4, then two rounds of K = 3: 10 expert images, of which the last round added 3."""
    from types import SimpleNamespace

    import dsal_tf.trainers.boostmis as tb

    seen = []
    monkeypatch.setattr(tb, "fit_on_pool", lambda cls, job, unlabelled: seen.append((cls.n_active, unlabelled)) or {})
    cfg = SimpleNamespace(nb_labeled=4, nb_next_sample=3, batch_size=2)
    for n_expert in (4, 7, 10):
        tb.BoostMISTrainer.fit_job(SimpleNamespace(cfg=cfg, is_pseudo=np.zeros(n_expert, bool), seed=1,
                                                   unlabelled_stream=lambda seed: f"pool batches, seed {seed}"))
    assert seen == [(0, "pool batches, seed 2"), (3, "pool batches, seed 2"), (3, "pool batches, seed 2")]


# ------------------------------------------------------------------ classification on feature vectors
def write_feature_splits(folder, dim=2048, n=(60, 20, 40), n_classes=3, seed=0):
    """Blobs in the seed's format (N x D float32, N int64), one centre per class."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, dim)) * 0.15
    folder.mkdir(parents=True, exist_ok=True)
    for split, size in zip(("train", "val", "test"), n):
        y = np.arange(size) % n_classes
        np.save(folder / f"{split}-features.npy", (centres[y] + rng.normal(size=(size, dim))).astype(np.float32))
        np.save(folder / f"{split}-targets.npy", y.astype(np.int64))
    return folder


def test_macro_f1_by_hand():
    from dsal_tf.classify import macro_f1

    y = np.array([0, 0, 1, 1])
    pred = np.array([0, 1, 1, 1])
    # class 0: 2*1/(2+0+1) = 2/3; class 1: 2*2/(4+1+0) = 4/5
    assert macro_f1(y, pred, 2) == pytest.approx((2 / 3 + 4 / 5) / 2)


@pytest.mark.parametrize("strategy,pseudo", [("boostmis", "adaptive"), ("entropy", "fixed"), ("random", "none")])
def test_classify_loop_writes_results_and_resumes(tmp_path, strategy, pseudo):
    import pandas as pd

    from dsal_tf.classify import run_classify

    feats = write_feature_splits(tmp_path / "f")
    run = run_classify(feats, tmp_path / "exp" / "c", labeled=6, queries=5, iterations=1, strategy=strategy,
                       pseudo=pseudo, steps=5, batch_size=16, log=lambda m: None)
    rows = pd.read_csv(run / "results.csv")
    assert list(rows.columns) == ["round", "n_labelled", "n_pseudo", "accuracy", "macro_f1"]
    assert list(rows["n_labelled"]) == [6, 11] and rows["accuracy"].between(0, 1).all()
    if pseudo == "none":
        assert (rows["n_pseudo"] == 0).all()
    assert (run / "learning_curve.png").stat().st_size > 0
    first = np.load(run / "round_00.npz")["labelled"]
    assert set(first) <= set(np.load(run / "round_01.npz")["labelled"])
    # resume: more iterations continue after the finished rounds, which stay as they were
    run_classify(feats, run, labeled=6, queries=5, iterations=2, strategy=strategy, pseudo=pseudo, steps=5,
                 batch_size=16, log=lambda m: None)
    again = pd.read_csv(run / "results.csv")
    assert list(again["n_labelled"]) == [6, 11, 16]
    pd.testing.assert_frame_equal(again.iloc[:2], rows)


def test_classify_bad_input_names_the_file(tmp_path):
    from dsal_tf.classify import run_classify
    from dsal_tf.errors import DsalError

    feats = write_feature_splits(tmp_path / "f", dim=4)
    np.save(feats / "val-targets.npy", np.zeros(3, np.float32))
    with pytest.raises(DsalError, match="val-targets.npy"):
        run_classify(feats, tmp_path / "exp" / "c", 4, 2, 1)
    np.save(feats / "val-targets.npy", np.zeros(20, np.int64))
    (feats / "test-features.npy").unlink()
    with pytest.raises(DsalError, match="test-features.npy not found"):
        run_classify(feats, tmp_path / "exp" / "c", 4, 2, 1)


def test_classify_settings_are_the_arguments(tmp_path):
    """`settings=ClassifySettings(...)` is the argument form (the CLI's, positional), checked when made; a
    resumed run must have the settings it started with (more iterations excepted)."""
    import pandas as pd

    from dsal_tf.classify import ClassifySettings, run_classify
    from dsal_tf.errors import DsalError

    feats = write_feature_splits(tmp_path / "f", dim=8)
    quiet = dict(log=lambda m: None)
    s = ClassifySettings(6, 5, 1, "entropy", "fixed", steps=3, batch_size=8)
    a = run_classify(feats, tmp_path / "a", settings=s, **quiet)
    b = run_classify(feats, tmp_path / "b", 6, 5, 1, "entropy", "fixed", steps=3, batch_size=8, **quiet)
    pd.testing.assert_frame_equal(pd.read_csv(a / "results.csv"), pd.read_csv(b / "results.csv"))
    assert (a / "settings.json").read_text() == (b / "settings.json").read_text()
    with pytest.raises(DsalError, match="started with other settings"):
        run_classify(feats, a, 6, 5, 2, "entropy", "fixed", steps=4, batch_size=8, **quiet)
    with pytest.raises(TypeError, match="not both"):
        run_classify(feats, tmp_path / "c", 6, settings=s)
    with pytest.raises(DsalError, match="--strategy must be one of"):
        ClassifySettings(6, 5, 1, strategy="nope")
    with pytest.raises(DsalError, match="--labeled >= 1"):
        ClassifySettings(0, 5, 1)
    assert not (tmp_path / "c").exists()


def test_classify_n_active_and_one_head_through_the_rounds(tmp_path, monkeypatch):
    """N_A = the labels the last round added (0, then 5, 5), and with BOOSTMIS_FRESH_HEAD off each round trains
    on from the last head."""
    import dsal_tf.classify as dc

    calls = []
    real = dc.Booster

    def spy(head, ema_head, rule, *args, **kwargs):
        calls.append((rule.n_active, rule.status.n_active, head, [w.copy() for w in head.get_weights()]))
        return real(head, ema_head, rule, *args, **kwargs)

    monkeypatch.setattr(dc, "Booster", spy)
    run = dc.run_classify(write_feature_splits(tmp_path / "f", dim=8), tmp_path / "c", labeled=6, queries=5,
                          iterations=2, steps=3, batch_size=8, log=lambda m: None, boostmis_fresh_head=False)
    assert [c[:2] for c in calls] == [(0, 0), (5, 5), (5, 5)]
    assert calls[1][2] is calls[0][2] is calls[2][2]
    with np.load(run / "round_01.npz") as z:  # round 1 starts where round 0 ended
        for i, w in enumerate(calls[1][3]):
            np.testing.assert_array_equal(z[f"online_{i}"], w)
    assert any(not np.array_equal(a, b) for a, b in zip(calls[0][3], calls[1][3]))


def test_classify_registries_match_the_cli_and_the_config():
    from dsal_tf.classify import PSEUDO, PSEUDO_RULES, QUERIES, STRATEGIES, AdaptiveCutoff, FeatureQuery
    from dsal_tf.cli import classify
    from dsal_tf.config import Config

    options = {o.name: o for o in classify.params}
    assert list(options["strategy"].type.choices) == list(QUERIES) == list(STRATEGIES)
    assert list(options["pseudo"].type.choices) == list(PSEUDO_RULES) == list(PSEUDO)
    assert all(QUERIES[n].name == n for n in QUERIES) and all(PSEUDO_RULES[n].name == n for n in PSEUDO_RULES)
    from dsal_tf.strategies.boostmis import BoostMISQuery
    from dsal_tf.trainers.booster import Booster
    from dsal_tf.trainers.boostmis import BoostMISTrainer

    cfg, rule, query = Config(), AdaptiveCutoff(3, 0, 5), FeatureQuery()
    seg_query, seg_trainer = BoostMISQuery.Settings(), BoostMISTrainer.Settings()
    classify = Booster.Settings()  # feature vectors: the ablation's defaults
    assert (rule.tau, rule.threshold) == (classify.boostmis_tau, classify.boostmis_threshold)
    assert rule.tau == seg_trainer.boostmis_tau
    assert (query.xi, query.eps, query.knn, query.seed) == (seg_query.boostmis_xi, seg_query.boostmis_eps,
                                                             seg_query.boostmis_knn, cfg.seed)


@pytest.mark.parametrize("name,keep", [
    # confident (>= 0.95) counts [4, 3, 0]; first batch: eps = 0.9 + 0.05 * 10 / (2 * 10) = 0.925
    ("adaptive", [1, 1, 1, 1, 1, 0, 1, 1, 1, 0, 0, 0, 0]),
    ("fixed", [1, 1, 1, 1, 0, 0, 1, 1, 1, 0, 0, 0, 0]),  # FixMatch: 0.95
    ("none", [0] * 13),
])
def test_classify_pseudo_rules_on_hand_made_probabilities(name, keep):
    from dsal_tf.classify import PSEUDO_RULES

    rule = PSEUDO_RULES[name](3, n_active=10, queries=10, threshold="global")
    conf, cls = HAND_P.max(1), HAND_P.argmax(1)
    np.testing.assert_array_equal(confident(conf, cls, rule.cutoffs(conf, cls)).numpy(), keep)


class FixedHead:
    """A stand-in head with given class probabilities and features, whatever the input."""

    def __init__(self, p, features):
        self.p, self.features = tf.constant(p), tf.constant(features)

    def __call__(self, x, training=False):
        return {"prob": self.p, "features": self.features}


def test_classify_queries_rank_by_hand(monkeypatch):
    import dsal_tf.classify as dc

    p = np.array([[0.9, 0.1], [0.5, 0.5], [0.7, 0.3], [0.4, 0.6], [0.99, 0.01]], np.float32)
    f = np.array([[1, 0], [0, 1], [1, 1], [0, 1], [1, 0]], np.float32)
    head, x, free = FixedHead(p, f), np.zeros((5, 2), np.float32), np.zeros(5, bool)
    # entropy: the even split, then 0.4 / 0.6, then 0.7 / 0.3
    np.testing.assert_array_equal(dc.QUERIES["entropy"]()(head, x, free, 3, None), [1, 3, 2])
    # random: the generator's permutation; n is cut to the pool
    np.testing.assert_array_equal(dc.QUERIES["random"]()(head, x, free, 9, np.random.default_rng(4)),
                                  np.random.default_rng(4).permutation(5))
    # boostmis: density (k = 1) = best cosine to another sample: [1, 1, 1/sqrt2, 1, 1]; density-aware
    # entropy in the column of the predicted class; VAT given
    seen = {}
    monkeypatch.setattr(dc, "vat_score", lambda *a, **k: tf.constant([0.0, 0.1, 0.9, 0.2, 0.3]))
    real = dc.boostmis_select
    monkeypatch.setattr(dc, "boostmis_select", lambda vat, dae, *a: seen.update(dae=dae) or real(vat, dae, *a))
    taken = np.array([True, False, False, False, False])
    picks = dc.QUERIES["boostmis"](knn=1)(head, x, taken, 3, None)

    def h(q):
        return -(q * math.log(q) + (1 - q) * math.log(1 - q))

    nan = np.nan
    expected = [[h(0.9), nan], [h(0.5), nan], [h(0.7) / math.sqrt(2), nan], [nan, h(0.4)], [h(0.99), nan]]
    np.testing.assert_allclose(seen["dae"], expected, rtol=1e-5)
    # among the free: by VAT 2, 4, 3, 1; class-balanced by dae 1 (c0), 3 (c1), 2, 4; alternating
    np.testing.assert_array_equal(picks, [2, 1, 4])


def test_booster_pseudo_labels_from_the_online_head():
    import keras

    from dsal_tf.classify import PSEUDO_RULES, build_head
    from dsal_tf.trainers import Booster

    keras.utils.set_random_seed(0)
    head, ema_head = build_head(4, 3, hidden=8), build_head(4, 3, hidden=8)
    x = tf.random.stateless_normal((64, 4), seed=(2, 3))
    booster = Booster(head, ema_head, PSEUDO_RULES["fixed"](3, n_active=0, queries=5), seed=0)  # EMA 0.99
    cls, keep = booster.pseudo_labels(x)
    p = head(x)["prob"].numpy()
    assert not np.array_equal(p.argmax(1), ema_head(x)["prob"].numpy().argmax(1))
    np.testing.assert_array_equal(cls.numpy(), p.argmax(1))
    np.testing.assert_array_equal(keep.numpy(), (p.max(1) >= 0.95).astype(np.float32))
