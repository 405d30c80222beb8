"""Ensemble queries over T independently trained models (docs/methods.md#ensembles).

ensemble_s  = H(mean_t p_t)                 (entropy of the mean prediction)
ensemble_js = H(mean_t p_t) - mean_t H(p_t)  (Jensen-Shannon divergence: disagreement only)
Member 0 is the loop's own model; members 1..T-1 are trained with other seeds on the same data
each round, continuing from their own previous checkpoint (`Run.member_dir`: round_XX/member_k/).
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import tensorflow as tf

from ..run import CHECKPOINT, Run, is_done, stage
from ..settings import Settings, positive
from .base import QueryStrategy, keep_features, mean_over_pixels, register_query
from .entropy import binary_entropy


def ensemble_scores(probs):
    """probs [N,H,W,1,T] -> (H(mean), H(mean) - mean H), each [N] (mean over pixels)."""
    h_mean = binary_entropy(tf.reduce_mean(probs, axis=-1))
    mean_h = tf.reduce_mean(binary_entropy(probs), axis=-1)
    return mean_over_pixels(h_mean), mean_over_pixels(h_mean - mean_h)


class _Ensemble(QueryStrategy):
    use_js = False

    @dataclass(frozen=True)
    class Settings(Settings):
        nb_ensemble: int = 5  # models T in the ensemble (member 0 is the loop's own)

        def check(self):
            positive("nb_ensemble", self.nb_ensemble)

    def prepare(self, model, round_: int, run_dir, train_member) -> None:
        self.members = [model]
        run = Run(run_dir)
        for k in range(1, self.settings.nb_ensemble):
            out = run.member_dir(round_ - 1, k)
            if not is_done(out):
                start = run.member_dir(round_ - 2, k) / CHECKPOINT
                with stage(out):  # DONE after the member's checkpoint
                    train_member(out, start if start.is_file() else None, self.seed * 7919 + k * 101 + round_)
            self.members.append(keras.models.load_model(out / CHECKPOINT, compile=False))

    def batch_scores(self, model, x):
        # member 0 is the loop's model, the one the scoring pass was given (with features if asked)
        outs = [model(x, training=False)] + [m(x, training=False) for m in self.members[1:]]
        probs = tf.stack([o["main"] for o in outs], axis=-1)
        h_s, js = ensemble_scores(probs)
        return keep_features(outs[0], {"uncertainty": js if self.use_js else h_s, "prob": probs[..., 0]})


@register_query("ensemble_s")
class EnsembleEntropy(_Ensemble):
    use_js = False


@register_query("ensemble_js")
class EnsembleJS(_Ensemble):
    use_js = True
