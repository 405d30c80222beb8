"""MW-Net and MCPM (trainers/meta.py): the bi-level step on a tiny U-Net.

The meta gradient must be non-zero and match a finite-difference estimate of the clean loss after
the virtual step; the real step must be the weighted gradient the docstring states, taken by the
authors' SGD (momentum 0.9, L2 5e-4, META_STEP_LR) or by Adam at LEARNING_RATE (META_STEP = "adam").
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from dsal_tf import trainers
from dsal_tf.config import resolve
from dsal_tf.errors import DsalError
from dsal_tf.model import build_unet
from dsal_tf.trainers.base import pixel_weighted_loss

SHAPE = (16, 16, 3)
DS = (0.6, 0.3, 0.1)


def _unet(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return build_unet(SHAPE, base_filters=2, depth=3, dropout=0.0)


def _batch(n: int, seed: int):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, *SHAPE)).astype("float32")
    y = (rng.random((n, *SHAPE[:2], 1)) > 0.6).astype("float32")
    return tf.constant(x), tf.constant(y)


def _flat(tensors) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(t, np.float64)) for t in tensors])


@pytest.mark.parametrize("name", ["mwnet", "mcpm"])
def test_meta_gradient_matches_finite_differences(name):
    """`dM/dphi`, M = mean clean loss at theta_hat = theta - alpha grad O(theta, V_phi), against
    (M(phi + eps d) - M(phi - eps d)) / 2 eps along the normalised gradient d."""
    trainer = trainers.make_trainer(name, _unet(), loss="bce_dice", ds_weights=DS, virtual_lr=1.0)
    (xn, yn), (xc, yc) = _batch(4, 1), _batch(3, 2)
    meta_vars = trainer.meta_net.trainable_variables
    m0, grads, *_ = trainer.meta_gradient(xn, yn, xc, yc, training=False)
    g = _flat(grads)
    assert np.linalg.norm(g) > 0
    d = g / np.linalg.norm(g)
    start = [v.numpy().copy() for v in meta_vars]

    def meta_loss_at(step: float) -> float:
        offset = 0
        for v, s in zip(meta_vars, start):
            v.assign(s + step * d[offset:offset + s.size].reshape(s.shape).astype(s.dtype))
            offset += s.size
        return float(trainer.meta_gradient(xn, yn, xc, yc, training=False)[0])

    eps = 1e-2
    fd = (meta_loss_at(eps) - meta_loss_at(-eps)) / (2 * eps)
    meta_loss_at(0.0)
    assert fd == pytest.approx(np.linalg.norm(g), rel=0.05)


def _snapshot(model):
    return [v.numpy().copy() for v in model.trainable_variables]


@pytest.mark.slow  # trains (one fit of the bi-level step): 5 s each
@pytest.mark.parametrize("name", ["mwnet", "mcpm"])
def test_real_step_is_the_weighted_gradient(name):
    """Meta lr 0 (the meta net stays put), SGD lr 1: the step is
    -(grad O(theta, stop_gradient(V)) + grad mean L_clean), computed here with a plain tape."""
    model = _unet()
    trainer = trainers.make_trainer(name, model, loss="bce_dice", ds_weights=DS, meta_lr=0.0)
    (xn, yn), (xc, yc) = _batch(4, 1), _batch(4, 2)
    with tf.GradientTape() as tape:
        out = model(xn)
        w = tf.stop_gradient(trainer.meta_weights(out, yn))
        target = trainer.objective(out, yn, w) + tf.reduce_mean(trainer.losses_of(model(xc), yc))
    expected = tape.gradient(target, model.trainable_variables)
    before = _snapshot(model)
    trainer.compile(keras.optimizers.SGD(1.0))
    history = trainer.fit(tf.data.Dataset.from_tensors(((xn, yn), (xc, yc))), epochs=1, verbose=0).history
    step = [b - a for a, b in zip(before, _snapshot(model))]
    np.testing.assert_allclose(-_flat(step), _flat(expected), rtol=1e-4, atol=1e-6)
    assert history["mean_weight"][0] == pytest.approx(float(tf.reduce_mean(w)), rel=1e-5)


def _real_gradient(trainer, model, xn, yn, xc, yc) -> list[np.ndarray]:
    """`grad_theta [O(theta, stop_gradient(V)) + mean L_clean]` with a plain tape."""
    with tf.GradientTape() as tape:
        out = model(xn)
        w = tf.stop_gradient(trainer.meta_weights(out, yn))
        target = trainer.objective(out, yn, w) + tf.reduce_mean(trainer.losses_of(model(xc), yc))
    return [g.numpy() for g in tape.gradient(target, model.trainable_variables)]


@pytest.mark.parametrize("name", ["mwnet", "mcpm"])
def test_real_step_optimizer_is_a_setting(name):
    """Default META_STEP = "sgd": SGD at META_STEP_LR 0.1, momentum 0.9, no Nesterov, L2 5e-4, and the
    virtual step at the same rate. "adam": Adam at LEARNING_RATE, no L2, the virtual step at
    LEARNING_RATE (the behaviour before the setting)."""
    cls = trainers.get_trainer(name)
    cfg = resolve({"trainer": name, "learning_rate": 3e-4})
    opt = cls.optimizer_for(cfg)
    assert isinstance(opt, keras.optimizers.SGD) and not opt.nesterov
    assert float(opt.learning_rate) == pytest.approx(0.1) and opt.momentum == pytest.approx(0.9)
    trainer = cls.for_run(_unet(), cfg, total_steps=10)
    trainer.compile(opt)
    assert trainer.weight_decay == pytest.approx(5e-4) and float(trainer.alpha) == pytest.approx(0.1)

    adam_cfg = resolve({"trainer": name, "learning_rate": 3e-4, "meta_step": "adam"})
    opt = cls.optimizer_for(adam_cfg)
    assert isinstance(opt, keras.optimizers.Adam) and float(opt.learning_rate) == pytest.approx(3e-4)
    trainer = cls.for_run(_unet(), adam_cfg, total_steps=10)
    trainer.compile(opt)
    assert trainer.weight_decay == 0.0 and float(trainer.alpha) == pytest.approx(3e-4)


def test_real_step_setting_errors_say_what_to_do():
    with pytest.raises(DsalError, match="did you mean 'sgd'"):
        trainers.get_trainer("mwnet").Settings.from_config(resolve({"meta_step": "sdg"}))
    with pytest.raises(DsalError, match="META_STEP = \"adam\""):  # the schedules set rates from LEARNING_RATE
        trainers.get_trainer("mcpm").optimizer_for(resolve({"lr_schedule": "cosine"}))


@pytest.mark.slow  # two fits of the bi-level step: ~10 s each
@pytest.mark.parametrize("name", ["mwnet", "mcpm"])
def test_sgd_real_step_by_hand(name):
    """META_STEP = "sgd" (at 0.5 here), the meta net held still: two steps of the authors' SGD,
    `v_1 = -lr (g_0 + wd theta_0)`, `v_2 = 0.9 v_1 - lr (g_1 + wd theta_1)`, `theta_t+1 = theta_t + v_t+1`,
    with g_t the real step's gradient at theta_t and wd = 5e-4."""
    cfg = resolve({"trainer": name, "meta_step_lr": 0.5, "loss": "bce_dice"})
    model = _unet()
    trainer = trainers.get_trainer(name).for_run(model, cfg, total_steps=2)
    trainer.meta_optimizer.learning_rate = 0.0
    trainer.compile(trainer.optimizer_for(cfg))
    (xn, yn), (xc, yc) = _batch(4, 1), _batch(4, 2)
    data = tf.data.Dataset.from_tensors(((xn, yn), (xc, yc)))
    velocity = None
    for step in range(2):
        theta, g = _snapshot(model), _real_gradient(trainer, model, xn, yn, xc, yc)
        expected = [-0.5 * (gi + 5e-4 * t) for gi, t in zip(g, theta)]
        if velocity is not None:
            expected = [0.9 * v + e for v, e in zip(velocity, expected)]
        trainer.fit(data, epochs=1, verbose=0)
        got = [b - a for a, b in zip(theta, _snapshot(model))]
        np.testing.assert_allclose(_flat(got), _flat(expected), rtol=1e-4, atol=1e-6, err_msg=f"step {step}")
        velocity = expected


