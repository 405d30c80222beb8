"""PNT, INT and PINT (trainers/pint.py): the constant threshold, masks and mixed losses by hand, the
supervised warm-up, and the EMA teacher with Mean Teacher's decay warm-up."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from dsal_tf import trainers
from dsal_tf.config import resolve
from dsal_tf.model import build_unet
from dsal_tf.trainers.base import mean_teacher_decay
from dsal_tf.trainers.pint import below_median, binary_entropy

SHAPE = (16, 16, 3)
LN2 = np.log(2.0)


def _unet(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return build_unet(SHAPE, base_filters=2, depth=3, dropout=0.0)


def test_entropy_by_hand():
    np.testing.assert_allclose(binary_entropy(tf.constant([0.5, 1.0, 0.0])), [LN2, 0.0, 0.0], atol=1e-5)


def _compiled(name: str, **kwargs):
    trainer = trainers.make_trainer(name, _unet(), loss="bce", **kwargs)
    trainer.compile(keras.optimizers.Adam(1e-3))
    return trainer


def _at_step(trainer, step: int):
    trainer.optimizer.iterations.assign(step)
    return trainer


def test_tau_is_constant_over_training():
    """Default tau = 0.5 ln 2 = 0.347 at every step (UA-MT's ramp gave 0.52 at the start, ln 2 at the end)."""
    trainer = _compiled("pnt")
    u = tf.constant([0.2, 0.34, 0.36, 0.5, 0.6, 0.69])[None, None, :, None]  # [1,1,6,1]
    for step in (0, 10, 500, 10**6):
        pixel, _ = _at_step(trainer, step).masks(u)
        np.testing.assert_array_equal(np.ravel(pixel), [1, 1, 0, 0, 0, 0], err_msg=f"step {step}")
    pixel, _ = _compiled("pnt", tau=0.55).masks(u)
    np.testing.assert_array_equal(np.ravel(pixel), [1, 1, 1, 1, 0, 0])


def test_config_gives_tau_and_warmup_steps():
    cfg = resolve({"pint_tau": 0.3, "pint_warmup": 0.25, "loss": "dice"})
    trainer = trainers.get_trainer("pint").for_run(_unet(), cfg, total_steps=40)
    assert trainer.tau == pytest.approx(0.3) and trainer.warmup_steps == 10 and trainer.loss_name == "dice"
    default = trainers.get_trainer("pnt").for_run(_unet(), resolve({}), total_steps=40)
    assert default.tau == pytest.approx(0.5 * LN2) and default.warmup_steps == 8  # 20% of the steps


@pytest.mark.parametrize("name", ["pnt", "int", "pint"])
def test_no_gating_during_the_warm_up(name):
    """Steps 0..warmup-1: every mask is 1 and L_i is the plain loss, even where the teacher would
    gate everything (tau = 0: no pixel is certain); from step `warmup` on the gates are back."""
    trainer = _compiled(name, tau=0.0, warmup_steps=3, ds_weights=(1.0, 0.0, 0.0))
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(2, *SHAPE)).astype("float32"))
    y = tf.constant((rng.random((2, *SHAPE[:2], 1)) > 0.6).astype("float32"))
    p = tf.constant(rng.uniform(0.05, 0.95, size=(2, *SHAPE[:2], 1)).astype("float32"))
    outputs = {"main": p}
    for step in (0, 2):
        p_bar, pixel, image = _at_step(trainer, step).gates(x)
        assert np.all(pixel.numpy() == 1) and np.all(image.numpy() == 1), f"step {step}"
        np.testing.assert_allclose(trainer.sample_losses(outputs, y, p_bar, pixel, image),
                                   trainer.losses_of(outputs, y), rtol=1e-5)
        assert float(tf.reduce_mean(trainer.supervised_share(pixel, image))) == 1.0
    _, pixel, _ = _at_step(trainer, 3).gates(x)
    assert np.all(pixel.numpy() == 0)  # tau = 0: the teacher now gates every pixel


def test_ema_decay_warms_up_like_mean_teacher():
    """`min(1 - 1/(t+1), gamma)`: 0, 1/2, 2/3, 3/4 over the first steps, then gamma."""
    np.testing.assert_allclose([float(mean_teacher_decay(t, 0.99)) for t in range(4)], [0, 1 / 2, 2 / 3, 3 / 4],
                               rtol=1e-6)
    assert float(mean_teacher_decay(99, 0.99)) == pytest.approx(0.99)
    assert float(mean_teacher_decay(10**6, 0.99)) == pytest.approx(0.99)


def test_teacher_update_uses_the_warm_up_decay():
    """After step t (iterations = t + 1): teacher = d_t teacher + (1 - d_t) student; d_0 = 0 copies the student."""
    trainer = _compiled("pint", ema=0.99)
    student, teacher = trainer.segmenter, trainer.teacher
    theta = [w + 1.0 for w in student.get_weights()]
    student.set_weights(theta)
    start = teacher.get_weights()
    for step, d in ((0, 0.0), (1, 0.5), (2, 2 / 3), (500, 0.99)):
        teacher.set_weights(start)
        _at_step(trainer, step + 1).update_teacher()
        for t, a, b in zip(teacher.get_weights(), start, theta):
            np.testing.assert_allclose(t, d * a + (1 - d) * b, rtol=1e-5, atol=1e-6, err_msg=f"step {step}")


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
def test_ema_teacher_over_two_fit_steps():
    """Teacher starts as the student; step 0 (decay 0) makes it theta_1, step 1 (decay 1/2) makes it
    (theta_1 + theta_2) / 2. The first step is a warm-up step (kept fraction 1), the second is gated."""
    model = _unet()
    trainer = trainers.make_trainer("pint", model, loss="bce_dice", ema=0.99, warmup_steps=1)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, *SHAPE)).astype("float32")
    y = (rng.random((4, *SHAPE[:2], 1)) > 0.6).astype("float32")
    trainer.compile(keras.optimizers.Adam(1e-2))
    data = tf.data.Dataset.from_tensors(((x, y), (x, y)))
    thetas = [model.get_weights()]
    kept = []
    for _ in range(2):
        history = trainer.fit(data, epochs=1, verbose=0).history
        thetas.append(model.get_weights())
        kept.append(history["kept_fraction"][0])
        assert np.isfinite(history["loss"][0])
    assert not all(np.array_equal(a, b) for a, b in zip(thetas[0], thetas[1]))
    for t, a, b in zip(trainer.teacher.get_weights(), thetas[1], thetas[2]):
        np.testing.assert_allclose(t, 0.5 * a + 0.5 * b, rtol=1e-5, atol=1e-6)
    assert kept[0] == 1.0 and 0.0 <= kept[1] <= 1.0
