"""The bi-level (learning-to-weight) step shared by MW-Net and MCPM (docs/methods.md#mw-net).

A meta net V_phi maps the noisy batch's losses (held constant: V reads them as data) to weights
w. One step:

1. virtual SGD step `theta_hat = theta - alpha * grad_theta O(theta, w_phi)`, with the graph kept
   (nested `GradientTape`), where O is the trainer's weighted noisy objective;
2. clean meta loss `M(theta_hat) = mean_j L_j(clean)` on the clean batch;
3. Adam step on phi with `dM/dphi`;
4. the real step: Adam on theta with
   `O(theta, stop_gradient(w_phi')) + expert_weight * mean_j L_j(clean)`, the weights recomputed
   by the updated meta net.

`alpha` is the segmenter's learning rate (MW-Net's virtual step uses the main net's rate).
theta does not change between steps 1 and 4, so the real step reuses step 1's forward passes
(same dropout masks): a persistent tape gives `grad_theta O` through `output_gradients`, so
no second forward pass over the noisy or clean batch is needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import tensorflow as tf

from ..model import HEADS
from ..settings import positive
from .base import PairedSettings, PairedTrainer, tf_variables


class MetaTrainer(PairedTrainer):
    """Subclasses give `build_meta_net`, `meta_input(outputs, y)` and `objective(outputs, y, w)`."""

    @dataclass(frozen=True)
    class Settings(PairedSettings):
        meta_lr: float = 1e-3  # Adam on the meta net (weight decay 1e-4)

        def check(self):
            super().check()
            positive("meta_lr", self.meta_lr)

    def __init__(self, segmenter: keras.Model, virtual_lr: float = 1e-3, meta_lr: float = 1e-3,
                 meta_weight_decay: float = 1e-4, **kwargs) -> None:
        super().__init__(segmenter, **kwargs)
        self.virtual_lr = float(virtual_lr)
        self.meta_net = self.build_meta_net()
        self.meta_optimizer = keras.optimizers.Adam(meta_lr, weight_decay=meta_weight_decay)
        self.meta_optimizer.build(self.meta_net.trainable_variables)

    @classmethod
    def config_kwargs(cls, cfg, total_steps: int) -> dict:
        return {"virtual_lr": cfg.learning_rate, "meta_lr": cls.Settings.from_config(cfg).meta_lr}

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
            theta_hat = [t - self.virtual_lr * g for t, g in zip(tf_variables(theta), grads)]
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
        self.optimizer.apply_gradients(zip(grads, theta))
        return self.track(noisy_objective + self.expert_weight * clean_loss, clean_loss, out_clean, y_clean, w)