@pytest.mark.slow  # one fit of the bi-level step: ~5 s
def test_adam_real_step_is_the_former_behaviour():
    """META_STEP = "adam": Adam's first step at LEARNING_RATE, `-lr g / (|g| + eps / sqrt(1 - beta_2))`, no L2."""
    cfg = resolve({"trainer": "mwnet", "meta_step": "adam", "learning_rate": 1e-2})
    model = _unet()
    trainer = trainers.get_trainer("mwnet").for_run(model, cfg, total_steps=1)
    trainer.meta_optimizer.learning_rate = 0.0
    opt = trainer.optimizer_for(cfg)
    trainer.compile(opt)
    (xn, yn), (xc, yc) = _batch(4, 1), _batch(4, 2)
    theta, g = _snapshot(model), _real_gradient(trainer, model, xn, yn, xc, yc)
    eps = opt.epsilon / np.sqrt(1.0 - opt.beta_2)
    expected = [-1e-2 * gi / (np.abs(gi) + eps) for gi in g]
    trainer.fit(tf.data.Dataset.from_tensors(((xn, yn), (xc, yc))), epochs=1, verbose=0)
    got = [b - a for a, b in zip(theta, _snapshot(model))]
    np.testing.assert_allclose(_flat(got), _flat(expected), rtol=1e-3, atol=1e-7)


