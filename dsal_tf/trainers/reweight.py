"""Noisy-teacher gradient re-weighting: RGS, RGM, RGS&M and the +AL query (docs/methods.md#noisy-teacher-re-weighting).

Each step sees a machine-labelled ("noisy") batch of B images and an expert ("clean") batch.
Noisy sample i gets a weight `w_i` from two scores:

- trust `e_i = grad L_i . grad L_clean` (RGS). All B scores come from one forward-mode JVP along
  `grad L_clean` (about one extra forward pass), so no per-sample backward pass is needed. The
  JVP runs up to each head's logits z; the per-pixel path z -> L_i is closed by reverse mode
  (see `directional_derivatives`);
- informativeness `g_i = mean |dL_i / dW|` for the 1x1 (1x1x1) `main_logits` kernel W (RGM), in
  closed form: `dL_i/dW[c] = sum_pixels features[i, ..., c] * dL_i/dlogit[i, ...]`.

The update is Adam on `sum_i w_i L_i(noisy) + expert_weight * mean L(clean)`.
`L_i = sum_k ds_weight_k * loss(y_i, p_k,i)` over the heads `main, side_1, side_2`, where `loss` is
per-sample BCE + Dice whatever `LOSS` says (docs/methods.md#noisy-teacher-re-weighting); `REWEIGHT_LOSS` overrides it
("run" = `LOSS`). The `uniform` control inherits the same loss.

Layout: channels last, images `[N,*spatial,C]` (NHWC or NDHWC), masks `[N,*spatial,1]`, every score
and weight `[N]`; every sum over pixels runs over all spatial axes, so volumes work unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import keras
import tensorflow as tf

from ..errors import DsalError
from ..model import HEADS
from ..space import item_axes
from .base import (
    DS_WEIGHTS,
    LossFn,
    PairedTrainer,
    ReweightSettings,
    per_sample_loss,
    register_trainer,
    resolve_loss,
    reweight_loss_name,
)
from .base import tf_variables as _tf_variables

LAST_LAYER = "main_logits"


# ------------------------------------------------------------------ weights
def normalize_positive(e: tf.Tensor) -> tf.Tensor:
    """`max(e, 0) / sum max(e, 0)`; all zeros when no sample helps (sum 0), never NaN."""
    pos = tf.nn.relu(tf.convert_to_tensor(e))
    return tf.math.divide_no_nan(pos, tf.reduce_sum(pos))


def combine_weights(w_e: tf.Tensor | None, w_x: tf.Tensor | None, lam: float, query: bool) -> tf.Tensor:
    """`lam * w_e + (1 - lam) * w_x`; with `query` (+AL) weights below 1/B drop to 0, unrenormalised.

    A `None` score counts as zeros, so RGS need not compute `w_x` nor RGM `w_e`.
    """
    if w_e is None and w_x is None:
        raise ValueError("combine_weights needs w_e or w_x")
    ref = w_e if w_e is not None else w_x
    w = tf.zeros_like(ref)
    if w_e is not None and lam != 0.0:
        w += lam * w_e
    if w_x is not None and lam != 1.0:
        w += (1.0 - lam) * w_x
    if query:
        threshold = 1.0 / tf.cast(tf.shape(w)[0], w.dtype)
        w = tf.where(w < threshold, tf.zeros_like(w), w)
    return w


# ------------------------------------------------------------------ scores
def score_model(segmenter: keras.Model) -> keras.Model:
    """The segmenter plus `features` (entering `main_logits`) and each head's `<head>_logits`.

    Shares every weight with `segmenter`; one call gives what both scores need.
    """
    outputs = dict(segmenter.output)
    outputs["features"] = segmenter.get_layer(LAST_LAYER).input
    for head in HEADS:
        outputs[f"{head}_logits"] = segmenter.get_layer(f"{head}_logits").output
    return keras.Model(segmenter.input, outputs, name=f"{segmenter.name}_scores")


def directional_derivatives(
    logit_grads: Sequence[tf.Tensor], logit_tangents: Sequence[tf.Tensor]
) -> tf.Tensor:
    """`e_i = sum_heads sum_pixels dL_i/dz[i] * dz[i]/dtheta . v`, shape [N]: chain rule at the logits.

    Forward mode cannot cross the side heads' bilinear upsampling (TF has no JVP for
    ResizeBilinear and silently yields None), so the JVP stops at the logits z and the short,
    per-pixel path from z to L_i is taken in reverse mode.
    """
    e = 0.0
    for grad, tangent in zip(logit_grads, logit_tangents):
        e += tf.reduce_sum(tf.cast(grad, tf.float32) * tf.cast(tangent, tf.float32), axis=item_axes(grad))
    return e


def kernel_gradient_magnitude(features: tf.Tensor, logit_grads: tf.Tensor) -> tf.Tensor:
    """`g_i = mean_{c,o} |sum_pixels features[i,..,c] * logit_grads[i,..,o]|`, shape [N].

    This is `mean |dL_i/dW|` for a 1x1 conv kernel W `[1,1,C,O]` (1x1x1 in 3D) without any per-sample
    backward. Any rank: the pixels are flattened to one axis `[N,P,C]`, so a volume gives what the
    same voxels laid out as an image give.
    """
    features = tf.cast(tf.stop_gradient(features), tf.float32)
    logit_grads = tf.cast(logit_grads, tf.float32)
    n = tf.shape(features)[0]
    features = tf.reshape(features, [n, -1, tf.shape(features)[-1]])
    logit_grads = tf.reshape(logit_grads, [n, -1, tf.shape(logit_grads)[-1]])
    per_sample_kernel = tf.einsum("npc,npo->nco", features, logit_grads)
    return tf.reduce_mean(tf.abs(per_sample_kernel), axis=[1, 2])


def _clean_gradient(segmenter, x_clean, y_clean, loss_fn, ds_weights, training: bool, scale=None):
    """`(mean L_clean, outputs, grad_theta)`; `scale` is the optimizer's loss scaling."""
    variables = _tf_variables(segmenter.trainable_variables)
    with tf.GradientTape() as tape:
        outputs = segmenter(x_clean, training=training)
        loss = tf.reduce_mean(per_sample_loss(outputs, y_clean, loss_fn, ds_weights))
        scaled = scale(loss) if scale is not None else loss
    grads = tape.gradient(scaled, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return loss, outputs, grads


def _noisy_pass(scorer, variables, batch, loss_fn, ds_weights, direction, need_g: bool, training: bool):
    """One forward on the noisy `batch` (x, y): losses [B], trust e [B] (if `direction`), informativeness g [B].

    Called inside the caller's `GradientTape`, the losses stay differentiable for the update.
    """
    x, y = batch
    heads = [h for h, w in zip(HEADS, ds_weights) if w != 0]
    with contextlib.ExitStack() as stack:
        acc = None
        if direction is not None:
            acc = stack.enter_context(
                tf.autodiff.ForwardAccumulator(_tf_variables(variables), list(direction))
            )
        with tf.GradientTape() as tape:
            out = scorer(x, training=training)
            losses = per_sample_loss(out, y, loss_fn, ds_weights)
            total = tf.reduce_sum(losses)
    e = g = None
    if acc is not None or need_g:
        # Sample i's loss sees only sample i's logits, so one gradient of the sum holds every dL_i/dz.
        logits = [out[f"{h}_logits"] for h in heads]
        zero = tf.UnconnectedGradients.ZERO
        dz = tape.gradient(total, logits, unconnected_gradients=zero)
        if acc is not None:
            e = directional_derivatives(dz, [acc.jvp(z, unconnected_gradients=zero) for z in logits])
        if need_g:
            main = dz[heads.index("main")] if "main" in heads else tf.zeros_like(out["main_logits"])
            g = kernel_gradient_magnitude(out["features"], main)
    return losses, e, g


def trust_scores(
    segmenter: keras.Model,
    x_noisy,
    y_noisy,
    x_clean,
    y_clean,
    loss: str | LossFn = "bce_dice",
    ds_weights: Sequence[float] = DS_WEIGHTS,
    training: bool = False,
) -> tf.Tensor:
    """RGS trust `e_i = grad L_i . grad mean L_clean` for every noisy sample, shape [B]."""
    loss_fn = resolve_loss(loss)
    _, _, direction = _clean_gradient(segmenter, x_clean, y_clean, loss_fn, ds_weights, training)
    scorer = score_model(segmenter)
    _, e, _ = _noisy_pass(
        scorer,
        segmenter.trainable_variables,
        (x_noisy, y_noisy),
        loss_fn,
        ds_weights,
        direction,
        need_g=False,
        training=training,
    )
    return e


def informativeness_scores(
    segmenter: keras.Model,
    x,
    y,
    loss: str | LossFn = "bce_dice",
    ds_weights: Sequence[float] = DS_WEIGHTS,
    training: bool = False,
) -> tf.Tensor:
    """RGM informativeness `g_i = mean |dL_i/dW|` for the 1x1 `main_logits` kernel W, shape [B]."""
    scorer = score_model(segmenter)
    _, _, g = _noisy_pass(
        scorer,
        segmenter.trainable_variables,
        (x, y),
        resolve_loss(loss),
        ds_weights,
        None,
        need_g=True,
        training=training,
    )
    return g


# ------------------------------------------------------------------ trainer
class ReweightedTrainer(PairedTrainer):
    """Noisy sample i gets `w_i` from trust `e` and informativeness `g` (`lam` mixes them, `query` is +AL).

    The update is Adam on `sum_i w_i L_i(noisy) + expert_weight * mean_j L_j(clean)`, with `w`
    held constant (stop-gradient). `lam` = None takes the class default (`rgs` 1, `rgm` 0, `rgsm` 0.5).
    """

    Settings = ReweightSettings

    default_lam = 1.0

    def __init__(
        self,
        segmenter: keras.Model,
        loss: str | LossFn = "bce_dice",
        ds_weights: Sequence[float] = DS_WEIGHTS,
        lam: float | None = None,
        query: bool = False,
        expert_weight: float = 1.0,
        **kwargs,
    ) -> None:
        super().__init__(segmenter, loss=loss, ds_weights=ds_weights, expert_weight=expert_weight, **kwargs)
        lam = self.default_lam if lam is None or lam == -1.0 else float(lam)
        if not 0.0 <= lam <= 1.0:
            raise DsalError(f"rgs_lambda={lam} is out of range: use a value in [0, 1] (1 RGS, 0 RGM)")
        self.scorer = score_model(segmenter)
        self.lam = lam
        self.query = bool(query)

    @classmethod
    def config_kwargs(cls, cfg, total_steps: int) -> dict:
        s = cls.Settings.from_config(cfg)
        return {"lam": s.rgs_lambda, "query": s.rgs_query}

    @classmethod
    def loss_for(cls, cfg) -> str:
        return reweight_loss_name(cfg)

    def needs_trust(self) -> bool:
        return self.lam > 0.0

    def needs_informativeness(self) -> bool:
        return self.lam < 1.0

    def sample_weights(self, e: tf.Tensor | None, g: tf.Tensor | None, losses: tf.Tensor) -> tf.Tensor:
        """The step's weights [B] from trust e and informativeness g (either may be None)."""
        w_e = normalize_positive(e) if e is not None else None
        w_x = normalize_positive(g) if g is not None else None
        return combine_weights(w_e, w_x, self.lam, self.query)

    def train_step(self, data):
        (x_noisy, y_noisy), (x_clean, y_clean) = data
        variables = self.segmenter.trainable_variables
        scale = self.optimizer.scale_loss
        clean_loss, clean_out, clean_grads = _clean_gradient(
            self.segmenter, x_clean, y_clean, self.loss_fn, self.ds_weights, True, scale
        )
        # Loss scaling multiplies every e_i alike, so the normalised weights do not see it.
        direction = clean_grads if self.needs_trust() else None
        with tf.GradientTape() as tape:
            noisy, e, g = _noisy_pass(
                self.scorer,
                variables,
                (x_noisy, y_noisy),
                self.loss_fn,
                self.ds_weights,
                direction,
                self.needs_informativeness(),
                True,
            )
            w = tf.stop_gradient(self.sample_weights(e, g, noisy))
            noisy_objective = tf.reduce_sum(w * noisy)
            scaled = scale(noisy_objective)
        grads = tape.gradient(
            scaled, _tf_variables(variables), unconnected_gradients=tf.UnconnectedGradients.ZERO
        )
        if self.expert_weight != 0.0:
            grads = [gn + self.expert_weight * gc for gn, gc in zip(grads, clean_grads)]
        self.optimizer.apply_gradients(zip(grads, variables))
        return self.track(noisy_objective + self.expert_weight * clean_loss, clean_loss, clean_out, y_clean, w)


@register_trainer("rgs")
class RGS(ReweightedTrainer):
    """Trust only: `w = max(e, 0) / sum max(e, 0)`."""

    default_lam = 1.0


@register_trainer("rgm")
class RGM(ReweightedTrainer):
    """Informativeness only: `w = g / sum g`."""

    default_lam = 0.0


@register_trainer("rgsm")
class RGSM(ReweightedTrainer):
    """`w = 0.5 w^e + 0.5 w^x`."""

    default_lam = 0.5
