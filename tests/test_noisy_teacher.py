"""Noisy-teacher re-weighting (trainers/reweight.py) and its uniform control: batched scores against
brute-force per-sample gradients, weights by hand, and what the compiled step does with them."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import pytest
import tensorflow as tf

from dsal_tf import trainers as nt
from dsal_tf.model import build_unet

SHAPE = (16, 16, 3)
DS = (0.6, 0.3, 0.1)


def _unet(seed: int = 0, dropout: float = 0.0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return build_unet(SHAPE, base_filters=2, depth=3, dropout=dropout)  # depth 2 has no 1/4 head


def _batch(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, *SHAPE)).astype("float32")
    y = (rng.random((n, *SHAPE[:2], 1)) > 0.6).astype("float32")
    return x, y


def _rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def setup():
    model = _unet()
    return model, _batch(4, 1), _batch(3, 2)


def _grad(tape, target, sources) -> list:
    return [tf.zeros_like(s) if g is None else g for s, g in zip(sources, tape.gradient(target, sources))]


def _per_sample_grads(model, x, y, loss, sources, ds=DS):
    """Brute force: one backward pass per sample."""
    loss_fn = nt.resolve_loss(loss)
    grads = []
    for i in range(len(x)):
        with tf.GradientTape() as tape:
            li = nt.per_sample_loss(model(x[i : i + 1]), y[i : i + 1], loss_fn, ds)[0]
        grads.append(_grad(tape, li, sources))
    return grads


def _dot(a, b) -> float:
    return sum(float(tf.reduce_sum(u * v)) for u, v in zip(a, b))


# ------------------------------------------------------------------ scores vs brute force
@pytest.mark.parametrize("loss", ["bce_dice", "dice", "bce"])
def test_trust_scores_match_per_sample_gradients(setup, loss):
    model, (xn, yn), (xc, yc) = setup
    variables = model.trainable_variables
    with tf.GradientTape() as tape:
        clean = tf.reduce_mean(nt.per_sample_loss(model(xc), yc, nt.resolve_loss(loss), DS))
    g_clean = _grad(tape, clean, variables)
    expected = [_dot(g_i, g_clean) for g_i in _per_sample_grads(model, xn, yn, loss, variables)]
    e = nt.trust_scores(model, xn, yn, xc, yc, loss=loss, ds_weights=DS)
    assert e.shape == (4,)
    assert _rel_err(e, expected) < 1e-4


@pytest.mark.compiled  # checks the scores in graph mode, as inside `fit`
def test_trust_scores_include_side_heads(setup):
    """The side heads' bilinear upsampling has no forward-mode rule in TF; e must still count them.

    Also checks the scores inside `tf.function`, where the trainer computes them."""
    model, (xn, yn), (xc, yc) = setup
    side_only = (0.0, 0.7, 0.3)
    variables = model.trainable_variables
    with tf.GradientTape() as tape:
        clean = tf.reduce_mean(nt.per_sample_loss(model(xc), yc, nt.resolve_loss("bce_dice"), side_only))
    g_clean = _grad(tape, clean, variables)
    scores = tf.function(lambda: nt.trust_scores(model, xn, yn, xc, yc, ds_weights=side_only))
    e = scores()  # graph mode, as inside `fit`
    expected = [
        _dot(g_i, g_clean) for g_i in _per_sample_grads(model, xn, yn, "bce_dice", variables, side_only)
    ]
    assert np.abs(expected).max() > 0
    assert _rel_err(e, expected) < 1e-4


@pytest.mark.parametrize("loss", ["bce_dice", "dice"])
def test_informativeness_matches_kernel_gradients(setup, loss):
    model, (xn, yn), _ = setup
    kernel = model.get_layer("main_logits").kernel
    expected = [float(tf.reduce_mean(tf.abs(g[0]))) for g in _per_sample_grads(model, xn, yn, loss, [kernel])]
    g = nt.informativeness_scores(model, xn, yn, loss=loss, ds_weights=DS)
    assert g.shape == (4,)
    assert _rel_err(g, expected) < 1e-4


def test_kernel_gradient_magnitude_by_hand():
    # one sample, 2 pixels, 2 channels: dL/dW = [1*2 + 3*(-1), 2*2 + 0*(-1)] = [-1, 4] -> mean |.| = 2.5
    features = tf.constant([[[[1.0, 2.0], [3.0, 0.0]]]])  # [1,1,2,2]
    logit_grads = tf.constant([[[[2.0], [-1.0]]]])  # [1,1,2,1]
    np.testing.assert_allclose(nt.kernel_gradient_magnitude(features, logit_grads), [2.5])


# ------------------------------------------------------------------ weights by hand
@pytest.mark.parametrize(
    "e, expected",
    [
        ([1.0, 3.0], [0.25, 0.75]),
        ([2.0, -1.0, 2.0], [0.5, 0.0, 0.5]),
        ([-1.0, -2.0, 0.0], [0.0, 0.0, 0.0]),  # nobody helps: all zeros, not NaN
        ([0.0, 0.0], [0.0, 0.0]),
    ],
)
def test_normalize_positive(e, expected):
    np.testing.assert_allclose(nt.normalize_positive(tf.constant(e)), expected)


@pytest.mark.parametrize(
    "w_e, w_x, lam, query, expected",
    [
        ([0.5, 0.5, 0.0, 0.0], [0.1, 0.1, 0.4, 0.4], 1.0, False, [0.5, 0.5, 0.0, 0.0]),  # RGS
        ([0.5, 0.5, 0.0, 0.0], [0.1, 0.1, 0.4, 0.4], 0.0, False, [0.1, 0.1, 0.4, 0.4]),  # RGM
        ([0.5, 0.5, 0.0, 0.0], [0.1, 0.1, 0.4, 0.4], 0.5, False, [0.3, 0.3, 0.2, 0.2]),  # RGS&M
        # +AL, B = 4: weights below 1/4 go to zero and the rest is not renormalised
        ([0.5, 0.5, 0.0, 0.0], [0.1, 0.1, 0.4, 0.4], 0.5, True, [0.3, 0.3, 0.0, 0.0]),
        ([0.7, 0.2, 0.1, 0.0], [0.0, 0.0, 0.0, 0.0], 1.0, True, [0.7, 0.0, 0.0, 0.0]),
        ([0.25, 0.25, 0.25, 0.25], [0.0, 0.0, 0.0, 0.0], 1.0, True, [0.25, 0.25, 0.25, 0.25]),  # 1/B is kept
    ],
)
def test_combine_weights(w_e, w_x, lam, query, expected):
    w = nt.combine_weights(tf.constant(w_e), tf.constant(w_x), lam, query)
    np.testing.assert_allclose(w, expected, rtol=1e-6, atol=1e-7)


def test_combine_weights_accepts_a_missing_score():
    np.testing.assert_allclose(nt.combine_weights(tf.constant([0.2, 0.8]), None, 1.0, False), [0.2, 0.8])
    np.testing.assert_allclose(nt.combine_weights(None, tf.constant([0.2, 0.8]), 0.0, True), [0.0, 0.8])


def test_registry_and_bad_settings():
    from dsal_tf.errors import DsalError

    model = _unet()
    assert nt.make_trainer("rgsm", model).lam == 0.5
    assert nt.make_trainer("rgs", model, lam=-1.0).lam == 1.0  # the config's -1 means "default"
    assert nt.make_trainer("rgs", model, lam=0.25).lam == 0.25
    with pytest.raises(DsalError, match="rgm"):
        nt.make_trainer("ren", model)
    with pytest.raises(DsalError, match="rgs_lambda"):
        nt.ReweightedTrainer(model, lam=2.0)
    with pytest.raises(DsalError, match="bce_dice"):
        nt.ReweightedTrainer(model, loss="focal")


# ------------------------------------------------------------------ the loss a run trains on
# one image, two pixels: label [1, 0], every head predicts [0.8, 0.6] (ds weights sum to 1)
Y_PAIR = tf.constant([[[[1.0], [0.0]]]])
P_PAIR = tf.constant([[[[0.8], [0.6]]]])
BCE_PAIR = (-np.log(0.8) - np.log(0.4)) / 2
DICE_PAIR = 1 - (2 * 0.8 + 1) / (1 + 1.4 + 1)


@pytest.mark.parametrize("name", ["rgs", "rgm", "rgsm", "uniform"])
@pytest.mark.parametrize("reweight_loss, expected", [
    ("bce_dice", BCE_PAIR + DICE_PAIR),  # the default: BCE + Dice although LOSS = dice
    ("run", DICE_PAIR),  # the stated override: the run's LOSS
    ("bce", BCE_PAIR),
])
def test_noisy_teacher_loss_is_bce_plus_dice_unless_overridden(name, reweight_loss, expected):
    from dsal_tf.config import resolve

    cfg = resolve({"loss": "dice", "reweight_loss": reweight_loss})
    trainer = nt.get_trainer(name).for_run(_unet(), cfg, total_steps=10)  # as `train.fit` builds it
    outputs = {h: P_PAIR for h in ("main", "side_1", "side_2")}
    np.testing.assert_allclose(trainer.losses_of(outputs, Y_PAIR), [expected], rtol=1e-5)
    assert trainer.loss_name == nt.reweight_loss_name(cfg)


def test_other_trainers_keep_the_run_loss():
    from dsal_tf.config import resolve

    cfg = resolve({"loss": "dice"})
    for name in ("mwnet", "mcpm", "pint"):
        assert nt.get_trainer(name).loss_for(cfg) == "dice"


# ------------------------------------------------------------------ trainer
class _FixedWeights(nt.ReweightedTrainer):
    """Test double: the weights are given, so the update can be checked by hand."""

    def __init__(self, *args, fixed, **kwargs):
        super().__init__(*args, **kwargs)
        self.fixed = tf.constant(fixed, tf.float32)

    def sample_weights(self, e, g, losses):
        return self.fixed


def _dataset(batch: int = 4) -> tf.data.Dataset:
    xn, yn = _batch(4, 1)
    xc, yc = _batch(3, 2)
    return nt.make_paired_dataset((xn, yn), (xc, yc), batch_size=batch, seed=0)


def _flat(tensors) -> np.ndarray:
    return np.concatenate([np.ravel(t) for t in tensors])


def _snapshot(model) -> list[np.ndarray]:
    return [v.numpy().copy() for v in model.trainable_variables]


@pytest.mark.slow
def test_zero_weights_and_no_expert_leave_the_model_alone():
    model = _unet()
    trainer = _FixedWeights(model, fixed=[0.0] * 4, lam=0.0, expert_weight=0.0)
    trainer.compile(keras.optimizers.Adam(1e-2))
    before = _snapshot(model)
    history = trainer.fit(_dataset(), epochs=2, verbose=0).history  # 2 steps
    assert np.isfinite(history["loss"]).all() and history["mean_weight"] == [0.0, 0.0]
    assert all(np.array_equal(a, b) for a, b in zip(before, _snapshot(model)))


def test_update_is_the_weighted_noisy_gradient():
    """SGD with lr 1: the step is exactly -(sum_i w_i grad L_i), here w = one-hot on sample 2."""
    model = _unet()
    xn, yn = _batch(4, 1)
    xc, yc = _batch(4, 2)
    data = tf.data.Dataset.from_tensors(((xn, yn), (xc, yc)))
    before = _snapshot(model)
    expected = _per_sample_grads(model, xn[2:3], yn[2:3], "bce_dice", model.trainable_variables)[0]
    trainer = _FixedWeights(model, fixed=[0.0, 0.0, 1.0, 0.0], lam=0.0, expert_weight=0.0)
    trainer.compile(keras.optimizers.SGD(1.0))
    trainer.fit(data, epochs=1, verbose=0)
    step = [b - a for a, b in zip(before, _snapshot(model))]
    assert _rel_err(-_flat(step), _flat(expected)) < 1e-4


class _Recorder(nt.ReweightedTrainer):
    """Test double: keeps the scores and the weights the compiled train step computed."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen = {k: tf.Variable(tf.zeros([4]), trainable=False) for k in ("e", "g", "w")}

    def sample_weights(self, e, g, losses):
        w = super().sample_weights(e, g, losses)
        for key, value in (("e", e), ("g", g), ("w", w)):
            if value is not None:  # RGS computes no g, RGM no e
                self.seen[key].assign(value)
        return w