def test_mwnet_objective_and_weight_net_by_hand():
    trainer = trainers.make_trainer("mwnet", _unet(), loss="bce", ds_weights=(1.0, 0.0, 0.0))
    y = tf.constant([[[[1.0], [0.0]]], [[[1.0], [1.0]]]])  # [2,1,2,1]
    p = tf.constant([[[[0.5], [0.5]]], [[[0.5], [0.5]]]])
    ln2 = np.log(2.0)
    # every pixel costs ln 2, so L = [ln 2, ln 2]; O = mean(w L)
    assert float(trainer.objective({"main": p}, y, tf.constant([1.0, 0.5]))) == pytest.approx(0.75 * ln2, rel=1e-5)
    w = trainer.meta_net(tf.constant([0.1, 2.0, 30.0]))
    assert w.shape == (3,) and np.all((w.numpy() > 0) & (w.numpy() < 1))


def test_mcpm_mask_net_and_pixel_weights_by_hand():
    trainer = trainers.make_trainer("mcpm", _unet(), loss="dice", ds_weights=(1.0, 0.0, 0.0))
    r = trainer.meta_net(tf.zeros([2, 5, 7, 1]))
    assert r.shape == (2, 5, 7, 1) and np.all((r.numpy() > 0) & (r.numpy() < 1))
    y = tf.constant([[[[1.0], [0.0]]]])
    p = tf.constant([[[[0.5], [0.5]]]])
    # r = [1, 0]: overlap 0.5, sizes 1 + 0.5 -> 1 - (2 * 0.5 + 1) / (1.5 + 1) = 0.2
    np.testing.assert_allclose(pixel_weighted_loss(y, p, tf.constant([[[[1.0], [0.0]]]]), "dice"), [0.2], rtol=1e-6)
    # r = 1 is the plain soft Dice: 1 - (1 + 1) / (1 + 1 + 1) = 1/3
    np.testing.assert_allclose(pixel_weighted_loss(y, p, tf.ones_like(y), "dice"), [1 / 3], rtol=1e-6)
    np.testing.assert_allclose(pixel_weighted_loss(y, p, tf.constant([[[[1.0], [0.0]]]]), "bce"),
                               [np.log(2.0) / 2], rtol=1e-5)
    # the objective weighs the pixel BCE, not the run's Dice: mean(r * ln 2) = ln 2 / 2, not 0.2
    assert float(trainer.objective({"main": p}, y, tf.constant([[[[1.0], [0.0]]]]))) == pytest.approx(
        np.log(2.0) / 2, rel=1e-5)


@pytest.mark.parametrize("loss", ["dice", "bce", "bce_dice"])
def test_mcpm_weighted_loss_halves_when_r_halves(loss):
    """O is mean R * BCE whatever LOSS is, so O(R / 2) = O(R) / 2 (an R-weighted soft Dice would not move)."""
    trainer = trainers.make_trainer("mcpm", _unet(), loss=loss, ds_weights=DS)
    rng = np.random.default_rng(0)
    y = tf.constant((rng.random((2, 8, 8, 1)) > 0.5).astype("float32"))
    outputs = {h: tf.constant(rng.uniform(0.05, 0.95, (2, 8, 8, 1)).astype("float32"))
               for h in ("main", "side_1", "side_2")}
    r = tf.constant(rng.uniform(0.1, 1.0, (2, 8, 8, 1)).astype("float32"))
    full = float(trainer.objective(outputs, y, r))
    assert float(trainer.objective(outputs, y, 0.5 * r)) == pytest.approx(0.5 * full, rel=1e-6)
    assert float(trainer.objective(outputs, y, 0.1 * r)) == pytest.approx(0.1 * full, rel=1e-6)
    bce = {h: np.mean(np.asarray(r) * -(np.asarray(y) * np.log(o) + (1 - np.asarray(y)) * np.log(1 - o)),
                      axis=(1, 2, 3)) for h, o in ((h, np.asarray(v)) for h, v in outputs.items())}
    expected = np.mean(sum(w * bce[h] for h, w in zip(("main", "side_1", "side_2"), DS)))
    assert full == pytest.approx(expected, rel=1e-5)


def test_pixel_bce_keeps_its_gradient_where_a_head_saturates():
    """The per-pixel BCE the re-weighting trainers use: by hand where p is ordinary, and still pulling a
    saturated wrong pixel back (a clip at 1e-7 gave it zero gradient)."""
    from dsal_tf.trainers.base import pixel_bce

    y = tf.constant([[1.0], [0.0], [1.0]])
    p = tf.Variable([[0.25], [0.25], [1e-9]])
    with tf.GradientTape() as tape:
        loss = pixel_bce(y, p)
    np.testing.assert_allclose(loss.numpy()[:2, 0], [-np.log(0.25), -np.log(0.75)], rtol=1e-6)
    assert loss.numpy()[2, 0] == pytest.approx(-np.log(1e-9), rel=1e-4)
    grad = tape.gradient(loss, p).numpy()[:, 0]
    assert grad[2] == pytest.approx(-1e9, rel=1e-3)  # d(-log p)/dp = -1/p: the wrong pixel is pushed up
