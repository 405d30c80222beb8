"""`mean_teacher`: the control for `bcp` (Tarvainen & Valpola, NeurIPS 2017; docs/methods.md#mean-teacher).

The same teacher, streams and labelled loss as `bcp`, no copy-paste: the student learns the
labelled batch (BCE + soft Dice per head, deep-supervision weights) plus a consistency term, the
mean squared difference between its main-head probabilities and the teacher's on two differently
perturbed views of the unlabelled batch (Gaussian input noise `TEACHER_NOISE`), weighted by
`MT_CONSISTENCY` times Mean Teacher's ramp-up `exp(-5 (1 - t)^2)` over the first `MT_RAMPUP` of
the steps that use the pool (after a new model's pre-training on the labels). What `bcp` gains over
it is what the mixing adds.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import tensorflow as tf

from ..settings import in_range, positive
from .base import head_sum, main_mask, pixel_weighted_loss, register_trainer
from .semisup import PoolTeacherTrainer, TeacherSettings


def rampup(step, total_steps: int, share: float) -> tf.Tensor:
    """Mean Teacher's sigmoid-shaped ramp `exp(-5 (1 - t)^2)`, t = step / (share * total), 1 after it."""
    length = max(share * total_steps, 1.0)
    t = tf.minimum(tf.cast(step, tf.float32) / length, 1.0)
    return tf.exp(-5.0 * tf.square(1.0 - t)) if share > 0 else tf.constant(1.0)


@register_trainer("mean_teacher")
class MeanTeacher(PoolTeacherTrainer):
    """Supervised loss plus student-teacher consistency on noisy views of unlabelled images."""

    @dataclass(frozen=True)
    class Settings(TeacherSettings):
        teacher_noise: float = 0.1  # Gaussian input noise sigma of each view (normalised units)
        mt_consistency: float = 1.0  # weight of the consistency term after the ramp-up
        mt_rampup: float = 0.3  # share of the fit's steps over which the consistency weight ramps up

        def check(self):
            super().check()
            positive("teacher_noise", self.teacher_noise, strict=False)
            positive("mt_consistency", self.mt_consistency, strict=False)
            in_range("mt_rampup", self.mt_rampup, 0.0, 1.0, high_open=False)

    def consistency_weight(self, step) -> tf.Tensor:
        """`MT_CONSISTENCY` times the ramp-up over the first `MT_RAMPUP` of the steps that use the pool:
        those after a new model's pre-training on the labels (the ramp would otherwise be over before
        the consistency term starts)."""
        after = tf.maximum(tf.cast(step, tf.float32) - self.pretrain_steps, 0.0)
        return self.settings.mt_consistency * rampup(after, self.total_steps - self.pretrain_steps,
                                                     self.settings.mt_rampup)

    def objective(self, data):
        (x_l, y_l), x_u = data
        y_l = tf.cast(main_mask(y_l), tf.float32)
        sigma = self.settings.teacher_noise
        x_s = x_u + tf.cast(sigma * keras.random.normal(tf.shape(x_u), seed=self.seed_generator), x_u.dtype)
        x_t = x_u + tf.cast(sigma * keras.random.normal(tf.shape(x_u), seed=self.seed_generator), x_u.dtype)
        p_t = tf.stop_gradient(tf.cast(self.segmenter(x_t, training=False)["main"], tf.float32))
        n = tf.shape(x_l)[0]
        out = self.student(tf.concat([x_l, x_s], 0), training=True)
        ones = tf.ones_like(y_l)
        sup = tf.reduce_mean(head_sum(lambda h: pixel_weighted_loss(y_l, out[h][:n], ones, "bce_dice"),
                                      self.ds_weights))
        cons = tf.reduce_mean(tf.square(tf.cast(out["main"][n:], tf.float32) - p_t))
        weight = self.consistency_weight(self.optimizer.iterations)
        p = tf.cast(out["main"][:n], tf.float32)
        dice = (2 * tf.reduce_sum(p * y_l) + 1) / (tf.reduce_sum(p) + tf.reduce_sum(y_l) + 1)
        return sup + weight * cons, dice
