"""Random query: the baseline every strategy must beat."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from .base import QueryStrategy, register_query


@register_query("random")
class RandomQuery(QueryStrategy):
    def batch_scores(self, model, x):
        prob = model(x, training=False)["main"]
        return {"uncertainty": tf.zeros(tf.shape(prob)[:1]), "prob": prob}

    def select(self, scores, n, rng: np.random.Generator) -> np.ndarray:
        return rng.permutation(len(scores["uncertainty"]))[:n]
