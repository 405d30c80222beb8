"""`boostmis`: BoostMIS's adaptive pseudo labels (METHODS.md section 6) on the paired sampler.

The noisy stream (the pseudo-labelled images) is treated as unlabelled: its given masks are not
used. Each step an EMA teacher (`theta_t = g theta_t + (1 - g) theta_s`, g = EMA_DECAY) looks at
the weak view (the batch as sampled, with the loader's flips where AUGMENT is on) and gives hard
per-pixel labels `y = 1[p > 0.5]`, kept where the confidence `max(p, 1-p)` reaches the adaptive
threshold of the pixel's class (`strategies.boostmis`: learning status from the per-class counts
of confident pixels and their change since the previous step, eps_t, tau(c)). The student sees a
strong view of the same images (photometric only, so the labels stay aligned: per-image contrast
x U(0.6, 1.4), offset U(-0.4, 0.4), Gaussian noise sigma 0.2, in normalised units) and learns
the kept labels by masked BCE on every head (`base.pixel_weighted_loss`). The update is Adam on
`(1/B) sum_i L_i(strong, kept) + expert_weight * mean_j L_j(clean)`. The checkpoint is the student
(the plain U-Net). Trackers: `mean_weight`/`kept_fraction` = the share of kept pixels.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from ..strategies.boostmis import LearningStatus
from .base import PairedTrainer, fit_paired, fit_plain, head_sum, pixel_weighted_loss, register_trainer, tf_variables


def strong_view(x, seed_generator, contrast=0.4, offset=0.4, noise=0.2):
    """Photometric strong augmentation of a normalised NHWC batch (geometry unchanged)."""
    b = tf.shape(x)[0]
    c = 1.0 + keras.random.uniform((b, 1, 1, 1), -contrast, contrast, seed=seed_generator)
    o = keras.random.uniform((b, 1, 1, 1), -offset, offset, seed=seed_generator)
    return x * c + o + noise * keras.random.normal(tf.shape(x), seed=seed_generator)


@register_trainer("boostmis")
class BoostMISTrainer(PairedTrainer):
    n_active = 0  # expert labels so far (N_A); `fit_arrays` binds it per round

    def __init__(self, segmenter: keras.Model, ema: float = 0.99, queries: int = 20, n_active: int | None = None,
                 seed: int = 0, base_tau: float = 0.95, **kwargs) -> None:
        super().__init__(segmenter, **kwargs)
        self.teacher = keras.Model.from_config(segmenter.get_config())  # the graph without its compile state
        self.teacher.set_weights(segmenter.get_weights())
        self.teacher.trainable = False
        self.ema, self.queries = float(ema), int(queries)
        self.n_active_labels = int(self.n_active if n_active is None else n_active)
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.status = LearningStatus(2, base_tau, self.n_active_labels, self.queries)

    @classmethod
    def config_kwargs(cls, cfg, total_steps: int) -> dict:
        return {"ema": cfg.ema_decay, "queries": cfg.nb_next_sample, "seed": cfg.seed, "base_tau": cfg.boostmis_tau}

    @classmethod
    def fit_arrays(cls, model, cfg, x, y, is_noisy, val, normalizer, callbacks, epochs, seed, verbose="auto"):
        from ..data import make_dataset

        bound = type(cls.__name__, (cls,), {"n_active": int((~np.asarray(is_noisy, bool)).sum())})
        val_ds = make_dataset(val.images, val.masks, normalizer, cfg.batch_size)
        history = fit_paired(bound, model, cfg, x, y, is_noisy, val_ds, normalizer, callbacks, epochs, seed, verbose)
        if history is None:
            history = fit_plain(model, cfg, x, y, val, normalizer, callbacks, epochs, seed, verbose)
        return history

    def pseudo_labels(self, x_weak) -> tuple[tf.Tensor, tf.Tensor]:
        """Hard labels `[B,H,W,1]` and their keep mask from the teacher's weak view; updates the status."""
        p = self.teacher(x_weak, training=False)["main"]
        conf = tf.maximum(p, 1.0 - p)
        cls = tf.cast(p > 0.5, tf.int32)
        tau = self.status.thresholds(conf, cls)
        keep = tf.cast(conf >= tf.gather(tau, cls), tf.float32)
        return tf.cast(cls, tf.float32), keep

    def train_step(self, data):
        (x_noisy, _), (x_clean, y_clean) = data
        target, keep = self.pseudo_labels(x_noisy)
        x_strong = strong_view(x_noisy, self.seed_generator)
        theta = self.segmenter.trainable_variables
        with tf.GradientTape() as tape:
            out_strong = self.segmenter(x_strong, training=True)
            out_clean = self.segmenter(x_clean, training=True)
            clean_loss = tf.reduce_mean(self.losses_of(out_clean, y_clean))
            unsup = tf.reduce_mean(head_sum(lambda h: pixel_weighted_loss(target, out_strong[h], keep, "bce"),
                                            self.ds_weights))
            total = unsup + self.expert_weight * clean_loss
            scaled = self.optimizer.scale_loss(total)
        grads = tape.gradient(scaled, tf_variables(theta), unconnected_gradients=tf.UnconnectedGradients.ZERO)
        self.optimizer.apply_gradients(zip(grads, theta))
        for t, s in zip(self.teacher.weights, self.segmenter.weights):
            t.assign(self.ema * t + (1.0 - self.ema) * s)
        return self.track(total, clean_loss, out_clean, y_clean, keep)
