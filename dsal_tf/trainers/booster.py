"""`Booster`: BoostMIS's semi-supervised update of a classification head on feature vectors
(`dsal classify`, docs/methods.md#boostmis-on-feature-vectors); not a segmentation trainer, so not in `TRAINERS`.

Batches are `((x_unlabelled,), (x_labelled, y_labelled))`, features `[B,D]`, labels `[B]` int. Each
step the online `head` gives hard labels on a weak view of the unlabelled batch (Gaussian noise
0.05 on standardised features), kept where the confidence reaches the cutoff of the label's class
(`rule.cutoffs`, a `classify.PSEUDO_RULES` class), and learns them by CE on a strong view (feature
dropout 0.3, noise 0.3) beside CE on the labelled batch. Then `ema_head` moves after it with
Mean Teacher's warm-up `min(1 - 1/(step+1), ema)`; `step0` = the updates of earlier rounds, as
the same two heads train on through the rounds.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from ..strategies.boostmis import confident
from .base import ema_update, mean_teacher_decay

WEAK_NOISE = 0.05  # weak view: x + 0.05 N(0, 1)
DROP = 0.3  # strong view: each feature zeroed with probability 0.3 (the rest scaled by 1 / 0.7) ...
STRONG_NOISE = 0.3  # ... plus 0.3 N(0, 1)


class Booster(keras.Model):
    """Trains `head` (online, the pseudo labeller) with `fit` and keeps `ema_head` (evaluated) after it.
    Heads map `[N,D]` to `{"prob": [N,C] softmax, "features": [N,H]}`."""

    def __init__(self, head: keras.Model, ema_head: keras.Model, rule, ema: float, seed: int, step0: int = 0):
        super().__init__()
        self.head, self.ema_head, self.rule = head, ema_head, rule
        self.ema, self.step0 = float(ema), int(step0)
        self.gen = keras.random.SeedGenerator(seed)
        self.tracker = keras.metrics.Mean(name="loss")
        self.kept = keras.metrics.Mean(name="kept_fraction")

    @property
    def metrics(self):
        return [self.tracker, self.kept]

    def pseudo_labels(self, x, update: bool = True):
        """Hard labels [N] of the online head on `x` [N,D] and their keep mask [N] (`update`: the rule counts them)."""
        p = tf.stop_gradient(self.head(x, training=False)["prob"])
        conf, cls = tf.reduce_max(p, axis=1), tf.argmax(p, axis=1)
        return cls, confident(conf, cls, self.rule.cutoffs(conf, cls, update))

    def train_step(self, data):
        (x_u,), (x_l, y_l) = data
        cls, keep = self.pseudo_labels(x_u + WEAK_NOISE * keras.random.normal(tf.shape(x_u), seed=self.gen))
        drop = tf.cast(keras.random.uniform(tf.shape(x_u), seed=self.gen) > DROP, tf.float32) / (1.0 - DROP)
        strong = x_u * drop + STRONG_NOISE * keras.random.normal(tf.shape(x_u), seed=self.gen)
        with tf.GradientTape() as tape:
            sup = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y_l, self.head(x_l)["prob"]))
            ce_u = keras.losses.sparse_categorical_crossentropy(cls, self.head(strong)["prob"])
            loss = sup + tf.reduce_mean(keep * ce_u)
        grads = tape.gradient(loss, self.head.trainable_variables)
        decay = mean_teacher_decay(self.optimizer.iterations + self.step0, self.ema)  # read before this update
        self.optimizer.apply_gradients(zip(grads, self.head.trainable_variables))
        ema_update(self.ema_head, self.head, decay)
        self.tracker.update_state(loss)
        self.kept.update_state(tf.reduce_mean(keep))
        return {m.name: m.result() for m in self.metrics}
