"""PNT, INT and PINT (trainers/pint.py): threshold ramp, masks and mixed losses by hand, the EMA teacher."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from dsal_tf import trainers
from dsal_tf.model import build_unet
from dsal_tf.trainers.pint import below_median, binary_entropy, ramp_threshold

SHAPE = (16, 16, 3)
LN2 = np.log(2.0)


def _unet(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return build_unet(SHAPE, base_filters=2, depth=3, dropout=0.0)


def test_ramp_threshold_and_entropy_by_hand():
    assert float(ramp_threshold(0, 100)) == pytest.approx((0.75 + 0.25 * np.exp(-5.0)) * LN2, rel=1e-6)
    assert float(ramp_threshold(50, 100)) == pytest.approx((0.75 + 0.25 * np.exp(-1.25)) * LN2, rel=1e-6)
    assert float(ramp_threshold(100, 100)) == pytest.approx(LN2, rel=1e-6)
    assert float(ramp_threshold(500, 100)) == pytest.approx(LN2, rel=1e-6)  # clipped at t_max
    np.testing.assert_allclose(binary_entropy(tf.constant([0.5, 1.0, 0.0])), [LN2, 0.0, 0.0], atol=1e-5)


@pytest.mark.parametrize("values, expected", [
    ([3.0, 1.0, 2.0, 4.0], [0, 1, 1, 0]),  # median 2.5
    ([3.0, 1.0, 2.0], [0, 1, 0]),  # median 2
    ([5.0], [0]),  # one image: none is below its own median
    ([1.0, 1.0, 2.0, 2.0], [1, 1, 0, 0]),
])
def test_below_median(values, expected):
    np.testing.assert_array_equal(below_median(tf.constant(values)), expected)


# one image, two pixels; label [1, 0], student p = [0.8, 0.6], teacher p_bar = [0.9, 0.1];
# pixel mask a = [1, 0] (pixel 2 uncertain). Loss "bce" on the main head only.
Y = tf.constant([[[[1.0], [0.0]]]])
P = tf.constant([[[[0.8], [0.6]]]])
P_BAR = tf.constant([[[[0.9], [0.1]]]])
A = tf.constant([[[[1.0], [0.0]]]])
BCE_FULL = (-np.log(0.8) - np.log(0.4)) / 2
PIXEL_RULE = -np.log(0.8) / 2 + 0.5**2 / 2  # sup on pixel 1 + consistency on pixel 2, pixel means
CONSISTENCY = (0.1**2 + 0.5**2) / 2


@pytest.mark.parametrize("name, image, expected", [
    ("pnt", 0.0, PIXEL_RULE), ("pnt", 1.0, PIXEL_RULE),  # PNT ignores the image mask
    ("int", 1.0, BCE_FULL), ("int", 0.0, CONSISTENCY),
    ("pint", 1.0, BCE_FULL), ("pint", 0.0, PIXEL_RULE),  # clean-judged images keep every pixel
])
def test_sample_losses_by_hand(name, image, expected):
    trainer = trainers.make_trainer(name, _unet(), loss="bce", ds_weights=(1.0, 0.0, 0.0))
    got = trainer.sample_losses({"main": P}, Y, P_BAR, A, tf.constant([image]))
    np.testing.assert_allclose(got, [expected], rtol=1e-5)


def test_teacher_of_a_compiled_unet_is_a_plain_copy(tiny_cfg):
    from dsal_tf import train

    model = train.new_model(tiny_cfg, seed=0)  # compiled with the deep-supervision losses, as in train.fit
    trainer = trainers.make_trainer("pint", model, loss=tiny_cfg.loss)
    assert trainer.teacher is not model and not trainer.teacher.trainable
    for t, s in zip(trainer.teacher.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(t, s)


def test_callable_loss_is_refused():
    from dsal_tf.errors import DsalError

    with pytest.raises(DsalError, match="named LOSS"):
        trainers.make_trainer("pint", _unet(), loss=lambda y, p: tf.reduce_mean(p, axis=[1, 2, 3]))


@pytest.mark.slow
def test_ema_teacher_after_one_step():
    """Teacher starts as the student; after one step it is 0.99 theta_0 + 0.01 theta_1."""
    model = _unet()
    trainer = trainers.make_trainer("pint", model, loss="bce_dice", ema=0.99, total_steps=10)
    theta0 = [w.copy() for w in model.get_weights()]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, *SHAPE)).astype("float32")
    y = (rng.random((4, *SHAPE[:2], 1)) > 0.6).astype("float32")
    trainer.compile(keras.optimizers.Adam(1e-2))
    history = trainer.fit(tf.data.Dataset.from_tensors(((x, y), (x, y))), epochs=1, verbose=0).history
    theta1 = model.get_weights()
    assert not all(np.array_equal(a, b) for a, b in zip(theta0, theta1))
    for t, a, b in zip(trainer.teacher.get_weights(), theta0, theta1):
        np.testing.assert_allclose(t, 0.99 * a + 0.01 * b, rtol=1e-5, atol=1e-7)
    assert 0.0 < history["kept_fraction"][0] <= 1.0 and np.isfinite(history["loss"][0])
