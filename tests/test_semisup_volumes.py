"""The pool trainers (`bcp`, `mean_teacher`) take their epoch from the run's space, like a plain fit and
the paired trainers: ceil(n / BATCH_SIZE) batches of images in 2D (unchanged), the volume space's patch
steps in 3D (the fits are marked slow: ~6 s each on 2 cores). Their EMA warm-ups (and BoostMIS's) run
only for a model that starts from scratch (`FitJob.from_scratch`), checked by hand on the decay of the
first update."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from dsal_tf.config import resolve
from dsal_tf.data import Rows, Split
from dsal_tf.model import build_unet
from dsal_tf.space import ImageSpace
from dsal_tf.train import FitJob, new_model
from dsal_tf.trainers import base, get_trainer
from dsal_tf.trainers.bcp import BCP
from dsal_tf.trainers.boostmis import BoostMISTrainer
from dsal_tf.trainers.mean_teacher import MeanTeacher

from .test_volume_space import make_volumes
from .test_volume_trainers import _vol_cfg

POOL_TRAINERS = ("bcp", "mean_teacher")


class CountSteps(keras.callbacks.Callback):
    """Batches per epoch, and the `from_scratch` of the model `fit` trains (the trainer itself)."""

    def __init__(self):
        super().__init__()
        self.steps, self.from_scratch = [], None

    def on_epoch_begin(self, epoch, logs=None):
        self.steps.append(0)

    def on_train_batch_end(self, batch, logs=None):
        self.steps[-1] += 1
        self.from_scratch = getattr(self.model, "from_scratch", None)


def _fit_steps(job: FitJob) -> CountSteps:
    count = CountSteps()
    job.callbacks, job.verbose = [count], 0
    get_trainer(job.cfg.trainer).fit_job(job)
    return count


# ------------------------------------------------------------------ 2D: the count of today
@pytest.mark.parametrize("n, batch, steps", [(0, 2, 1), (1, 2, 1), (2, 2, 1), (3, 2, 2), (5, 2, 3), (80, 16, 5),
                                             (600, 16, 38), (1600, 16, 100)])
def test_an_image_epoch_is_ceil_n_over_the_batch(n, batch, steps):
    space = ImageSpace(resolve({"batch_size": batch}))
    assert space.steps_per_epoch(n) == steps == max(1, math.ceil(n / batch))
    assert base.steps_per_epoch(n, 1, batch, space) == steps == base.steps_per_epoch(n, 1, batch)


def _image_job(trainer: str, n_labelled: int, tmp_path, from_scratch: bool = True) -> FitJob:
    from dsal_tf.data import Normalizer

    cfg = resolve(dict(img_rows=16, img_cols=16, depth=3, base_filters=2, batch_size=2, trainer=trainer,
                       exp_dir=str(tmp_path / "exp"), exp_name="img", progress=False, mixed_precision="off"))
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (n_labelled + 3, 16, 16, 3), dtype=np.uint8)
    y = (rng.random((n_labelled + 3, 16, 16, 1)) > 0.6).astype(np.uint8)
    val = Split([f"v{i}" for i in range(2)], x[:2], y[:2])
    return FitJob(new_model(cfg, 0), cfg, x[:n_labelled], y[:n_labelled], np.zeros(n_labelled, bool), val,
                  Normalizer.fit(x, cfg.normalization), tmp_path / "out", 1, 0,
                  unlabelled=Rows(x, np.arange(n_labelled, n_labelled + 3)), from_scratch=from_scratch)


@pytest.mark.slow
@pytest.mark.parametrize("trainer", POOL_TRAINERS)
def test_pool_trainers_on_images_take_ceil_n_over_the_batch_steps(trainer, tmp_path):
    job = _image_job(trainer, 5, tmp_path)
    assert _fit_steps(job).steps == [3] == [job.space.steps_per_epoch(5)]


@pytest.mark.slow
@pytest.mark.parametrize("trainer", POOL_TRAINERS)
def test_pool_trainers_validate_and_sample_as_a_plain_fit(trainer, tmp_path):
    """VALIDATION_FREQ = 2 over 4 epochs: validation after epochs 2 and 4 only, as `standard` (the pool
    trainers validated every epoch, so their best epoch was picked among more); the labelled stream gets
    the run's FOREGROUND_OVERSAMPLE (it was dropped)."""
    import dataclasses

    job = _image_job(trainer, 5, tmp_path)
    job.cfg = dataclasses.replace(job.cfg, validation_freq=2, foreground_oversample=0.5)
    job.epochs = 4
    seen = []  # (has masks, FOREGROUND_OVERSAMPLE) of each train_stream: the pool's, then the labelled one

    class Recording(ImageSpace):
        def train_stream(self, images, masks, *args, **kwargs):
            seen.append((masks is job.y, kwargs.get("foreground_oversample", 0.0)))
            return super().train_stream(images, masks, *args, **kwargs)

    job.space = Recording(job.cfg)
    job.callbacks, job.verbose = [], 0
    history = get_trainer(trainer).fit_job(job)
    assert len(history["main_dice"]) == 4 and len(history["val_main_dice"]) == 2
    assert (True, 0.5) in seen


