"""MCPM, meta corrupted pixels mining (docs/methods.md#mcpm): per-pixel weights from a small fully
convolutional meta net on the per-pixel loss map, learned by `meta.MetaTrainer`'s bi-level step.

Meta net on the loss map L `[B,*spatial,1]` (the main head's pixel cross-entropy; soft Dice has no
per-pixel loss): two branches [3x3 conv 1->32, ReLU, 3x3 conv 32->1] and [5x5 conv 1->32, ReLU,
5x5 conv 32->1], concatenated with L, then a 3x3 conv 3->1 and a sigmoid: R in (0,1). The convs have
the segmenter's rank: 3x3 and 5x5 on images, 3x3x3 and 5x5x5 on volumes.
Objective `O = (1/B) sum_i sum_k ds_k mean_xy R_xy BCE(y_i, p_k,i)_xy`: per-pixel cross-entropy
whatever `LOSS` says, so O is linear in R (halving R halves O). An R-weighted soft Dice barely moves
when R is scaled, so the meta net could not down-weight a corrupted region through it. One map R,
from the main head, weighs every head (the side heads are upsampled to full size). The clean
(meta) loss and the expert term keep the run's `LOSS`.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from ..model import _RANK_LAYERS  # the conv of each spatial rank, as the U-Net builds it
from .base import head_sum, pixel_bce, pixel_weighted_loss, register_trainer
from .meta import MetaTrainer


def mask_net(width: int = 32, rank: int = 2) -> keras.Model:
    """`[B,*spatial,1]` loss map -> pixel weights of the same shape in (0, 1); any spatial size.
    `rank` = 2 (images, Conv2D) or 3 (volumes, Conv3D), the segmenter's. Computed in float32 whatever the
    run's precision policy, as the loss map it reads."""
    conv = _RANK_LAYERS[rank]["conv"]
    loss = keras.Input(shape=(None,) * rank + (1,), name="loss_map")
    a = conv(width, 3, padding="same", activation="relu", name="a1", dtype="float32")(loss)
    a = conv(1, 3, padding="same", name="a2", dtype="float32")(a)
    b = conv(width, 5, padding="same", activation="relu", name="b1", dtype="float32")(loss)
    b = conv(1, 5, padding="same", name="b2", dtype="float32")(b)
    h = keras.layers.Concatenate(name="concat", dtype="float32")([a, b, loss])
    r = conv(1, 3, padding="same", activation="sigmoid", name="weight", dtype="float32")(h)
    return keras.Model(loss, r, name="mcpm_mask_net")


@register_trainer("mcpm")
class MCPM(MetaTrainer):
    """Per-pixel weights `R = V(L)`."""

    def build_meta_net(self) -> keras.Model:
        return mask_net(rank=len(self.segmenter.inputs[0].shape) - 2)

    def meta_input(self, outputs: dict, y) -> tf.Tensor:
        return pixel_bce(y["main"] if isinstance(y, dict) else y, outputs["main"])

    def objective(self, outputs: dict, y, w: tf.Tensor) -> tf.Tensor:
        target = (lambda h: y[h]) if isinstance(y, dict) else (lambda h: y)
        per_sample = head_sum(lambda h: pixel_weighted_loss(target(h), outputs[h], w, "bce"), self.ds_weights)
        return tf.reduce_mean(per_sample)
