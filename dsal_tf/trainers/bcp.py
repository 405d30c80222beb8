"""`bcp`: bidirectional copy-paste mean teacher (Bai et al., CVPR 2023; docs/methods.md#bcp).

Each step: a labelled batch `(x_l, y_l)` and an unlabelled batch `x_u` from the pool. The EMA
teacher labels `x_u` (threshold 0.5; with `BCP_LARGEST_COMPONENT` only each image's largest
connected component). A random box, `BCP_BOX` of each side, is pasted both ways (`copy_paste`):
labelled into unlabelled and unlabelled into labelled, with the matching mixed targets (the
expert mask where the pixels came from a labelled image, the teacher's mask elsewhere). The
student learns both mixes with BCE + soft Dice per head, weighted by the deep-supervision weights,
the teacher-labelled pixels weighted by `BCP_UNLABELLED_WEIGHT`. Then the teacher follows the
student (`semisup.PoolTeacherTrainer`). A model that starts from scratch first learns the labels
alone; with `BCP_PRETRAIN_MIX` (the authors' code, the default) on pairs of labelled images mixed by
the same box (`paste_labelled`), so the student meets seams before the pool. The same code mixes 2D
images and 3D patches.
"""

from __future__ import annotations

from dataclasses import dataclass

import tensorflow as tf

from ..settings import in_range
from .base import head_sum, main_mask, pixel_weighted_loss, register_trainer
from .semisup import PoolTeacherTrainer, TeacherSettings, box_mask, copy_paste, largest_component, paste_labelled


@register_trainer("bcp")
class BCP(PoolTeacherTrainer):
    """Bidirectional copy-paste between labelled and unlabelled images, with an EMA teacher."""

    @dataclass(frozen=True)
    class Settings(TeacherSettings):
        bcp_unlabelled_weight: float = 0.5  # loss weight of the pixels the teacher labelled
        bcp_box: float = 2 / 3  # side of the pasted box, as a share of each image side
        bcp_largest_component: bool = False  # keep only the largest component of the teacher's masks
        bcp_pretrain_mix: bool = True  # pre-training on labelled pairs mixed by the box (the authors' code)

        def check(self):
            super().check()
            in_range("bcp_unlabelled_weight", self.bcp_unlabelled_weight, 0.0, 1.0, high_open=False)
            in_range("bcp_box", self.bcp_box, 0.0, 1.0, high_open=False)

    def teacher_targets(self, x_u) -> tf.Tensor:
        masks = self.teacher_masks(x_u)
        if self.settings.bcp_largest_component:
            masks = tf.ensure_shape(tf.numpy_function(largest_component, [masks], tf.float32, stateful=False),
                                    masks.shape)
        return masks

    def supervised(self, data):
        """Pre-training: the labels alone, on labelled pairs mixed by a box (`BCP_PRETRAIN_MIX`)."""
        if not self.settings.bcp_pretrain_mix:
            return super().supervised(data)
        (x_l, y_l), x_u = data
        y_l = tf.cast(main_mask(y_l), tf.float32)
        return super().supervised((paste_labelled(x_l, y_l, box_mask(y_l, self.settings.bcp_box, self.stamp())),
                                   x_u))

    def objective(self, data):
        (x_l, y_l), x_u = data
        y_l = tf.cast(main_mask(y_l), tf.float32)
        n = tf.minimum(tf.shape(x_l)[0], tf.shape(x_u)[0])
        x_l, y_l, x_u = x_l[:n], y_l[:n], x_u[:n]
        m = box_mask(y_l, self.settings.bcp_box, self.stamp())
        x, target, weight = copy_paste(x_l, y_l, x_u, self.teacher_targets(x_u), m,
                                       self.settings.bcp_unlabelled_weight)
        out = self.student(x, training=True)
        loss = tf.reduce_mean(head_sum(lambda h: pixel_weighted_loss(target, out[h], weight, "bce_dice"),
                                       self.ds_weights))
        # the student's soft Dice on the expert-labelled pixels of the first mix (its progress on real labels)
        p = tf.cast(out["main"][:n], tf.float32) * m
        dice = (2 * tf.reduce_sum(p * y_l * m) + 1) / (tf.reduce_sum(p) + tf.reduce_sum(y_l * m) + 1)
        return loss, dice
