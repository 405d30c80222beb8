"""PNT, INT and PINT: pixel- and image-level noise tolerance with an EMA teacher (docs/methods.md#pint).

Teacher: starts from the student's weights; after student step t (t = 0 first) it becomes
`theta_t = d_t theta_t + (1 - d_t) theta_s`, with d_t = gamma (EMA_DECAY, 0.99) when the student
continues a trained model, and Mean Teacher's warm-up `d_t = min(1 - 1/(t+1), gamma)` when it starts
from scratch (a young teacher then follows the student instead of its random start).
Each gated step the teacher makes T passes over the noisy batch, each with Gaussian input noise
(sigma 0.1 in normalised units, T = 8), all in one batched call: `p_bar = mean_t p_t` (the main
head) and the pixel uncertainty `u = H(p_bar)` (binary entropy, nats, at most ln 2).

Masks (1 = the given label supervises):
- pixel mask `a_v = 1[u_v < tau]`, tau constant (PINT_TAU, default 0.5 ln 2). Not UA-MT's ramp:
  here the mask picks the pixels that keep their noisy label, so a rising tau would hand every
  pixel back to the noisy labels late in training;
- image mask `a_i = 1[U_i < median_batch U]`, `U_i = mean_v u_v` (the more certain half of the
  batch counts as clean; a batch of one image has no clean image);
- the label mask m of each mode: PNT `m = a_v`; INT `m = a_i` (every pixel of the image); PINT
  `m = max(a_v, a_i)` (clean-judged images keep every pixel, including uncertain boundary pixels).

Noisy objective, the paper's per-pixel rule `L_v = m_v CE(y_v, p_v) + (1 - m_v) (p_v - p_bar_v)^2`
averaged over the image's pixels and summed over the heads with the deep-supervision weights:
`L_i = sum_k ds_k mean_v [m_v CE(y_v, p_k,v) + (1 - m_v) (p_k,v - p_bar_v)^2]` (`pint_loss`). Both
terms are per pixel over the same pixels whatever `LOSS` says: a soft-Dice label term next to a
pixel-mean squared error is tens of times larger, and the gate then mostly masks the labels.
`LOSS` is the expert (clean) term's loss, as in every paired trainer.

Supervised warm-up, only from scratch: the first `warmup_steps` steps (PINT_WARMUP of the run's
steps, default 20%) set m = 1 everywhere, i.e. the cross-entropy on the given labels, with no
teacher pass (a random teacher has u ~ ln 2 everywhere and would discard every label); the EMA
still runs. A student that continues a trained model (a later round, `FitJob.from_scratch` False)
gates from its first step.
The update is Adam on `(1/B) sum_i L_i + expert_weight * mean_j L_j(clean)`. Trackers:
`mean_weight` and `kept_fraction` are the share of supervised noisy pixels.

Layout: channels last, `[B,*spatial,C]`; pixel maps `[B,*spatial,1]`, image values [B]. Rank-generic:
on volumes a "pixel" is a voxel and an image a patch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import keras
import tensorflow as tf

from ..settings import in_range, positive
from ..space import item_axes
from ..strategies.entropy import binary_entropy  # float32 in, as `teacher_view` gives it
from .base import (
    PairedSettings,
    PairedTrainer,
    ema_update,
    head_sum,
    main_mask,
    mean_teacher_decay,
    pixel_bce,
    register_trainer,
    tf_variables,
)

LN2 = math.log(2.0)
TAU = 0.5 * LN2


def pint_loss(y, p, p_bar, m) -> tf.Tensor:
    """`mean_v [m_v CE(y_v, p_v) + (1 - m_v) (p_v - p_bar_v)^2]` per sample [N]: cross-entropy to the
    label where m = 1, squared error to the teacher where m = 0, both averaged over all the image's
    pixels. `y`, `p`, `p_bar`, `m`: `[N,*spatial,1]`."""
    p = tf.cast(p, tf.float32)
    m = tf.cast(m, tf.float32)
    per_pixel = m * pixel_bce(y, p) + (1.0 - m) * tf.square(p - tf.cast(p_bar, tf.float32))
    return tf.reduce_mean(per_pixel, axis=item_axes(p))


def below_median(values: tf.Tensor) -> tf.Tensor:
    """`1[v_i < median(v)]` as float [B]; the median of an even count is the mean of the middle two."""
    s = tf.sort(values)
    n = tf.shape(values)[0]
    median = 0.5 * (s[(n - 1) // 2] + s[n // 2])
    return tf.cast(values < median, tf.float32)


class TeacherTrainer(PairedTrainer):
    """EMA teacher + uncertainty-gated mixing; `mode` is "pixel" (PNT), "image" (INT) or "both" (PINT)."""

    mode = "both"

    @dataclass(frozen=True)
    class Settings(PairedSettings):
        ema_decay: float = 0.99  # EMA teacher
        teacher_passes: int = 8  # perturbed teacher passes T
        teacher_noise: float = 0.1  # Gaussian input noise sigma (normalised units)
        pint_tau: float = TAU  # pixel-uncertainty threshold, constant (0.5 ln 2)
        pint_warmup: float = 0.2  # share of the steps trained on the labels alone before any gating (from scratch only)

        def check(self):
            super().check()
            in_range("ema_decay", self.ema_decay, 0.0, 1.0)
            positive("teacher_passes", self.teacher_passes)
            positive("teacher_noise", self.teacher_noise, strict=False)
            positive("pint_tau", self.pint_tau, strict=False)
            in_range("pint_warmup", self.pint_warmup, 0.0, 1.0)

    def __init__(self, segmenter: keras.Model, ema: float = 0.99, passes: int = 8, noise: float = 0.1,
                 tau: float = TAU, warmup_steps: int = 0, seed: int = 0, **kwargs) -> None:
        super().__init__(segmenter, **kwargs)
        # from the config, not clone_model: a compiled segmenter would be recompiled from its loss names
        self.teacher = keras.Model.from_config(segmenter.get_config())
        self.teacher.set_weights(segmenter.get_weights())
        self.teacher.trainable = False
        self.ema, self.passes, self.noise = float(ema), int(passes), float(noise)
        # the warm-ups are for a fresh network, whose teacher is useless; a trained one gates from step 0
        self.tau, self.warmup_steps = float(tau), int(warmup_steps) if self.from_scratch else 0
        self.seed_generator = keras.random.SeedGenerator(seed)

    @classmethod
    def config_kwargs(cls, cfg, total_steps: int) -> dict:
        s = cls.Settings.from_config(cfg)
        return {"ema": s.ema_decay, "passes": s.teacher_passes, "noise": s.teacher_noise,
                "tau": s.pint_tau, "warmup_steps": int(s.pint_warmup * total_steps), "seed": cfg.seed}

    def teacher_view(self, x) -> tuple[tf.Tensor, tf.Tensor]:
        """`(p_bar, u)`, each `[B,*spatial,1]`, from T noisy teacher passes in one batched call."""
        b = tf.shape(x)[0]
        tiled = tf.tile(x, [self.passes] + [1] * (len(x.shape) - 1))  # the batch T times, pass-major
        tiled += self.noise * keras.random.normal(tf.shape(tiled), seed=self.seed_generator)
        p = tf.cast(self.teacher(tiled, training=False)["main"], tf.float32)
        p_bar = tf.reduce_mean(tf.reshape(p, tf.concat([[self.passes, b], tf.shape(p)[1:]], 0)), axis=0)
        return p_bar, binary_entropy(p_bar)

    def masks(self, u: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """Pixel mask `[B,*spatial,1]` and image mask [B] (1 = supervised by the given label)."""
        pixel = tf.cast(u < self.tau, tf.float32)
        image = below_median(tf.reduce_mean(u, axis=item_axes(u)))
        return pixel, image

    def gates(self, x) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """`(p_bar, pixel, image)` for this step; in the supervised warm-up every mask is 1 (the
        cross-entropy on the given labels) and the teacher is not consulted."""

        def gated():
            p_bar, u = self.teacher_view(x)
            return (p_bar, *self.masks(u))

        if self.warmup_steps <= 0:
            return gated()

        def warm_up():
            ones = tf.ones_like(tf.cast(x[..., :1], tf.float32))
            return tf.zeros_like(ones), ones, tf.ones(tf.shape(x)[:1], tf.float32)

        return tf.cond(self.optimizer.iterations < self.warmup_steps, warm_up, gated)

    def sample_losses(self, outputs: dict, y, p_bar, pixel, image) -> tf.Tensor:
        """`L_i` [B] for this trainer's mode: `pint_loss` under its label mask, summed over the heads."""
        y, m = main_mask(y), self.label_mask(pixel, image)
        return head_sum(lambda h: pint_loss(y, outputs[h], p_bar, m), self.ds_weights)

    def label_mask(self, pixel, image) -> tf.Tensor:
        """Per-pixel 1 where the given label supervises the pixel `[B,*spatial,1]`, this trainer's mode."""
        img = tf.reshape(image, [-1] + [1] * (len(pixel.shape) - 1))
        if self.mode == "pixel":
            return pixel
        if self.mode == "image":
            return tf.ones_like(pixel) * img
        return tf.maximum(pixel, img)

    def train_step(self, data):
        (x_noisy, y_noisy), (x_clean, y_clean) = data
        p_bar, pixel, image = self.gates(x_noisy)
        theta = self.segmenter.trainable_variables
        with tf.GradientTape() as tape:
            out_noisy = self.segmenter(x_noisy, training=True)
            out_clean = self.segmenter(x_clean, training=True)
            clean_loss = tf.reduce_mean(self.losses_of(out_clean, y_clean))
            noisy_objective = tf.reduce_mean(self.sample_losses(out_noisy, y_noisy, p_bar, pixel, image))
            total = noisy_objective + self.expert_weight * clean_loss
            scaled = self.optimizer.scale_loss(total)
        grads = tape.gradient(scaled, tf_variables(theta), unconnected_gradients=tf.UnconnectedGradients.ZERO)
        self.optimizer.apply_gradients(zip(grads, theta))
        self.update_teacher()
        return self.track(total, clean_loss, out_clean, y_clean, self.label_mask(pixel, image))

    def update_teacher(self) -> None:
        """The EMA after the step just applied (`iterations` already counts it, so t = iterations - 1);
        Mean Teacher's decay warm-up only from scratch."""
        decay = mean_teacher_decay(self.optimizer.iterations - 1, self.ema) if self.from_scratch else self.ema
        ema_update(self.teacher, self.segmenter, decay)


@register_trainer("pnt")
class PNT(TeacherTrainer):
    mode = "pixel"


@register_trainer("int")
class INT(TeacherTrainer):
    mode = "image"


@register_trainer("pint")
class PINT(TeacherTrainer):
    mode = "both"