# ------------------------------------------------------------------ 3D: the space's patch epoch
@pytest.fixture(scope="module")
def volume_data(tmp_path_factory):
    return make_volumes(tmp_path_factory.mktemp("semisup_volumes"))


def _volume_job(trainer: str, data, tmp_path, n_labelled: int = 4, from_scratch: bool = True, **settings) -> FitJob:
    cfg = _vol_cfg(data, tmp_path, trainer=trainer, **settings)
    job = FitJob(new_model(cfg, 0), cfg, None, None, None, None, None, tmp_path / "out", 1, 0,
                 from_scratch=from_scratch)
    train = job.space.load_split("train")
    job.val = job.space.load_split("val")
    job.x, job.y = Rows(train.images, np.arange(n_labelled)), Rows(train.masks, np.arange(n_labelled))
    job.is_pseudo = np.zeros(n_labelled, bool)
    job.unlabelled = Rows(train.images, np.arange(n_labelled, len(train.images)))
    job.normalizer = job.space.fit_normalizer()
    return job


@pytest.mark.slow
@pytest.mark.parametrize("trainer", ("standard", *POOL_TRAINERS))
def test_every_trainer_on_volumes_runs_the_space_patch_epoch(trainer, volume_data, tmp_path):
    """4 labelled volumes, 2 patches each (grid 24x32x16, patches 16x24x16), batch 2: 4 steps, where
    the pool trainers used to take ceil(4 / 2) = 2 (about one patch per volume)."""
    job = _volume_job(trainer, volume_data, tmp_path)
    assert job.space.steps_per_epoch(4) == 4 != math.ceil(4 / job.cfg.batch_size)
    assert _fit_steps(job).steps == [4]


@pytest.mark.slow
def test_pool_trainers_on_volumes_honour_steps_per_epoch(volume_data, tmp_path):
    job = _volume_job("bcp", volume_data, tmp_path, from_scratch=False, steps_per_epoch=3)
    count = _fit_steps(job)
    assert count.steps == [3] and count.from_scratch is False  # the job's from_scratch reaches the trainer


# ------------------------------------------------------------------ the warm-up rule by hand
@pytest.mark.parametrize("step, from_scratch, decay", [(0, True, 0.0), (1, True, 0.5), (3, True, 0.75),
                                                       (500, True, 0.99), (0, False, 0.99), (1, False, 0.99)])
def test_the_ema_decay_warms_up_only_from_scratch(step, from_scratch, decay):
    np.testing.assert_allclose(base.mean_teacher_decay(step, 0.99, from_scratch), decay, rtol=1e-6)


def _batches(spatial=(16, 16)):
    x_l = tf.random.stateless_normal((2, *spatial, 1), (1, 2))
    return x_l, tf.cast(x_l > 0, tf.float32), tf.random.stateless_normal((2, *spatial, 1), (3, 4))


@pytest.mark.parametrize("cls", [BCP, MeanTeacher])
@pytest.mark.parametrize("from_scratch", [True, False])
def test_the_first_update_of_a_pool_teacher(cls, from_scratch):
    """Decay 0.9. From scratch the first decay is 0: the teacher becomes the student. A trained model
    going on: decay 0.9 at once, teacher = 0.9 before + 0.1 student."""
    teacher = build_unet((16, 16, 1), base_filters=2, depth=3)
    trainer = cls(teacher, cls.Settings(ema_decay=0.9), seed=0, from_scratch=from_scratch)
    trainer.compile(optimizer=keras.optimizers.Adam(1e-2))
    before = teacher.get_weights()[0].copy()
    x_l, y_l, x_u = _batches()
    trainer.train_step(((x_l, y_l), x_u))
    student = trainer.student.get_weights()[0]
    expected = student if from_scratch else 0.9 * before + 0.1 * student
    np.testing.assert_allclose(teacher.get_weights()[0], expected, rtol=1e-5, atol=1e-7)
    assert not np.allclose(student, before)


@pytest.mark.parametrize("from_scratch", [True, False])
def test_the_first_update_of_boostmis_ema_copy(from_scratch):
    ema = build_unet((16, 16, 1), base_filters=2, depth=3)
    trainer = BoostMISTrainer(ema, BoostMISTrainer.Settings(ema_decay=0.9), seed=0, from_scratch=from_scratch)
    trainer.compile(optimizer=keras.optimizers.Adam(1e-2))
    before = ema.get_weights()[0].copy()
    x_l, y_l, x_u = _batches()
    trainer.train_step(((x_l, y_l), x_u))  # (an expert batch, a batch of the unlabelled pool)
    online = trainer.online.get_weights()[0]
    expected = online if from_scratch else 0.9 * before + 0.1 * online
    np.testing.assert_allclose(ema.get_weights()[0], expected, rtol=1e-5, atol=1e-7)
    assert not np.allclose(online, before)
