"""The control for every re-weighting trainer: the same sampler and the same step, uniform weights.

Update: Adam on `(1/B) sum_i L_i(noisy) + expert_weight * mean_j L_j(clean)`, i.e. `w_i = 1/B`
in `ReweightedTrainer`'s step, with no trust or informativeness score computed. Against RGS
(whose weights also sum to 1, or to 0 when no sample helps) the only difference is the weights.
"""

from __future__ import annotations

import tensorflow as tf

from .base import register_trainer
from .reweight import ReweightedTrainer


@register_trainer("uniform")
class Uniform(ReweightedTrainer):
    """`w_i = 1/B` for every noisy sample."""

    def needs_trust(self) -> bool:
        return False

    def needs_informativeness(self) -> bool:
        return False

    def sample_weights(self, e, g, losses: tf.Tensor) -> tf.Tensor:
        return tf.ones_like(losses) / tf.cast(tf.shape(losses)[0], losses.dtype)
