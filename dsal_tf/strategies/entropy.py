"""Entropy query: mean binary entropy of the main head's pixels (one forward pass)."""

from __future__ import annotations

import tensorflow as tf

from .base import QueryStrategy, keep_features, mean_over_pixels, register_query

EPS = 1e-7


def binary_entropy(p):
    """H(p) = -p ln p - (1-p) ln(1-p), elementwise, in nats (max ln 2 at p = 0.5)."""
    p = tf.clip_by_value(p, EPS, 1.0 - EPS)
    return -(p * tf.math.log(p) + (1.0 - p) * tf.math.log(1.0 - p))


@register_query("entropy")
class EntropyQuery(QueryStrategy):
    def batch_scores(self, model, x):
        out = model(x, training=False)
        prob = out["main"]
        return keep_features(out, {"uncertainty": mean_over_pixels(binary_entropy(prob)), "prob": prob})
