"""The shared core of the semi-supervised trainers that learn from the whole unlabelled pool.

Every step takes a labelled batch (the round's expert labels, and pseudo labels if the run asks for
them) and a batch of unlabelled pool images (`train.FitJob.unlabelled_stream`). A student trains; an
EMA teacher `theta_t = g theta_t + (1 - g) theta_s` follows it. A model that starts from scratch
(`FitJob.from_scratch`) first learns the labels alone for `SEMISUP_PRETRAIN` of its steps with g = 0
(the teacher a copy), then g = EMA_DECAY; with `SEMISUP_PRETRAIN = 0` it uses Mean Teacher's warm-up
`g = min(1 - 1/(step + 1), EMA_DECAY)`. A model that continues a trained one (a later round: its
teacher is useful already) runs the method with g = EMA_DECAY from its first step. The teacher is
the wrapped `segmenter`: it is what validation measures, what the checkpoint saves, what the next
round scores the pool with and what the next round's student starts from. An epoch is the space's
epoch over the labelled set (`steps_per_epoch`: ceil(n / BATCH_SIZE) batches of images, or a volume
space's patch steps), as in a plain fit, with the same labelled stream (`FOREGROUND_OVERSAMPLE`
included) and the same validation epochs (`VALIDATION_FREQ`), so the best epoch is chosen among as
many as a plain fit's. An algorithm (`bcp.py`, `mean_teacher.py`) overrides `objective` only.

Layout: channels last, `[B,*spatial,C]`; masks `[B,*spatial,1]`. Everything here is rank-generic:
boxes and mixing work on 2D images and on 3D patches alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from .. import losses as losses_lib
from ..settings import Settings, in_range
from .base import (
    DS_WEIGHTS,
    ema_update,
    fit_plain,
    head_sum,
    main_mask,
    mean_teacher_decay,
    pixel_weighted_loss,
    tf_variables,
)


@dataclass(frozen=True)
class TeacherSettings(Settings):
    ema_decay: float = 0.99  # EMA teacher
    semisup_pretrain: float = 0.5  # share of a from-scratch fit trained on the labels alone (teacher = a copy)

    def check(self):
        in_range("ema_decay", self.ema_decay, 0.0, 1.0)
        in_range("semisup_pretrain", self.semisup_pretrain, 0.0, 1.0)


def box_mask(like, share: float, seed) -> tf.Tensor:
    """`[B,*spatial,1]` float mask for a batch shaped like `like` (spatial sizes static), 1 inside one
    random box per sample whose side along every spatial axis is `round(share * size)`, placed
    uniformly (stateless, `seed` = 2 ints)."""
    spatial = [int(s) for s in like.shape[1:-1]]
    b = tf.shape(like)[0]
    mask = tf.ones([b] + [1] * (len(spatial) + 1), tf.float32)
    for k, size in enumerate(spatial):
        side = max(1, int(round(share * size)))
        start = tf.random.stateless_uniform([b], seed + k, 0, size - side + 1, dtype=tf.int32)
        r = tf.range(size)[None, :]
        inside = tf.cast((r >= start[:, None]) & (r < start[:, None] + side), tf.float32)  # [B, size]
        view = [b] + [1] * len(spatial) + [1]
        view[k + 1] = size
        mask = mask * tf.reshape(inside, view)
    return mask


def copy_paste(x_l, y_l, x_u, y_u, m, unlabelled_weight: float):
    """Bidirectional copy-paste (BCP): `m` = 1 inside the box.

    in  = x_l m + x_u (1 - m)   (labelled pasted into unlabelled), target y_l m + y_u (1 - m)
    out = x_u m + x_l' (1 - m)  (unlabelled pasted into labelled), target y_u m + y_l' (1 - m)
    where `x_l'` is the labelled batch rolled by one item (item i takes labelled item i - 1), so the
    two mixes pair each unlabelled image with two different labelled ones, as BCP's four-image
    pairing does (with a batch of one, the same one). METHODS.md's M is 1 outside the box (its X_in
    is the unlabelled box in a labelled image); with both mixes made, the pair of images is the same.
    Pixel weights: 1 where the target is an expert mask, `unlabelled_weight` where it is the
    teacher's. Returns (images, targets, weights), the two mixes stacked on the batch axis."""
    m = tf.cast(m, x_l.dtype)
    mt = tf.cast(m, tf.float32)
    a = float(unlabelled_weight)
    x_l2, y_l2 = tf.roll(x_l, 1, axis=0), tf.roll(y_l, 1, axis=0)
    x_in, x_out = x_l * m + x_u * (1 - m), x_u * m + x_l2 * (1 - m)
    t_in, t_out = y_l * mt + y_u * (1 - mt), y_u * mt + y_l2 * (1 - mt)
    w_in, w_out = mt + a * (1 - mt), a * mt + (1 - mt)
    return tf.concat([x_in, x_out], 0), tf.concat([t_in, t_out], 0), tf.concat([w_in, w_out], 0)


