"""Per-sample segmentation losses and the deep-supervision wrapper.

Inputs are channels-last probabilities in [0, 1] (NHWC in 2D, NDHWC in 3D); every loss returns one value
per sample, shape [N], so Keras sample weights and the noisy-teacher re-weighting act per image.
The batch Dice variants keep that contract by returning their one batch value broadcast to [N].
"""

from __future__ import annotations

from keras import ops

from .model import HEADS
from .space import item_axes

SMOOTH = 1.0
TINY = 1e-30  # the safe log's floor; 1 / (TINY * pixels) stays finite in float32


def soft_dice_loss(y_true, y_pred):
    """1 - (2|y p| + 1) / (|y| + |p| + 1), per sample."""
    y_true = ops.cast(y_true, y_pred.dtype)
    axes = item_axes(y_pred)
    inter = ops.sum(y_true * y_pred, axis=axes)
    total = ops.sum(y_true, axis=axes) + ops.sum(y_pred, axis=axes)
    return 1.0 - (2.0 * inter + SMOOTH) / (total + SMOOTH)


def batch_soft_dice_loss(y_true, y_pred):
    """nnU-Net's batch Dice: one soft Dice over every pixel of the batch [N,*spatial,C], broadcast to [N].

    Per image, a slice with little or no foreground scores 1/(|p| + 1) and pushes all of its
    probabilities to 0; over the batch its background only adds false positives to one shared
    ratio. Broadcast, Keras' batch mean returns the batch value and the deep-supervision weights
    apply per head as usual; a sample weight w scales it by mean(w) and cannot single out images.
    Under a distribution strategy the batch is the replica's batch."""
    y_true = ops.cast(y_true, y_pred.dtype)
    axes = item_axes(y_pred)
    inter = ops.sum(y_true * y_pred, axis=axes)
    total = ops.sum(y_true, axis=axes) + ops.sum(y_pred, axis=axes)
    value = 1.0 - (2.0 * ops.sum(inter) + SMOOTH) / (ops.sum(total) + SMOOTH)
    return ops.ones_like(inter) * value


def bce_loss(y_true, y_pred):
    """Pixel-mean binary cross-entropy, per sample, with a safe log instead of a clip at 1e-7.

    The former `log(clip(p, 1e-7, 1 - 1e-7))` had zero gradient wherever a head saturated below
    1e-7 (logit < -16), which froze a collapsed model on exactly the foreground pixels it had to
    recover (issue 20). `log(max(p, TINY))` passes the gradient down to p = 1e-30 (logit -69):
    through the sigmoid it is `p - y`, as from logits. It stays a function of the probabilities,
    so trainers that differentiate with respect to them (MW-Net's per-head step) see all of it."""
    y_true = ops.cast(y_true, y_pred.dtype)
    bce = -(y_true * ops.log(ops.maximum(y_pred, TINY)) + (1.0 - y_true) * ops.log(ops.maximum(1.0 - y_pred, TINY)))
    return ops.mean(bce, axis=item_axes(y_pred))


def bce_dice_loss(y_true, y_pred):
    return bce_loss(y_true, y_pred) + soft_dice_loss(y_true, y_pred)


def bce_batch_dice_loss(y_true, y_pred):
    """nnU-Net's default: cross-entropy + batch Dice."""
    return bce_loss(y_true, y_pred) + batch_soft_dice_loss(y_true, y_pred)


LOSSES = {"dice": soft_dice_loss, "bce": bce_loss, "bce_dice": bce_dice_loss}
BATCH_DICE = {"dice": batch_soft_dice_loss, "bce": bce_loss, "bce_dice": bce_batch_dice_loss}


def get_loss(name: str, batch_dice: bool = False):
    """The loss `name`; with `batch_dice` its Dice term is taken over the batch (BCE is unchanged)."""
    return (BATCH_DICE if batch_dice else LOSSES)[name]


def deep_supervision(loss_name: str, weights=(0.6, 0.3, 0.1), batch_dice: bool = False) -> tuple[dict, dict]:
    """`(losses, loss_weights)` dicts for `model.compile`: sum_k w_k * loss(y, p_k)."""
    fn = get_loss(loss_name, batch_dice)
    return {h: fn for h in HEADS}, {h: float(w) for h, w in zip(HEADS, weights)}


def dice(y_true, y_pred):
    """Hard Dice of the thresholded prediction, per sample (the metric behind `val_main_dice`)."""
    y_true = ops.cast(y_true > 0.5, "float32")
    y_pred = ops.cast(y_pred > 0.5, "float32")
    axes = item_axes(y_pred)
    inter = ops.sum(y_true * y_pred, axis=axes)
    total = ops.sum(y_true, axis=axes) + ops.sum(y_pred, axis=axes)
    return (2.0 * inter + SMOOTH) / (total + SMOOTH)
