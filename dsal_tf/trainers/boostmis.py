"""`boostmis`: BoostMIS's adaptive pseudo labels (docs/methods.md#adaptive-pseudo-labels) on the whole unlabelled pool.

Each step takes a batch of the expert images (the run's training stream) and a batch of the whole
unlabelled pool (`FitJob.unlabelled_stream`, as the semi-supervised trainers; before issue 27 it was only
the few images the weak labeler had picked, whose masks it then ignored). Under it the round's whole-image
pseudo labels default to none (`uses_pool`); any that a run asks for stay out of the expert stream. Each
step the online model (`online`, the one the optimizer trains; with BOOSTMIS_LABELLER =
"ema" the EMA copy) looks at the weak view (the batch as sampled, with the loader's flips where
AUGMENT is on) and gives hard per-pixel labels
`y = 1[p > 0.5]`, kept where the confidence `max(p, 1-p)` reaches the cutoff of the pixel's class
(`strategies.boostmis`: learning status from the counts of confident pixels and their change since
the previous step, eps_t with N_A = the expert images the last round added, and the
BOOSTMIS_THRESHOLD rule, one global eps_t by default; BOOSTMIS_CUTOFF = "constant": the authors' code's
0.95; none before update BOOSTMIS_WARMUP of the round). The online model sees a strong view of the
same images (photometric only, so the labels stay aligned: per-image contrast x U(0.6, 1.4),
offset U(-0.4, 0.4), Gaussian noise sigma 0.2, in normalised units) and learns the kept labels by
masked BCE on every head (`base.pixel_weighted_loss`). The update is Adam (BOOSTMIS_OPTIMIZER = "sgd":
the authors' SGD 0.03, momentum 0.9, coupled weight decay 5e-4 on kernels, `booster.l2_gradients`) on
`(1/B) sum_i L_i(strong, kept) + expert_weight * mean_j L_j(clean)`, then the EMA copy moves,
`theta_e = g theta_e + (1 - g) theta_o` with Mean Teacher's warm-up `g = min(1 - 1/(step+1), EMA_DECAY)`
when the model starts from scratch, `g = EMA_DECAY` when it continues a trained one (`FitJob.from_scratch`).
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
from ..settings import in_range, positive, suggest
from ..strategies.boostmis import CUTOFFS, THRESHOLDS, LearningStatus, confident
from .base import (
    PairedSettings,
    PairedTrainer,
    ema_update,
    fit_plain,
    head_sum,
    mean_teacher_decay,
    pixel_weighted_loss,
    register_trainer,
    tf_variables,
)

LABELLERS = ("online", "ema")  # BOOSTMIS_LABELLER: which model's weak view gives the pseudo labels
OPTIMIZERS = {  # BOOSTMIS_OPTIMIZER: (learning rate, momentum, coupled weight decay)
    "adam": (1e-3, None, 0.0),  # ours
    "sgd": (0.03, 0.9, 5e-4),  # the authors' code
}


def choice(name: str, value: str, options) -> None:
    if value not in options:
        raise DsalError(f"{name.upper()} = {value!r} is not one of {sorted(options)}" + suggest(value, options))


def make_optimizer(name: str, learning_rate: float | None = None) -> tuple[keras.optimizers.Optimizer, float]:
    """The `OPTIMIZERS` entry as a Keras optimizer (momentum SGD: `m = 0.9 m - lr g`, `w += m`, PyTorch's
    update at a constant rate) and its coupled weight decay, for `l2_gradients`."""
    lr, momentum, wd = OPTIMIZERS[name]
    lr = lr if learning_rate is None else learning_rate
    if momentum is None:
        return keras.optimizers.Adam(lr), wd
    return keras.optimizers.SGD(lr, momentum=momentum), wd


def l2_gradients(grads, variables, weight_decay: float) -> list:
    """`g + wd w` for kernels (variables of rank >= 2), biases unchanged: PyTorch's `weight_decay`,
    which the authors apply to everything but biases and batch norm."""
    if not weight_decay:
        return list(grads)
    return [g + weight_decay * tf.convert_to_tensor(v) if len(v.shape) >= 2 and g is not None else g
            for g, v in zip(grads, variables)]


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
    uses_pool = True  # its unlabelled stream is the pool: whole-image pseudo labels default to none

    @dataclass(frozen=True)
    class Settings(PairedSettings):
        """Defaults: today's (the paper's adaptive rule, Adam, online labels, no warm-up); the authors' code
        runs `constant`, `sgd` and EMA 0.999 (docs/methods.md#boostmis-deviations); `dsal classify`'s
        `Booster.Settings` adds the first labels and distribution alignment."""

        ema_decay: float = 0.99  # EMA teacher (the evaluated, saved model); the authors' code: 0.999
        boostmis_tau: float = 0.95  # the fixed confidence cutoff that counts the learning status
        boostmis_threshold: str = "global"  # pseudo-label cutoff: "global" eps_t (authors' code) or "per_class"
        boostmis_cutoff: str = "adaptive"  # eps_t: "adaptive" (the paper) or "constant" 0.95 (the authors' code)
        boostmis_labeller: str = "online"  # pseudo labels from the "online" model's weak view or the "ema" one
        boostmis_warmup: int = 0  # updates without pseudo labels first (each round's; classify with one head: in all)
        boostmis_optimizer: str = "adam"  # "adam" (ours) or "sgd": 0.03, momentum 0.9, weight decay 5e-4 (authors')

        def check(self):
            super().check()
            in_range("ema_decay", self.ema_decay, 0.0, 1.0)
            in_range("boostmis_tau", self.boostmis_tau, 0.5, 1.0)
            choice("boostmis_threshold", self.boostmis_threshold, THRESHOLDS)
            choice("boostmis_cutoff", self.boostmis_cutoff, CUTOFFS)
            choice("boostmis_labeller", self.boostmis_labeller, LABELLERS)
            positive("boostmis_warmup", self.boostmis_warmup, strict=False)
            choice("boostmis_optimizer", self.boostmis_optimizer, OPTIMIZERS)

    def __init__(self, segmenter: keras.Model, settings: Settings | None = None, queries: int = 20,
                 n_active: int | None = None, seed: int = 0, **kwargs) -> None:
        """`settings`: the EMA decay, the learning-status cutoff (BOOSTMIS_TAU, _THRESHOLD, _CUTOFF), the labeller,
        the warm-up and the optimizer's weight decay; `queries`: K, `n_active`: N_A of the round."""
        super().__init__(segmenter, **kwargs)  # `segmenter` is the EMA copy
        s = settings if settings is not None else self.Settings()
        s.check()
        self.online = keras.Model.from_config(segmenter.get_config())  # the graph without its compile state
        self.online.set_weights(segmenter.get_weights())
        self.ema, self.queries = float(s.ema_decay), int(queries)
        self.use_ema_labels = s.boostmis_labeller == "ema"
        self.warmup, self.weight_decay = int(s.boostmis_warmup), float(OPTIMIZERS[s.boostmis_optimizer][2])
        self.n_active_labels = int(self.n_active if n_active is None else n_active)
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.status = LearningStatus(2, s.boostmis_tau, self.n_active_labels, self.queries,
                                     rule=s.boostmis_threshold, cutoff=s.boostmis_cutoff)

    @classmethod
    def config_kwargs(cls, cfg, total_steps: int) -> dict:
        return {"settings": cls.Settings.from_config(cfg), "queries": cfg.nb_next_sample, "seed": cfg.seed}

    @classmethod
    def optimizer_for(cls, cfg) -> keras.optimizers.Optimizer:
        """Adam at LEARNING_RATE, or with BOOSTMIS_OPTIMIZER = "sgd" the authors' SGD (0.03, momentum 0.9)."""
        name = cls.Settings.from_config(cfg).boostmis_optimizer
        return make_optimizer(name, cfg.learning_rate if name == "adam" else None)[0]

    @classmethod
    def fit_job(cls, job) -> dict:
        """Plain `fit` where the pool has no unlabelled image left, else `fit_on_pool` with N_A bound: the arrays do
        not say which round labelled what, so N_A is the expert images beyond NB_LABELED, at most one round's K."""
        cfg = job.cfg
        n_expert = int((~np.asarray(job.is_pseudo, bool)).sum())
        n_added = min(max(n_expert - cfg.nb_labeled, 0), cfg.nb_next_sample)
        unlabelled = job.unlabelled_stream(seed=job.seed + 1)
        if unlabelled is None:
            return fit_plain(job)
        return fit_on_pool(type(cls.__name__, (cls,), {"n_active": n_added}), job, unlabelled)

    def pseudo_labels(self, x_weak) -> tuple[tf.Tensor, tf.Tensor]:
        """Hard labels `[B,*spatial,1]` and their keep mask from the labeller's weak view; updates the status."""
        labeller = self.segmenter if self.use_ema_labels else self.online
        p = tf.stop_gradient(labeller(x_weak, training=False)["main"])
        conf = tf.maximum(p, 1.0 - p)
        cls = tf.cast(p > 0.5, tf.int32)
        return tf.cast(cls, tf.float32), confident(conf, cls, self.status.thresholds(conf, cls))

    def train_step(self, data):
        (x_clean, y_clean), x_unlabelled = data  # the pool trainers' order: (labelled batch, unlabelled batch)
        target, keep = self.pseudo_labels(x_unlabelled)
        keep = keep * tf.cast(self.optimizer.iterations >= self.warmup, tf.float32)  # BOOSTMIS_WARMUP
        x_strong = strong_view(x_unlabelled, self.seed_generator)
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
        grads = l2_gradients(grads, theta, self.weight_decay)
        # read before this update: 0 first from scratch, EMA_DECAY throughout for a trained model
        decay = mean_teacher_decay(self.optimizer.iterations, self.ema, self.from_scratch)
        self.optimizer.apply_gradients(zip(grads, theta))
        ema_update(self.segmenter, self.online, decay)
        return self.track(total, clean_loss, out_clean, y_clean, keep)


def fit_on_pool(trainer_cls: type[BoostMISTrainer], job, unlabelled) -> dict[str, list[float]]:
    """Train `job.model` with `trainer_cls` on `(expert batch, unlabelled pool batch)` pairs: an epoch is the
    space's steps over the expert items (pseudo-labelled ones, if any, are left out: the pool holds them)."""
    cfg = job.cfg
    expert = np.flatnonzero(~np.asarray(job.is_pseudo, bool))
    x, y = (job.x, job.y) if len(expert) == len(job.y) else (job.x[expert], job.y[expert])
    steps = job.space.steps_per_epoch(len(expert))
    trainer = trainer_cls.for_run(job.model, cfg, steps * max(job.epochs, 1), from_scratch=job.from_scratch)
    trainer.compile(optimizer=trainer_cls.optimizer_for(cfg))
    labelled = job.space.train_stream(x, y, job.normalizer, job.seed, repeat=True,
                                      foreground_oversample=cfg.foreground_oversample)
    ds = tf.data.Dataset.zip((labelled, unlabelled)).prefetch(tf.data.AUTOTUNE)
    val_ds = job.space.eval_stream(job.val.images, job.val.masks, job.normalizer)
    return trainer.fit(ds, steps_per_epoch=steps, validation_data=val_ds, epochs=job.epochs, callbacks=job.callbacks,
                       verbose=job.verbose, shuffle=False, validation_freq=job.validation_freq).history
