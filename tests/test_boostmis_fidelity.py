"""Issue 27.2: the settings where BoostMIS's authors' code differs from ours, on hand-made cases
(the constant cutoff, the class-balanced first labels, the authors' SGD with coupled weight decay,
distribution alignment, the EMA labeller, the warm-up, the per-class pseudo-label tally)."""

import numpy as np
import pytest
import tensorflow as tf

from dsal_tf.errors import DsalError
from dsal_tf.strategies.boostmis import LearningStatus, align_distribution, confident, constant_threshold
from dsal_tf.trainers.booster import Booster, balanced_initial, pseudo_label_tally
from dsal_tf.trainers.boostmis import BoostMISTrainer, l2_gradients, make_optimizer

CONF = np.array([0.99, 0.9501, 0.9499, 0.93, 0.91, 0.6], np.float32)


def test_constant_cutoff_keeps_exactly_the_items_at_095_whatever_the_counts():
    assert constant_threshold() == pytest.approx(0.95)
    cls = np.array([0, 1, 0, 1, 0, 1])
    # N_A = 0: the adaptive rule would start at eps = 0.9 and keep 0.93 and 0.91 as well
    adaptive = LearningStatus(2, 0.95, n_active=0, queries=10)
    np.testing.assert_array_equal(confident(CONF, cls, adaptive.thresholds(CONF, cls)).numpy(), [1, 1, 1, 1, 1, 0])
    status = LearningStatus(2, 0.95, n_active=0, queries=10, cutoff="constant")
    for conf in (CONF, np.full(6, 0.5, np.float32), CONF):  # the confident count falls to 0 and comes back
        keep = confident(conf, cls, status.cutoffs(conf, cls)).numpy()
        np.testing.assert_array_equal(keep, (conf >= 0.95).astype(np.float32))
    assert float(status.threshold.numpy()) == pytest.approx(0.95)


def test_constant_cutoff_under_per_class_thresholds_scales_095():
    # counts at tau 0.95: class 0 has 2, class 1 has 1 -> sigma = [1, 0.5]; tau = 0.95 * sigma / (2 - sigma)
    # = [0.95, 0.3167], floored at max(0.95 / 2, 1/2 + 0.05) = 0.55
    conf = np.array([0.99, 0.96, 0.97, 0.6, 0.56, 0.54], np.float32)
    cls = np.array([0, 0, 1, 1, 1, 1])
    status = LearningStatus(2, 0.95, n_active=0, queries=10, rule="per_class", cutoff="constant")
    np.testing.assert_allclose(status.cutoffs(conf, cls).numpy(), [0.95, 0.55], rtol=1e-6)


def test_unknown_cutoff_names_the_setting():
    with pytest.raises(DsalError, match="BOOSTMIS_CUTOFF"):
        LearningStatus(2, 0.95, 0, 10, cutoff="fixed")
    with pytest.raises(DsalError, match="BOOSTMIS_OPTIMIZER"):
        BoostMISTrainer.Settings.from_values({"boostmis_optimizer": "sdg"})
    with pytest.raises(DsalError, match="BOOSTMIS_INITIAL"):
        Booster.Settings.from_values({"boostmis_initial": "stratified"})


@pytest.mark.parametrize("counts,n,expected", [
    ([60, 30, 10], 30, [10, 10, 10]),
    ([60, 30, 10], 31, None),  # one class gets the extra label: 11/10/10 in some order
    ([50, 20, 3], 30, [14, 13, 3]),  # class 2 gives all it has; 27 split as evenly as possible (order may vary)
    ([5, 2], 10, [5, 2]),  # the whole pool
])
def test_balanced_initial_counts(counts, n, expected):
    y = np.repeat(np.arange(len(counts)), counts)
    y = y[np.random.default_rng(1).permutation(len(y))]
    idx = balanced_initial(y, n, np.random.default_rng(0))
    assert len(idx) == min(n, len(y)) == len(np.unique(idx)) and np.all(np.diff(idx) > 0)
    got = np.bincount(y[idx], minlength=len(counts))
    if expected is None:
        assert sorted(got) == [10, 10, 11]
    elif expected == [14, 13, 3]:
        assert sorted(got[:2]) == [13, 14] and got[2] == 3
    else:
        np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(idx, balanced_initial(y, n, np.random.default_rng(0)))  # seeded


