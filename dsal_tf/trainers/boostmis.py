"""`boostmis`: BoostMIS's adaptive pseudo labels (docs/methods.md#adaptive-pseudo-labels) on the paired sampler.

The noisy stream (the pseudo-labelled images) is treated as unlabelled: its given masks are not
used. Each step the online model (`online`, the one Adam trains) looks at the weak view (the batch
as sampled, with the loader's flips where AUGMENT is on) and gives hard per-pixel labels
`y = 1[p > 0.5]`, kept where the confidence `max(p, 1-p)` reaches the cutoff of the pixel's class
(`strategies.boostmis`: learning status from the counts of confident pixels and their change since
the previous step, eps_t with N_A = the expert images the last round added, and the
BOOSTMIS_THRESHOLD rule, one global eps_t by default). The online model sees a strong view of the
same images (photometric only, so the labels stay aligned: per-image contrast x U(0.6, 1.4),
offset U(-0.4, 0.4), Gaussian noise sigma 0.2, in normalised units) and learns the kept labels by
masked BCE on every head (`base.pixel_weighted_loss`). The update is Adam on
`(1/B) sum_i L_i(strong, kept) + expert_weight * mean_j L_j(clean)`, then the EMA copy moves,
`theta_e = g theta_e + (1 - g) theta_o` with Mean Teacher's warm-up `g = min(1 - 1/(step+1), EMA_DECAY)`.
The EMA copy is the wrapped `segmenter`: validation, the checkpoint and the next round (whose
online model starts from it) use it. Trackers: `mean_weight`/`kept_fraction` = the share of kept
pixels; `main_dice` is the online model's, on the clean batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from ..errors import DsalError
from ..settings import in_range, suggest
from ..strategies.boostmis import THRESHOLDS, LearningStatus, confident
from .base import (
    PairedSettings,
    PairedTrainer,
    ema_update,
    fit_paired,
    fit_plain,
    head_sum,
    mean_teacher_decay,
    pixel_weighted_loss,
    register_trainer,
    tf_variables,
)


def strong_view(x, seed_generator, contrast=0.4, offset=0.4, noise=0.2):
    """Photometric strong augmentation of a normalised channels-last batch, images `[B,H,W,C]` or
    volumes `[B,D,H,W,C]` (geometry unchanged, so the weak view's pixel labels stay aligned): one
    contrast and one offset per item, Gaussian noise per pixel."""
    per_item = (tf.shape(x)[0],) + (1,) * (len(x.shape) - 1)
    c = 1.0 + keras.random.uniform(per_item, -contrast, contrast, seed=seed_generator)
    o = keras.random.uniform(per_item, -offset, offset, seed=seed_generator)
    return x * c + o + noise * keras.random.normal(tf.shape(x), seed=seed_generator)


@register_trainer("boostmis")
class BoostMISTrainer(PairedTrainer):
    n_active = 0  # N_A: expert images the last round added; `fit_job` binds it per round

    @dataclass(frozen=True)
    class Settings(PairedSettings):
        ema_decay: float = 0.99  # EMA teacher (the evaluated, saved model)
        boostmis_tau: float = 0.95  # the fixed confidence cutoff that counts the learning status
        boostmis_threshold: str = "global"  # pseudo-label cutoff: "global" eps_t (authors' code) or "per_class"

        def check(self):
            super().check()
            in_range("ema_decay", self.ema_decay, 0.0, 1.0)
            in_range("boostmis_tau", self.boostmis_tau, 0.5, 1.0)
            if self.boostmis_threshold not in THRESHOLDS:
                raise DsalError(f"BOOSTMIS_THRESHOLD = {self.boostmis_threshold!r} is not one of "
                                f"{sorted(THRESHOLDS)}" + suggest(self.boostmis_threshold, THRESHOLDS))

    def __init__(self, segmenter: keras.Model, ema: float = 0.99, queries: int = 20, n_active: int | None = None,
                 seed: int = 0, base_tau: float = 0.95, threshold: str = "global", **kwargs) -> None:
        super().__init__(segmenter, **kwargs)  # `segmenter` is the EMA copy
        self.online = keras.Model.from_config(segmenter.get_config())  # the graph without its compile state
        self.online.set_weights(segmenter.get_weights())
        self.ema, self.queries = float(ema), int(queries)
        self.n_active_labels = int(self.n_active if n_active is None else n_active)
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.status = LearningStatus(2, base_tau, self.n_active_labels, self.queries, rule=threshold)

    @classmethod
    def config_kwargs(cls, cfg, total_steps: int) -> dict:
        s = cls.Settings.from_config(cfg)
        return {"ema": s.ema_decay, "queries": cfg.nb_next_sample, "seed": cfg.seed, "base_tau": s.boostmis_tau,
                "threshold": s.boostmis_threshold}

    @classmethod
    def fit_job(cls, job) -> dict:
        # the arrays do not say which round labelled what: expert images beyond NB_LABELED, at most one round's K
        cfg = job.cfg
        n_expert = int((~np.asarray(job.is_pseudo, bool)).sum())
        n_added = min(max(n_expert - cfg.nb_labeled, 0), cfg.nb_next_sample)
        bound = type(cls.__name__, (cls,), {"n_active": n_added})
        val_ds = job.space.eval_stream(job.val.images, job.val.masks, job.normalizer)
        history = fit_paired(bound, job, val_ds)
        return history if history is not None else fit_plain(job)

    def pseudo_labels(self, x_weak) -> tuple[tf.Tensor, tf.Tensor]:
        """Hard labels `[B,*spatial,1]` and their keep mask from the online model's weak view; updates the status."""
        p = tf.stop_gradient(self.online(x_weak, training=False)["main"])
        conf = tf.maximum(p, 1.0 - p)
        cls = tf.cast(p > 0.5, tf.int32)
        return tf.cast(cls, tf.float32), confident(conf, cls, self.status.thresholds(conf, cls))

    def train_step(self, data):
        (x_noisy, _), (x_clean, y_clean) = data
        target, keep = self.pseudo_labels(x_noisy)
        x_strong = strong_view(x_noisy, self.seed_generator)
        theta = self.online.trainable_variables
        with tf.GradientTape() as tape:
            out_strong = self.online(x_strong, training=True)
            out_clean = self.online(x_clean, training=True)
            clean_loss = tf.reduce_mean(self.losses_of(out_clean, y_clean))
            unsup = tf.reduce_mean(head_sum(lambda h: pixel_weighted_loss(target, out_strong[h], keep, "bce"),
                                            self.ds_weights))
            total = unsup + self.expert_weight * clean_loss
            scaled = self.optimizer.scale_loss(total)
        grads = tape.gradient(scaled, tf_variables(theta), unconnected_gradients=tf.UnconnectedGradients.ZERO)
        decay = mean_teacher_decay(self.optimizer.iterations, self.ema)  # read before this update: 0 first
        self.optimizer.apply_gradients(zip(grads, theta))
        ema_update(self.segmenter, self.online, decay)
        return self.track(total, clean_loss, out_clean, y_clean, keep)