def paste_labelled(x_l, y_l, m):
    """BCP's pre-training mix (the authors' code): each labelled image takes, inside its box `m`, the
    pixels and mask of the labelled batch rolled by one (item i those of item i - 1; with a batch of
    one, itself). Returns (images, masks), every pixel expert-labelled."""
    x_l2, y_l2 = tf.roll(x_l, 1, axis=0), tf.roll(y_l, 1, axis=0)
    return x_l * (1 - tf.cast(m, x_l.dtype)) + x_l2 * tf.cast(m, x_l.dtype), y_l * (1 - m) + y_l2 * m


def largest_component(masks: np.ndarray) -> np.ndarray:
    """Per item, only the largest connected foreground component of a {0,1} `[B,*spatial,1]` batch."""
    from scipy import ndimage

    out = np.zeros_like(masks)
    for i, m in enumerate(masks[..., 0]):
        labels, n = ndimage.label(m > 0.5)
        if n:
            sizes = np.bincount(labels.ravel())[1:]
            out[i, ..., 0] = labels == (1 + int(np.argmax(sizes)))
    return out


def scalars(pair) -> tuple[tf.Tensor, tf.Tensor]:
    """(loss, dice) as float32 scalars, whichever objective the step's phase runs."""
    return tuple(tf.reshape(tf.cast(tf.reduce_mean(v), tf.float32), []) for v in pair)