def test_authors_optimizer_settings():
    optimizer, wd = make_optimizer("sgd")
    assert (float(optimizer.learning_rate), optimizer.momentum, wd) == (pytest.approx(0.03), 0.9, 5e-4)
    assert not optimizer.nesterov and optimizer.weight_decay is None  # the decay is ours, coupled
    adam, wd = make_optimizer("adam")
    assert type(adam).__name__ == "Adam" and float(adam.learning_rate) == pytest.approx(1e-3) and wd == 0.0


@pytest.mark.parametrize("wd", [5e-4, 0.1])
def test_sgd_with_coupled_weight_decay_on_a_linear_model_by_hand(wd):
    """Two steps of the authors' SGD (0.03, momentum 0.9, weight decay added to the kernel's gradient,
    PyTorch's rule: buf = 0.9 buf + g + wd w, w -= lr buf) on L = mean((x w + b - t)^2); wd = 0.1
    makes the decay visible above float32 rounding."""
    import keras

    x = np.array([[1.0, 2.0], [-1.0, 0.5], [0.5, -1.5]], np.float32)
    t = np.array([[1.0], [0.0], [-2.0]], np.float32)
    w0, b0 = np.array([[0.3], [-0.2]], np.float32), np.array([0.1], np.float32)
    layer = keras.layers.Dense(1)
    layer.build((None, 2))
    layer.set_weights([w0, b0])
    optimizer = make_optimizer("sgd")[0]
    for _ in range(2):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(layer(x) - t))
        variables = layer.trainable_variables
        optimizer.apply_gradients(zip(l2_gradients(tape.gradient(loss, variables), variables, wd), variables))

    def by_hand(decay):
        w, b = w0.astype(np.float64), b0.astype(np.float64)
        buf_w, buf_b = np.zeros_like(w), np.zeros_like(b)
        for _ in range(2):
            r = x @ w + b - t
            g_w = 2 * x.T @ r / len(x) + decay * w  # the kernel decays
            g_b = 2 * r.mean(0)  # the bias does not
            buf_w, buf_b = 0.9 * buf_w + g_w, 0.9 * buf_b + g_b
            w, b = w - 0.03 * buf_w, b - 0.03 * buf_b
        return w, b

    w, b = by_hand(wd)
    np.testing.assert_allclose(layer.get_weights()[0], w, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(layer.get_weights()[1], b, rtol=1e-6, atol=1e-7)
    if wd == 0.1:  # decoupled (Keras's weight_decay) or no decay would land elsewhere
        assert np.abs(by_hand(0.0)[0] - w).max() > 1e-3


def test_pseudo_label_tally_by_hand():
    cls = np.array([0, 0, 0, 1, 1, 2, 2, 0])
    keep = np.array([1, 1, 0, 1, 1, 1, 0, 1], np.float32)
    target = np.array([0, 1, 0, 1, 0, 2, 2, 0])
    kept, right = pseudo_label_tally(cls, keep, target, 3)
    # class 0: kept items 0, 1, 7 (right: 0, 7); class 1: 3, 4 (right: 3); class 2: 5 (right: 5)
    np.testing.assert_array_equal(kept.numpy(), [3, 2, 1])
    np.testing.assert_array_equal(right.numpy(), [2, 1, 1])


def test_distribution_alignment_by_hand():
    p = np.array([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]], np.float32)
    # p_model = the predictions' own mean over the classes seen, target uniform: the first row flattens
    out = align_distribution(p, [0.6, 0.3, 0.1], [1 / 3, 1 / 3, 1 / 3]).numpy()
    q = np.array([0.2 / 0.6, 0.2 / 0.3, 0.6 / 0.1])
    np.testing.assert_allclose(out, [[1 / 3] * 3, q / q.sum()], rtol=1e-5)


