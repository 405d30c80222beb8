"""MW-Net (Shu et al. 2019): a weight net maps each noisy sample's loss to its weight (docs/methods.md#mw-net).

Weight net: MLP 1 -> 100 -> 1, ReLU then sigmoid. Objective `O = (1/B) sum_i V(L_i) L_i` over the
noisy batch (L_i the deep-supervision loss of sample i); the bi-level step is `meta.MetaTrainer`'s.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from .base import register_trainer
from .meta import MetaTrainer


def weight_net(hidden: int = 100) -> keras.Model:
    """`[B] loss -> [B] weight in (0, 1)`, computed in float32 whatever the run's precision policy (the
    losses it reads are float32)."""
    loss = keras.Input(shape=(), name="loss")
    h = keras.layers.Reshape((1,), dtype="float32")(loss)
    h = keras.layers.Dense(hidden, activation="relu", name="hidden", dtype="float32")(h)
    w = keras.layers.Dense(1, activation="sigmoid", name="weight", dtype="float32")(h)
    return keras.Model(loss, keras.layers.Reshape((), dtype="float32")(w), name="mwnet_weight_net")


@register_trainer("mwnet")
class MWNet(MetaTrainer):
    """Per-sample weights `w_i = V(L_i)`."""

    def build_meta_net(self) -> keras.Model:
        return weight_net()

    def meta_input(self, outputs: dict, y) -> tf.Tensor:
        return self.losses_of(outputs, y)

    def objective(self, outputs: dict, y, w: tf.Tensor) -> tf.Tensor:
        return tf.reduce_mean(w * self.losses_of(outputs, y))