@pytest.mark.slow
def test_train_step_scores_match_the_plain_functions():
    """Inside `fit` the scores share the forward pass with the update; they must not change."""
    model = _unet()
    xn, yn = _batch(4, 1)
    xc, yc = _batch(3, 2)
    e = nt.trust_scores(model, xn, yn, xc, yc)
    g = nt.informativeness_scores(model, xn, yn)
    trainer = _Recorder(model, lam=0.5)  # RGS&M: both scores
    trainer.compile(keras.optimizers.Adam(1e-3))
    trainer.fit(tf.data.Dataset.from_tensors(((xn, yn), (xc, yc))), epochs=1, verbose=0)
    assert _rel_err(trainer.seen["e"].numpy(), e) < 1e-4
    assert _rel_err(trainer.seen["g"].numpy(), g) < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("name", ["rgs", "rgm"])  # rgsm runs in the test above
def test_fit_and_evaluate(name, tmp_path):
    model = _unet(dropout=0.5)
    trainer = nt.make_trainer(name, model, query=True)
    trainer.compile(keras.optimizers.Adam(1e-3))
    before = _snapshot(model)
    xv, yv = _batch(3, 3)
    val = tf.data.Dataset.from_tensor_slices((xv, yv)).batch(2)
    history = trainer.fit(_dataset(batch=2), validation_data=val, epochs=1, verbose=0).history
    for key in ("loss", "main_dice", "mean_weight", "kept_fraction", "val_loss", "val_main_dice"):
        assert np.isfinite(history[key][-1]), key
    assert not all(np.array_equal(a, b) for a, b in zip(before, _snapshot(model)))
    path = tmp_path / "unet.keras"
    trainer.segmenter.save(path)
    assert keras.models.load_model(path, compile=False).name == model.name