def small_booster(labeller="online", warmup=0, step0=0, n=32):
    import keras

    from dsal_tf.classify import PSEUDO_RULES, build_head

    keras.utils.set_random_seed(0)
    head, ema_head = build_head(4, 3, hidden=8), build_head(4, 3, hidden=8)
    rule = PSEUDO_RULES["fixed"](3, n_active=0, queries=5, tau=0.0)  # every label kept
    booster = Booster(head, ema_head, rule, seed=0, step0=step0,
                      settings=Booster.Settings(boostmis_labeller=labeller, boostmis_warmup=warmup))
    booster.compile(optimizer=keras.optimizers.Adam(1e-3))
    x = tf.random.stateless_normal((n, 4), seed=(2, 3))
    y = tf.constant(np.arange(n) % 3)
    return booster, x, y


def test_booster_tallies_the_pseudo_labels_it_learns(monkeypatch):
    import dsal_tf.trainers.booster as tb

    monkeypatch.setattr(tb, "WEAK_NOISE", 0.0)  # the weak view is the batch itself
    booster, x, y = small_booster()
    pred = booster.head(x)["prob"].numpy().argmax(1)  # before the update: what the step labels with
    ds = tf.data.Dataset.from_tensors(((x, y), (x[:8], y[:8])))
    booster.fit(ds, epochs=1, verbose=0)
    np.testing.assert_array_equal(booster.pl_kept.numpy(), np.bincount(pred, minlength=3))
    np.testing.assert_array_equal(booster.pl_correct.numpy(), np.bincount(pred[pred == y.numpy()], minlength=3))


def test_booster_warmup_counts_updates_through_the_rounds():
    # warm-up 5, this round starts at update 3 of the run: updates 3 and 4 learn no pseudo label, 5 does
    booster, x, y = small_booster(warmup=5, step0=3, n=16)
    ds = tf.data.Dataset.from_tensors(((x, y), (x[:8], y[:8]))).repeat(3)
    booster.fit(ds, epochs=1, verbose=0)
    assert booster.pl_kept.numpy().sum() == 16


def test_booster_ema_labeller_labels_with_the_ema_head():
    booster, x, _ = small_booster(labeller="ema")
    cls, keep = booster.pseudo_labels(x)
    ema_pred = booster.ema_head(x)["prob"].numpy().argmax(1)
    assert not np.array_equal(ema_pred, booster.head(x)["prob"].numpy().argmax(1))
    np.testing.assert_array_equal(cls.numpy(), ema_pred)


def test_defaults_and_the_booster_shares_the_segmentation_trainers_settings():
    """Feature vectors default to the configuration that beat the no-pseudo-label baseline in the ablation (a
    fresh head each round, the global cutoff, SGD); the segmentation trainer keeps the paper's global cutoff and
    Adam (the ablation ran on features only)."""
    from dsal_tf.config import Config

    s = Booster.Settings()
    assert (s.boostmis_cutoff, s.boostmis_threshold, s.boostmis_labeller, s.boostmis_warmup, s.boostmis_optimizer,
            s.boostmis_initial, s.boostmis_align, s.ema_decay, s.boostmis_fresh_head) == (
        "adaptive", "global", "online", 0, "sgd", "random", False, 0.99, True)
    seg = BoostMISTrainer.Settings()
    assert (seg.boostmis_threshold, seg.boostmis_optimizer) == ("global", "adam")
    assert set(BoostMISTrainer.Settings.__dataclass_fields__) < set(Booster.Settings.__dataclass_fields__)
    cfg = Config(settings={"boostmis_optimizer": "sgd", "boostmis_cutoff": "constant", "boostmis_warmup": 7})
    kwargs = BoostMISTrainer.config_kwargs(cfg, 100)
    s = kwargs["settings"]
    assert (s.boostmis_cutoff, s.boostmis_warmup, s.boostmis_optimizer) == ("constant", 7, "sgd")
    opt = BoostMISTrainer.optimizer_for(cfg)
    assert type(opt).__name__ == "SGD" and float(opt.learning_rate) == pytest.approx(0.03)
    assert type(BoostMISTrainer.optimizer_for(Config())).__name__ == "Adam"


