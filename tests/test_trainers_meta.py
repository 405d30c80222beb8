"""MW-Net and MCPM (trainers/meta.py): the bi-level step on a tiny U-Net.

The meta gradient must be non-zero and match a finite-difference estimate of the clean loss after
the virtual step; the real step must be the weighted gradient the docstring states.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from dsal_tf import trainers
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