@pytest.mark.slow
def test_query_zeroes_weights_inside_the_step():
    """+AL inside `fit`: every weight below 1/B is 0, the rest is max(e,0)/sum max(e,0) unrenormalised,
    and `kept_fraction` is the share of non-zero weights of that very step."""
    model = _unet()
    xn, yn = _batch(4, 1)
    xc, yc = _batch(3, 2)
    trainer = _Recorder(model, lam=1.0, query=True)
    trainer.compile(keras.optimizers.Adam(1e-3))
    history = trainer.fit(tf.data.Dataset.from_tensors(((xn, yn), (xc, yc))), epochs=1, verbose=0).history
    e, w = trainer.seen["e"].numpy(), trainer.seen["w"].numpy()
    pos = np.maximum(e, 0.0)
    plain = pos / pos.sum()
    expected = np.where(plain < 0.25, 0.0, plain)
    assert 0 < (expected > 0).sum() < 4  # the query drops some samples here and keeps some
    np.testing.assert_allclose(w, expected, rtol=1e-5, atol=1e-7)
    assert history["kept_fraction"] == [pytest.approx((expected > 0).mean())]
    assert history["mean_weight"] == [pytest.approx(expected.mean(), rel=1e-5)]


def test_uniform_control_is_the_same_step_with_weights_one_over_b():
    """`uniform` through the same step, SGD lr 1: the update is -(mean_i grad L_i + grad mean L_clean)."""
    model = _unet()
    xn, yn = _batch(4, 1)
    xc, yc = _batch(4, 2)
    variables = model.trainable_variables
    loss_fn = nt.resolve_loss("bce_dice")
    with tf.GradientTape() as tape:
        target = tf.reduce_mean(nt.per_sample_loss(model(xn), yn, loss_fn, DS))
        target += tf.reduce_mean(nt.per_sample_loss(model(xc), yc, loss_fn, DS))
    expected = _grad(tape, target, variables)
    before = _snapshot(model)
    trainer = nt.make_trainer("uniform", model)
    trainer.compile(keras.optimizers.SGD(1.0))
    history = trainer.fit(tf.data.Dataset.from_tensors(((xn, yn), (xc, yc))), epochs=1, verbose=0).history
    step = [b - a for a, b in zip(before, _snapshot(model))]
    assert _rel_err(-_flat(step), _flat(expected)) < 1e-4
    assert history["mean_weight"] == [pytest.approx(0.25)] and history["kept_fraction"] == [1.0]