# ------------------------------------------------------------------ dsal classify reads Booster.Settings
def test_classify_settings_carry_every_booster_setting_with_its_defaults():
    from dsal_tf.classify import ClassifySettings, booster_options

    s = ClassifySettings(6, 5, 1)
    assert s.booster == Booster.Settings()  # META_SIZE aside, every field, the defaults
    authors = Booster.Settings(boostmis_cutoff="constant", boostmis_initial="balanced", boostmis_optimizer="sgd",
                               ema_decay=0.999, boostmis_threshold="per_class")
    t = ClassifySettings(6, 5, 1, **booster_options(authors))
    assert t.booster == authors and t.threshold == "per_class"
    assert t.record("f")["boostmis_cutoff"] == "constant"


@pytest.mark.parametrize("values,match", [
    ({"boostmis_cutoff": "fixed"}, "BOOSTMIS_CUTOFF = 'fixed' is not one of"),
    ({"boostmis_initial": "stratified"}, "BOOSTMIS_INITIAL"),
    ({"boostmis_warmup": "one round"}, "BOOSTMIS_WARMUP in dsal classify"),
    ({"ema_decay": 1.5}, "EMA_DECAY must be in"),
])
def test_classify_bad_booster_setting_is_one_line(values, match):
    from dsal_tf.classify import ClassifySettings

    with pytest.raises(DsalError, match=match) as err:
        ClassifySettings(6, 5, 1, **values)
    assert "\n" not in str(err.value)


def test_classify_options_from_constants():
    from dsal_tf.classify import classify_options

    got = classify_options({"BOOSTMIS_CUTOFF": "constant", "EMA_DECAY": "0.999", "BOOSTMIS_ALIGN": "on",
                            "BOOSTMIS_THRESHOLD": "per_class"})
    assert (got["boostmis_cutoff"], got["ema_decay"], got["boostmis_align"], got["threshold"]) == (
        "constant", 0.999, True, "per_class")
    assert got["boostmis_optimizer"] == "sgd"  # the rest: dsal classify's defaults
    with pytest.raises(DsalError, match="--set BOOSTMIS_CUTOF: dsal classify takes .*BOOSTMIS_CUTOFF"):
        classify_options({"BOOSTMIS_CUTOF": "constant"})
    with pytest.raises(DsalError, match="META_SIZE"):  # a segmentation setting, not the head's
        classify_options({"META_SIZE": 3})


