"""Per-sample segmentation losses and the deep-supervision wrapper.

Inputs are NHWC probabilities in [0, 1]; every loss returns one value per sample, shape [N],
so Keras sample weights and the noisy-teacher re-weighting act per image.
"""

from __future__ import annotations

import keras
from keras import ops

from .model import HEADS

SMOOTH = 1.0


def soft_dice_loss(y_true, y_pred):
    """1 - (2|y p| + 1) / (|y| + |p| + 1), per sample."""
    y_true = ops.cast(y_true, y_pred.dtype)
    axes = tuple(range(1, len(y_pred.shape)))
    inter = ops.sum(y_true * y_pred, axis=axes)
    total = ops.sum(y_true, axis=axes) + ops.sum(y_pred, axis=axes)
    return 1.0 - (2.0 * inter + SMOOTH) / (total + SMOOTH)


def bce_loss(y_true, y_pred):
    """Pixel-mean binary cross-entropy, per sample."""
    y_true = ops.cast(y_true, y_pred.dtype)
    eps = keras.backend.epsilon()
    p = ops.clip(y_pred, eps, 1.0 - eps)
    bce = -(y_true * ops.log(p) + (1.0 - y_true) * ops.log(1.0 - p))
    return ops.mean(bce, axis=tuple(range(1, len(y_pred.shape))))


def bce_dice_loss(y_true, y_pred):
    return bce_loss(y_true, y_pred) + soft_dice_loss(y_true, y_pred)


LOSSES = {"dice": soft_dice_loss, "bce": bce_loss, "bce_dice": bce_dice_loss}


def get_loss(name: str):
    return LOSSES[name]


def deep_supervision(loss_name: str, weights=(0.6, 0.3, 0.1)) -> tuple[dict, dict]:
    """`(losses, loss_weights)` dicts for `model.compile`: sum_k w_k * loss(y, p_k)."""
    fn = get_loss(loss_name)
    return {h: fn for h in HEADS}, {h: float(w) for h, w in zip(HEADS, weights)}


def dice(y_true, y_pred):
    """Hard Dice of the thresholded prediction, per sample (the metric behind `val_main_dice`)."""
    y_true = ops.cast(y_true > 0.5, "float32")
    y_pred = ops.cast(y_pred > 0.5, "float32")
    axes = tuple(range(1, len(y_pred.shape)))
    inter = ops.sum(y_true * y_pred, axis=axes)
    total = ops.sum(y_true, axis=axes) + ops.sum(y_pred, axis=axes)
    return (2.0 * inter + SMOOTH) / (total + SMOOTH)
