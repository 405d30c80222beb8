"""PNT, INT and PINT (trainers/pint.py): the constant threshold, masks and mixed losses by hand (per-pixel
cross-entropy and squared error on one scale, whatever LOSS is), the supervised warm-up and the EMA
teacher with Mean Teacher's decay warm-up, both only for a model that starts from scratch."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from dsal_tf import trainers
from dsal_tf.config import resolve
from dsal_tf.model import build_unet
from dsal_tf.trainers.base import mean_teacher_decay
from dsal_tf.trainers.pint import PINT, below_median, binary_entropy, pint_loss

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
    trained = trainers.get_trainer("pint").for_run(_unet(), cfg, total_steps=40, from_scratch=False)
    assert trained.warmup_steps == 0 and not trained.from_scratch  # a trained model needs no warm-up


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
        assert float(tf.reduce_mean(trainer.label_mask(pixel, image))) == 1.0
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


def test_loss_is_only_the_expert_terms():
    """LOSS (here a callable) is the expert term's; the noisy term is the method's CE and squared error."""
    trainer = trainers.make_trainer("pnt", _unet(), loss=lambda y, p: tf.reduce_mean(p, axis=[1, 2, 3]),
                                    ds_weights=(1.0, 0.0, 0.0))
    np.testing.assert_allclose(trainer.sample_losses({"main": P}, Y, P_BAR, A, tf.constant([0.0])), [PIXEL_RULE],
                               rtol=1e-5)


# one 2x2 image: label y, student p, teacher p_bar, pixel mask a (the lower row uncertain)
Y4 = tf.constant([[[[1.0], [0.0]], [[1.0], [0.0]]]])
P4 = tf.constant([[[[0.8], [0.3]], [[0.6], [0.1]]]])
P_BAR4 = tf.constant([[[[0.9], [0.2]], [[0.4], [0.5]]]])
A4 = tf.constant([[[[1.0], [1.0]], [[0.0], [0.0]]]])
CE4 = [-np.log(0.8), -np.log(0.7), -np.log(0.6), -np.log(0.9)]  # per pixel, against y
SQ4 = [0.1**2, 0.1**2, 0.2**2, 0.4**2]  # per pixel, (p - p_bar)^2
GATED4 = (CE4[0] + CE4[1] + SQ4[2] + SQ4[3]) / 4  # CE above, squared error below, both over the 4 pixels


def test_pint_loss_by_hand():
    """Both terms per pixel, averaged over the same 4 pixels: 0.1950 (CE 0.580 + squared error 0.200, / 4)."""
    assert GATED4 == pytest.approx(0.19495, abs=1e-4)
    np.testing.assert_allclose(pint_loss(Y4, P4, P_BAR4, A4), [GATED4], rtol=1e-5)
    np.testing.assert_allclose(pint_loss(Y4, P4, P_BAR4, tf.ones_like(A4)), [np.mean(CE4)], rtol=1e-5)
    np.testing.assert_allclose(pint_loss(Y4, P4, P_BAR4, tf.zeros_like(A4)), [np.mean(SQ4)], rtol=1e-5)


@pytest.mark.parametrize("name, image, expected", [
    ("pnt", 0.0, GATED4), ("pnt", 1.0, GATED4),
    ("int", 1.0, np.mean(CE4)), ("int", 0.0, np.mean(SQ4)),  # a clean image: CE everywhere; else the teacher
    ("pint", 1.0, np.mean(CE4)), ("pint", 0.0, GATED4),
])
@pytest.mark.parametrize("loss", ["dice", "bce_dice"])
def test_noisy_term_is_cross_entropy_and_squared_error_whatever_loss_is(name, image, expected, loss):
    """With LOSS = soft Dice (the ISIC runs) the label term is still the per-pixel CE beside the per-pixel
    squared error (the former masked soft Dice gave PNT 0.161 + 0.050 here, INT's clean image 0.208)."""
    trainer = trainers.make_trainer(name, _unet(), loss=loss, ds_weights=(1.0, 0.0, 0.0))
    got = trainer.sample_losses({"main": P4}, Y4, P_BAR4, A4, tf.constant([image]))
    np.testing.assert_allclose(got, [expected], rtol=1e-5)
    heads = trainers.make_trainer(name, _unet(), loss=loss)  # deep supervision: sum_k ds_k L_i(head k)
    got = heads.sample_losses({"main": P4, "side_1": P4, "side_2": P4}, Y4, P_BAR4, A4, tf.constant([image]))
    np.testing.assert_allclose(got, [expected], rtol=1e-5)


def test_warm_ups_only_from_scratch():
    """From scratch: no gating for `warmup_steps` steps and the EMA decay warms up (0 after step 0).
    Continuing a trained model: gated from step 0 and the EMA decay is gamma from the first step."""
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(2, *SHAPE)).astype("float32"))
    for from_scratch in (True, False):
        trainer = trainers.make_trainer("pint", _unet(), loss="bce", tau=0.0, warmup_steps=3, ema=0.99,
                                        from_scratch=from_scratch)
        trainer.compile(keras.optimizers.Adam(1e-3))
        _, pixel, _ = _at_step(trainer, 0).gates(x)
        assert np.all(pixel.numpy() == (1.0 if from_scratch else 0.0)), from_scratch  # tau = 0 gates every pixel
        student, teacher = trainer.segmenter, trainer.teacher
        start = teacher.get_weights()
        theta = [w + 1.0 for w in student.get_weights()]
        student.set_weights(theta)
        _at_step(trainer, 1).update_teacher()  # after step 0
        d = 0.0 if from_scratch else 0.99
        for t, a, b in zip(teacher.get_weights(), start, theta):
            np.testing.assert_allclose(t, d * a + (1 - d) * b, rtol=1e-5, atol=1e-6)


def test_the_loop_says_when_the_model_starts_from_scratch(tiny_cfg, monkeypatch):
    """Round 0 trains a new model (from scratch); round 1 goes on from round 0's; and `fit_paired` hands
    the job's answer to the trainer."""
    from dsal_tf import active, train
    from dsal_tf.pool import Pool

    cfg = tiny_cfg.replace(trainer="pint")
    ctx = active.open_run(cfg, log=lambda m: None)
    jobs = []
    monkeypatch.setattr(active.train, "fit", lambda job: jobs.append(job) or {"val_main_dice": [0.5]})
    ctx.model = train.new_model(ctx.cfg, 0)
    ctx.pool = Pool.initial(len(ctx.pool_data), cfg.nb_labeled, seed=0)
    for r in (0, 1):
        ctx.round = r
        active.train_round(ctx)
    assert [job.from_scratch for job in jobs] == [True, False]

    class Built(Exception):
        pass

    def for_run(cls, segmenter, cfg, total_steps, from_scratch=True):
        raise Built(from_scratch)

    monkeypatch.setattr(PINT, "for_run", classmethod(for_run))
    job = jobs[1]
    job.is_pseudo = np.arange(len(job.y)) % 2 == 0  # something to weigh
    for from_scratch in (True, False):
        job.from_scratch = from_scratch
        with pytest.raises(Built) as built:
            PINT.fit_job(job)
        assert built.value.args == (from_scratch,)


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