def test_classify_loop_hands_the_settings_to_the_booster(tmp_path, monkeypatch):
    """The authors' configuration reaches the loop: balanced first labels, the constant cutoff, SGD with
    coupled decay, EMA 0.999, the EMA labeller, the warm-up, distribution alignment towards the labels."""
    import dsal_tf.classify as dc

    from .test_boostmis import write_feature_splits

    seen = []
    real = dc.Booster

    def spy(head, ema_head, rule, seed, **kwargs):
        booster = real(head, ema_head, rule, seed, **kwargs)
        seen.append((rule, kwargs, booster))
        return booster

    monkeypatch.setattr(dc, "Booster", spy)
    feats = write_feature_splits(tmp_path / "f", dim=8, n=(61, 20, 40))  # classes 21/20/20
    records = []
    s = dc.ClassifySettings(6, 5, 1, "random", "adaptive", steps=3, batch_size=8, boostmis_cutoff="constant",
                            boostmis_initial="balanced", boostmis_optimizer="sgd", ema_decay=0.999,
                            boostmis_labeller="ema", boostmis_warmup=3, boostmis_align=True)
    run = dc.classify_loop(feats, tmp_path / "c", s, log=lambda m: None, on_round=records.append)
    y = np.load(feats / "train-targets.npy")
    np.testing.assert_array_equal(np.bincount(y[np.load(run / "round_00.npz")["labelled"]]), [2, 2, 2])
    rule, kwargs, booster = seen[0]
    assert (rule.status.constant, booster.ema, booster.use_ema_labels, booster.warmup, booster.weight_decay) == (
        True, 0.999, True, 3, 5e-4)
    np.testing.assert_allclose(kwargs["p_target"], [1 / 3] * 3)
    assert type(booster.optimizer).__name__ == "SGD"
    # round 0 is all warm-up (3 updates); round 1 learns pseudo labels, and on_round reports what results.csv has
    assert [float(np.sum(r["pl_kept"])) for r in records][0] == 0.0
    table = __import__("pandas").read_csv(run / "results.csv")
    assert list(table["n_labelled"]) == [r["n_labelled"] for r in records] == [6, 11]
    np.testing.assert_allclose(table["accuracy"], [r["accuracy"] for r in records], atol=5e-6)
    yt = np.load(feats / "test-targets.npy")
    assert records[-1]["accuracy"] == np.mean(records[-1]["test_pred"] == yt)
    assert np.all(records[-1]["pl_correct"] <= records[-1]["pl_kept"])


def test_classify_resumes_a_run_recorded_before_the_booster_settings(tmp_path):
    """A settings.json without the Booster.Settings fields ran with the defaults of its day (the global cutoff,
    Adam, one head): it resumes when asked with those; a run asked with other settings (today's) does not."""
    import json

    from dsal_tf.classify import ClassifySettings, classify_loop

    from .test_boostmis import write_feature_splits

    feats = write_feature_splits(tmp_path / "f", dim=8)
    quiet = dict(log=lambda m: None)
    then = dict(threshold="global", boostmis_optimizer="adam", boostmis_fresh_head=False)
    run = classify_loop(feats, tmp_path / "c", ClassifySettings(6, 5, 0, "random", "none", steps=2, batch_size=8,
                                                                **then), **quiet)
    saved = json.loads((run / "settings.json").read_text())
    old = {k: v for k, v in saved.items() if not k.startswith(("boostmis_", "ema_"))}
    (run / "settings.json").write_text(json.dumps(old))
    classify_loop(feats, run, ClassifySettings(6, 5, 1, "random", "none", steps=2, batch_size=8, **then), **quiet)
    assert json.loads((run / "settings.json").read_text()) == saved
    with pytest.raises(DsalError, match="started with other settings"):
        classify_loop(feats, run, ClassifySettings(6, 5, 2, "random", "none", steps=2, batch_size=8), **quiet)
    # a run from between the two changes recorded per_class and sgd, not the head policy: it trained one head
    between = dict(threshold="per_class", boostmis_optimizer="sgd", boostmis_fresh_head=False)
    run2 = classify_loop(feats, tmp_path / "c2", ClassifySettings(6, 5, 0, "random", "none", steps=2, batch_size=8,
                                                                  **between), **quiet)
    saved = json.loads((run2 / "settings.json").read_text())
    (run2 / "settings.json").write_text(json.dumps({k: v for k, v in saved.items() if k != "boostmis_fresh_head"}))
    classify_loop(feats, run2, ClassifySettings(6, 5, 1, "random", "none", steps=2, batch_size=8, **between), **quiet)
    with pytest.raises(DsalError, match="started with other settings"):  # today's fresh head is another setting
        classify_loop(feats, run2, ClassifySettings(6, 5, 2, "random", "none", steps=2, batch_size=8,
                                                    threshold="per_class"), **quiet)


