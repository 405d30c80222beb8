"""The bi-level (learning-to-weight) step shared by MW-Net and MCPM (docs/methods.md#mw-net).

A meta net V_phi maps the noisy batch's losses (held constant: V reads them as data) to weights
w. One step:

1. virtual SGD step `theta_hat = theta - alpha * grad_theta O(theta, w_phi)`, with the graph kept
   (nested `GradientTape`), where O is the trainer's weighted noisy objective;
2. clean meta loss `M(theta_hat) = mean_j L_j(clean)` on the clean batch;
3. Adam step on phi with `dM/dphi`;
4. the real step on theta with the gradient of
   `O(theta, stop_gradient(w_phi')) + expert_weight * mean_j L_j(clean)`, the weights recomputed
   by the updated meta net.

The real step (`META_STEP`) is the MW-Net authors' by default: SGD with momentum 0.9 and an L2
penalty of 5e-4 added to the gradient (PyTorch's `weight_decay`), at `META_STEP_LR`; or Adam at
`LEARNING_RATE` ("adam", the former behaviour). `alpha` is the real step's current learning rate,
as in the authors' code (its virtual step is plain SGD at the main optimizer's rate): with SGD
both steps then move theta by the same rule, up to the momentum.
theta does not change between steps 1 and 4, so the real step reuses step 1's forward passes
(same dropout masks): a persistent tape gives `grad_theta O` through `output_gradients`, so
no second forward pass over the noisy or clean batch is needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import tensorflow as tf

from ..errors import DsalError
from ..model import HEADS
from ..settings import positive, suggest
from .base import PairedSettings, PairedTrainer, tf_variables

META_STEPS = ("sgd", "adam")
META_STEP_LR = 0.1  # the authors'; at 1e-3 SGD barely trains our U-Net (bench/results/meta_step_rate.md)
SGD_MOMENTUM = 0.9  # MW-Net's code: SGD(lr, momentum=0.9, weight_decay=5e-4) on the classifier
SGD_WEIGHT_DECAY = 5e-4


class MetaTrainer(PairedTrainer):
    """Subclasses give `build_meta_net`, `meta_input(outputs, y)` and `objective(outputs, y, w)`."""

    @dataclass(frozen=True)
    class Settings(PairedSettings):
        meta_lr: float = 1e-3  # Adam on the meta net (weight decay 1e-4)
        meta_step: str = "sgd"  # real step on the segmenter: "sgd" (the authors': momentum 0.9, L2 5e-4) or "adam"
        meta_step_lr: float = META_STEP_LR  # SGD real step and virtual step rate (adam: LEARNING_RATE)

        def check(self):
            super().check()
            positive("meta_lr", self.meta_lr)
            if self.meta_step not in META_STEPS:
                raise DsalError(f"META_STEP = {self.meta_step!r} is not one of {list(META_STEPS)}"
                                + suggest(self.meta_step, META_STEPS))
            positive("meta_step_lr", self.meta_step_lr)

    def __init__(self, segmenter: keras.Model, virtual_lr: float | None = None, meta_lr: float = 1e-3,
                 meta_weight_decay: float = 1e-4, weight_decay: float = 0.0, **kwargs) -> None:
        """`virtual_lr`: alpha; None = the real step's current learning rate. `weight_decay`: an L2
        term `weight_decay * theta` added to the real step's gradient (the SGD real step's 5e-4)."""
        super().__init__(segmenter, **kwargs)
        self.virtual_lr = None if virtual_lr is None else float(virtual_lr)
        self.weight_decay = float(weight_decay)
        self.meta_net = self.build_meta_net()
        self.meta_optimizer = keras.optimizers.Adam(meta_lr, weight_decay=meta_weight_decay)
        self.meta_optimizer.build(self.meta_net.trainable_variables)

    @classmethod
    def config_kwargs(cls, cfg, total_steps: int) -> dict:
        s = cls.Settings.from_config(cfg)
        return {"meta_lr": s.meta_lr, "weight_decay": SGD_WEIGHT_DECAY if s.meta_step == "sgd" else 0.0}

    @classmethod
    def optimizer_for(cls, cfg) -> keras.optimizers.Optimizer:
        """`META_STEP`: SGD with momentum at `META_STEP_LR` (the L2 term is the trainer's), or Adam at
        `LEARNING_RATE`."""
        s = cls.Settings.from_config(cfg)
        if s.meta_step == "adam":
            return super().optimizer_for(cfg)
        if cfg.lr_schedule == "cosine" or cfg.lr_warmup_epochs:
            raise DsalError(f"TRAINER = {cls.name!r} with META_STEP = \"sgd\" trains at META_STEP_LR = "
                            f"{s.meta_step_lr:g}, but LR_SCHEDULE = \"cosine\" and LR_WARMUP_EPOCHS set rates from "
                            "LEARNING_RATE: turn them off, or set META_STEP = \"adam\"")
        return keras.optimizers.SGD(s.meta_step_lr, momentum=SGD_MOMENTUM)

    @property
    def alpha(self):
        """The virtual step's rate: `virtual_lr`, or the real step's learning rate now (schedules included)."""
        return self.virtual_lr if self.virtual_lr is not None else tf.cast(self.optimizer.learning_rate, tf.float32)

    # ---- what a subclass defines
    def build_meta_net(self) -> keras.Model:
        raise NotImplementedError

    def meta_input(self, outputs: dict, y) -> tf.Tensor:
        """The losses the meta net reads (per sample [B] or per pixel `[B,*spatial,1]`)."""
        raise NotImplementedError

    def objective(self, outputs: dict, y, w: tf.Tensor) -> tf.Tensor:
        """The weighted noisy objective O (a scalar) given weights `w`."""
        raise NotImplementedError

    # ---- the shared step
    def meta_weights(self, outputs: dict, y) -> tf.Tensor:
        return self.meta_net(tf.stop_gradient(self.meta_input(outputs, y)))

    def meta_gradient(self, x_noisy, y_noisy, x_clean, y_clean, training: bool = True):
        """Steps 1-2: `(M(theta_hat), dM/dphi, tape, noisy outputs, clean outputs, clean loss at theta)`.

        The returned persistent tape holds the forward passes at theta for the real step.
        """
        theta = self.segmenter.trainable_variables
        with tf.GradientTape() as outer:
            with tf.GradientTape(persistent=True) as inner:
                out_noisy = self.segmenter(x_noisy, training=training)
                out_clean = self.segmenter(x_clean, training=training)
                clean_loss = tf.reduce_mean(self.losses_of(out_clean, y_clean))
                virtual = self.objective(out_noisy, y_noisy, self.meta_weights(out_noisy, y_noisy))
            grads = inner.gradient(virtual, tf_variables(theta),
                                   unconnected_gradients=tf.UnconnectedGradients.ZERO)
            alpha = self.alpha
            theta_hat = [t - alpha * g for t, g in zip(tf_variables(theta), grads)]
            non_trainable = tf_variables(self.segmenter.non_trainable_variables)
            out_hat, _ = self.segmenter.stateless_call(theta_hat, non_trainable, x_clean, training=training)
            meta_loss = tf.reduce_mean(self.losses_of(out_hat, y_clean))
        meta_grads = outer.gradient(meta_loss, self.meta_net.trainable_variables,
                                    unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return meta_loss, meta_grads, inner, out_noisy, out_clean, clean_loss

    def train_step(self, data):
        (x_noisy, y_noisy), (x_clean, y_clean) = data
        _, meta_grads, tape, out_noisy, out_clean, clean_loss = self.meta_gradient(
            x_noisy, y_noisy, x_clean, y_clean)
        self.meta_optimizer.apply_gradients(zip(meta_grads, self.meta_net.trainable_variables))

        w = tf.stop_gradient(self.meta_weights(out_noisy, y_noisy))  # step 4: the updated meta net
        heads = [out_noisy[h] for h in HEADS]
        with tf.GradientTape() as head_tape:  # dO/dp per head: cheap, elementwise
            head_tape.watch(heads)
            noisy_objective = self.objective(dict(zip(HEADS, heads)), y_noisy, w)
        d_heads = head_tape.gradient(noisy_objective, heads, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        scale = self.optimizer.scale_loss(tf.constant(1.0))
        theta = self.segmenter.trainable_variables
        grads = tape.gradient(
            heads + [clean_loss],
            tf_variables(theta),
            output_gradients=[d * scale for d in d_heads] + [self.expert_weight * scale],
            unconnected_gradients=tf.UnconnectedGradients.ZERO,
        )
        del tape
        if self.weight_decay:  # L2 on the real step only, as the authors' optimizer adds it
            grads = [g + self.weight_decay * scale * t for g, t in zip(grads, tf_variables(theta))]
        self.optimizer.apply_gradients(zip(grads, theta))
        return self.track(noisy_objective + self.expert_weight * clean_loss, clean_loss, out_clean, y_clean, w)