class PoolTeacherTrainer(keras.Model):
    """Wraps the round's U-Net as the EMA teacher (`segmenter`) and trains a student copy on
    `((x_l, y_l), x_u)` batches. Subclasses give `objective(data)` -> (loss, main_dice of the student
    on labelled pixels) and declare `Settings`."""

    name = "pool-teacher"
    uses_pool = True  # learns from the unlabelled pool: whole-image pseudo labels default to none
    Settings = TeacherSettings

    def __init__(self, segmenter: keras.Model, settings: Settings, ds_weights=DS_WEIGHTS, seed: int = 0,
                 total_steps: int = 1, from_scratch: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        self.segmenter = segmenter  # the teacher
        # from the config, not clone_model: a compiled segmenter would be recompiled from its loss names
        self.student = keras.Model.from_config(segmenter.get_config())
        self.student.set_weights(segmenter.get_weights())
        self.settings, self.ds_weights = settings, tuple(float(w) for w in ds_weights)
        self.total_steps = max(int(total_steps), 1)
        self.from_scratch = bool(from_scratch)
        # a new model first learns the labels alone, its teacher a copy of it (BCP's pre-training; METHODS §8)
        self.pretrain_steps = int(round(settings.semisup_pretrain * self.total_steps)) if from_scratch else 0
        self.pretraining = self.pretrain_steps > 0  # this step's phase, fixed in each traced step (`train_step`)
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.dice_tracker = keras.metrics.Mean(name="main_dice")
        self.built = True

    @classmethod
    def fit_job(cls, job) -> dict:
        """Plain `fit` where there is no unlabelled image, else the student/teacher fit over the pool,
        an epoch of the space's steps over the labelled set."""
        unlabelled = job.unlabelled_stream(seed=job.seed + 1)
        if unlabelled is None:
            return fit_plain(job)
        cfg = job.cfg
        steps = job.space.steps_per_epoch(len(job.y))
        # the fit's seed (the round's), as a plain fit's: each round draws its own boxes and noise
        trainer = cls(job.model, cls.Settings.from_config(cfg), cfg.ds_weights, job.seed, steps * max(job.epochs, 1),
                      from_scratch=job.from_scratch)
        trainer.compile(optimizer=keras.optimizers.Adam(cfg.learning_rate))
        labelled = job.space.train_stream(job.x, job.y, job.normalizer, job.seed, repeat=True,
                                          foreground_oversample=cfg.foreground_oversample)
        ds = tf.data.Dataset.zip((labelled, unlabelled)).prefetch(tf.data.AUTOTUNE)
        val_ds = job.space.eval_stream(job.val.images, job.val.masks, job.normalizer)
        # validated as often as a plain fit (VALIDATION_FREQ): the best epoch is chosen among as many
        return trainer.fit(ds, steps_per_epoch=steps, validation_data=val_ds, epochs=job.epochs,
                           callbacks=job.callbacks, verbose=job.verbose, shuffle=False,
                           validation_freq=job.validation_freq).history

    @property
    def metrics(self) -> list:
        return [self.loss_tracker, self.dice_tracker]

    def compile(self, optimizer="adam", jit_compile: bool | str = False, **kwargs) -> None:
        super().compile(optimizer=optimizer, jit_compile=jit_compile, **kwargs)

    def make_train_function(self, force: bool = False):
        """Keras' step function made twice, one traced for the pre-training steps (the labels alone) and one
        for the method's, each with its phase fixed (`pretraining`); each step calls the one its step number
        needs. One graph holding both objectives behind a `tf.cond` rounded differently from one process to
        the next (fp32 on CPU with oneDNN, two or more threads), so a run, or a resumed round, did not repeat
        itself (tests/test_pool_determinism.py)."""
        if self.train_function is not None and not force:
            return self.train_function
        phases = {}
        for phase in (True, False):
            super().make_train_function(force=True)
            phases[phase] = self.train_function

        def train_function(iterator):
            if self.pretraining:  # once over, pre-training never comes back: no step count read after it
                self.pretraining = int(self.optimizer.iterations.numpy()) < self.pretrain_steps
            return phases[self.pretraining](iterator)

        self.train_function = train_function
        return train_function

    def call(self, x, training: bool = False):
        return self.segmenter(x, training=training)

    def stamp(self) -> tf.Tensor:
        """Two int32 seeds for this step's stateless draws (boxes), from the trainer's generator."""
        return tf.cast(keras.random.randint((2,), 0, 2**30, seed=self.seed_generator), tf.int32)

    def teacher_masks(self, x_u) -> tf.Tensor:
        """The teacher's hard masks `[B,*spatial,1]` of unlabelled images (no gradient)."""
        p = tf.stop_gradient(tf.cast(self.segmenter(x_u, training=False)["main"], tf.float32))
        return tf.cast(p > 0.5, tf.float32)

    def objective(self, data) -> tuple[tf.Tensor, tf.Tensor]:
        raise NotImplementedError

    def supervised(self, data) -> tuple[tf.Tensor, tf.Tensor]:
        """The labels alone (the pre-training of a new model): BCE + soft Dice per head on the labelled
        batch, and the student's soft Dice on it; the unlabelled batch is not used."""
        (x_l, y_l), _ = data
        y_l = tf.cast(main_mask(y_l), tf.float32)
        out = self.student(x_l, training=True)
        loss = tf.reduce_mean(head_sum(lambda h: pixel_weighted_loss(y_l, out[h], tf.ones_like(y_l), "bce_dice"),
                                       self.ds_weights))
        return loss, tf.reduce_mean(losses_lib.dice(y_l, tf.cast(out["main"], tf.float32)))

    def train_step(self, data):
        theta = self.student.trainable_variables
        step = self.optimizer.iterations
        if tf.executing_eagerly():  # called directly, or run eagerly: this step's phase
            self.pretraining = int(step.numpy()) < self.pretrain_steps
        pretraining = self.pretraining  # a Python bool: the traced step holds one objective, no `tf.cond`
        with tf.GradientTape() as tape:
            total, dice = scalars(self.supervised(data) if pretraining else self.objective(data))
            scaled = self.optimizer.scale_loss(total)
        grads = tape.gradient(scaled, tf_variables(theta), unconnected_gradients=tf.UnconnectedGradients.ZERO)
        # read before this update: 0 while pre-training (the teacher is the student's copy), then EMA_DECAY (the
        # teacher starts from a trained copy); without pre-training Mean Teacher's warm-up from scratch
        warm = mean_teacher_decay(step, self.settings.ema_decay, self.from_scratch and self.pretrain_steps == 0)
        decay = tf.zeros_like(warm) if pretraining else warm
        self.optimizer.apply_gradients(zip(grads, theta))
        ema_update(self.segmenter, self.student, decay)
        self.loss_tracker.update_state(total)
        self.dice_tracker.update_state(dice)
        return {m.name: m.result() for m in self.metrics}

    def test_step(self, data):
        x, y = data[0], data[1]  # validation: the teacher; `val_loss` is 1 - its Dice (`losses.dice`)
        outputs = self.segmenter(x, training=False)
        value = losses_lib.dice(main_mask(y), outputs["main"])
        self.dice_tracker.update_state(value)
        self.loss_tracker.update_state(1.0 - value)
        return {m.name: m.result() for m in self.metrics}


__all__ = ["PoolTeacherTrainer", "TeacherSettings", "box_mask", "copy_paste", "largest_component", "paste_labelled"]