def test_a_fresh_head_run_resumed_between_rounds_equals_the_run_in_one_go(tmp_path):
    """Each round rebuilt from the first weights: stopping after round 0 and resuming gives the same rows and
    the same labelled sets as running both rounds at once."""
    import pandas as pd

    from dsal_tf.classify import ClassifySettings, classify_loop

    from .test_boostmis import write_feature_splits

    feats = write_feature_splits(tmp_path / "f", dim=8)
    quiet = dict(log=lambda m: None)

    def settings(iterations):
        return ClassifySettings(6, 5, iterations, "boostmis", "adaptive", steps=4, batch_size=8)

    whole = classify_loop(feats, tmp_path / "whole", settings(2), **quiet)
    classify_loop(feats, tmp_path / "parts", settings(0), **quiet)
    parts = classify_loop(feats, tmp_path / "parts", settings(2), **quiet)
    pd.testing.assert_frame_equal(pd.read_csv(whole / "results.csv"), pd.read_csv(parts / "results.csv"))
    for r in range(4):
        with np.load(whole / f"round_{r:02d}.npz") as a, np.load(parts / f"round_{r:02d}.npz") as b:
            np.testing.assert_array_equal(a["labelled"], b["labelled"])


def test_dsal_classify_takes_the_booster_settings_on_the_command_line(tmp_path):
    """`dsal classify --set BOOSTMIS_CUTOFF=constant` reaches the run's settings.json; a bad value or a name
    the loop does not take is one line, exit 2, nothing written."""
    import json

    from click.testing import CliRunner

    from dsal_tf.cli import cli

    from .test_boostmis import write_feature_splits

    feats = write_feature_splits(tmp_path / "f", dim=8, n=(30, 10, 10))
    base = ["classify", "--features", str(feats), "--exp-dir", str(tmp_path / "exp"), "--labeled", "6",
            "--queries", "3", "--iterations", "1", "--steps", "2"]
    for bad, says in ((["--set", "BOOSTMIS_CUTOFF=fixed"], "BOOSTMIS_CUTOFF"), (["--set", "META_SIZE=4"], "META_SIZE")):
        result = CliRunner().invoke(cli, [*base, "--exp", "bad", *bad])
        assert result.exit_code == 2 and says in result.output and result.output.count("\n") == 1, result.output
        assert not (tmp_path / "exp" / "bad").exists()
    result = CliRunner().invoke(cli, [*base, "--exp", "good", "--set", "BOOSTMIS_CUTOFF=constant"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "exp" / "good" / "settings.json").read_text())["boostmis_cutoff"] == "constant"


@pytest.mark.parametrize("fresh", [True, False])
def test_each_round_starts_from_the_first_weights_or_from_the_last(tmp_path, monkeypatch, fresh):
    """BOOSTMIS_FRESH_HEAD: every round's Booster gets both heads at the run's first weights and counts its
    updates from 0 (the EMA warm-up again); off, later rounds start from the trained heads, their updates
    counted after the earlier rounds' (tests/test_boostmis.py checks the weights round_01.npz holds)."""
    import dsal_tf.classify as dc

    from .test_boostmis import write_feature_splits

    seen = []
    real = dc.Booster

    def spy(head, ema_head, rule, seed, **kwargs):
        seen.append(([w.copy() for w in head.get_weights()], [w.copy() for w in ema_head.get_weights()],
                     kwargs["step0"]))
        return real(head, ema_head, rule, seed, **kwargs)

    monkeypatch.setattr(dc, "Booster", spy)
    feats = write_feature_splits(tmp_path / "f", dim=8)
    s = dc.ClassifySettings(6, 5, 2, "random", "adaptive", steps=4, batch_size=8, boostmis_fresh_head=fresh)
    dc.classify_loop(feats, tmp_path / "c", s, log=lambda m: None)
    first = seen[0][0]

    def at_first(weights):
        return all(np.array_equal(a, b) for a, b in zip(weights, first))

    assert at_first(seen[0][1])  # round 0: the EMA head is the online head's copy
    assert [at_first(online) and at_first(ema) for online, ema, _ in seen[1:]] == [fresh, fresh]
    assert [step0 for *_, step0 in seen] == ([0, 0, 0] if fresh else [0, 4, 8])
