"""Noisy-teacher gradient re-weighting: RGS, RGM, RGS&M and the +AL query (METHODS.md section 3).

Each step sees a machine-labelled ("noisy") batch of B images and an expert ("clean") batch.
Noisy sample i gets a weight `w_i` from two scores:

- trust `e_i = grad L_i . grad L_clean` (RGS). All B scores come from one forward-mode JVP along
  `grad L_clean` (about one extra forward pass), so no per-sample backward pass is needed. The
  JVP runs up to each head's logits z; the per-pixel path z -> L_i is closed by reverse mode
  (see `directional_derivatives`);
- informativeness `g_i = mean |dL_i / dW|` for the 1x1 `main_logits` kernel W (RGM), in closed
  form: `dL_i/dW[c] = sum_pixels features[i, ..., c] * dL_i/dlogit[i, ...]`.

The update is Adam on `sum_i w_i L_i(noisy) + expert_weight * mean L(clean)`.
`L_i = sum_k ds_weight_k * loss(y_i, p_k,i)` over the heads `main, side_1, side_2`.

Layout: NHWC images `[N,H,W,C]`, masks `[N,H,W,1]`, every score and weight `[N]`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import keras
import numpy as np
import tensorflow as tf

from . import losses as losses_lib
from .errors import DsalError
from .model import HEADS

LossFn = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]
DS_WEIGHTS = (0.6, 0.3, 0.1)
LAST_LAYER = "main_logits"

# trainer name -> constructor defaults; `lam` mixes trust (1.0) and informativeness (0.0).
TRAINERS: dict[str, dict] = {
    "rgs": {"lam": 1.0},
    "rgm": {"lam": 0.0},
    "rgsm": {"lam": 0.5},
}


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


# ------------------------------------------------------------------ per-sample losses
def resolve_loss(loss: str | LossFn) -> LossFn:
    """A loss name from `losses.LOSSES` or a per-sample callable `(y, p) -> [N]`."""
    if callable(loss):
        return loss
    if loss not in losses_lib.LOSSES:
        raise DsalError(f"unknown loss {loss!r}: use one of {sorted(losses_lib.LOSSES)}")
    return losses_lib.get_loss(loss)


def per_sample_loss(outputs: dict, y, loss_fn: LossFn, ds_weights: Sequence[float] = DS_WEIGHTS) -> tf.Tensor:
    """`L_i = sum_k ds_weights[k] * loss(y_i, outputs[head_k]_i)`, shape [N], in float32.

    `y` is one mask `[N,H,W,1]` shared by all heads, or a `{head: mask}` dict.
    """
    total = 0.0
    for head, weight in zip(HEADS, ds_weights):
        if weight == 0:
            continue
        target = y[head] if isinstance(y, dict) else y
        total += float(weight) * tf.cast(loss_fn(target, outputs[head]), tf.float32)
    return total


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
        e += tf.reduce_sum(tf.cast(grad, tf.float32) * tf.cast(tangent, tf.float32), axis=[1, 2, 3])
    return e


def kernel_gradient_magnitude(features: tf.Tensor, logit_grads: tf.Tensor) -> tf.Tensor:
    """`g_i = mean_{c,o} |sum_pixels features[i,..,c] * logit_grads[i,..,o]|`, shape [N].

    This is `mean |dL_i/dW|` for a 1x1 conv kernel W `[1,1,C,O]` without any per-sample backward.
    """
    features = tf.cast(tf.stop_gradient(features), tf.float32)
    logit_grads = tf.cast(logit_grads, tf.float32)
    per_sample_kernel = tf.einsum("nhwc,nhwo->nco", features, logit_grads)
    return tf.reduce_mean(tf.abs(per_sample_kernel), axis=[1, 2])


def _tf_variables(variables: Sequence) -> list:
    """The `tf.Variable` behind each Keras Variable: what forward mode watches, and a dtype that
    `UnconnectedGradients.ZERO` understands (a Keras Variable reports its dtype as a string)."""
    return [getattr(v, "value", v) for v in variables]


def _clean_gradient(segmenter, x_clean, y_clean, loss_fn, ds_weights, training: bool, scale=None):
    """`(mean L_clean, outputs, grad_theta)`; `scale` is the optimizer's loss scaling."""
    variables = _tf_variables(segmenter.trainable_variables)
    with tf.GradientTape() as tape:
        outputs = segmenter(x_clean, training=training)
        loss = tf.reduce_mean(per_sample_loss(outputs, y_clean, loss_fn, ds_weights))
        scaled = scale(loss) if scale is not None else loss
    grads = tape.gradient(scaled, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return loss, outputs, grads


def _noisy_pass(scorer, variables, x, y, loss_fn, ds_weights, direction, need_g: bool, training: bool):
    """One forward on the noisy batch: losses [B], trust e [B] (if `direction`), informativeness g [B].

    Called inside the caller's `GradientTape`, the losses stay differentiable for the update.
    """
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
        x_noisy,
        y_noisy,
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
        x,
        y,
        resolve_loss(loss),
        ds_weights,
        None,
        need_g=True,
        training=training,
    )
    return g


# ------------------------------------------------------------------ trainer
class ReweightedTrainer(keras.Model):
    """Wraps a segmenter; `fit` on `((x_noisy, y_noisy), (x_clean, y_clean))` batches.

    Only `train_step` changes (the update itself is re-weighted); `evaluate` takes plain `(x, y)`
    and reports `loss` and `main_dice`, so `val_main_dice` drives checkpoints. Save
    `trainer.segmenter`, a plain U-Net, never the trainer.
    """

    def __init__(
        self,
        segmenter: keras.Model,
        loss: str | LossFn = "bce_dice",
        ds_weights: Sequence[float] = DS_WEIGHTS,
        lam: float = 1.0,
        query: bool = False,
        expert_weight: float = 1.0,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if not 0.0 <= lam <= 1.0:
            raise DsalError(f"rgs_lambda={lam} is out of range: use a value in [0, 1] (1 RGS, 0 RGM)")
        if len(ds_weights) != len(HEADS):
            raise DsalError(f"ds_weights={tuple(ds_weights)} needs {len(HEADS)} values, one per head {HEADS}")
        self.segmenter = segmenter
        self.scorer = score_model(segmenter)
        self.loss_fn = resolve_loss(loss)
        self.ds_weights = tuple(float(w) for w in ds_weights)
        self.lam = float(lam)
        self.query = bool(query)
        self.expert_weight = float(expert_weight)
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.clean_loss_tracker = keras.metrics.Mean(name="clean_loss")
        self.dice_tracker = keras.metrics.Mean(name="main_dice")
        self.weight_tracker = keras.metrics.Mean(name="mean_weight")
        self.kept_tracker = keras.metrics.Mean(name="kept_fraction")
        self.built = True  # the segmenter is built; stops fit from calling us on a zipped batch

    @property
    def metrics(self) -> list:
        return [
            self.loss_tracker,
            self.clean_loss_tracker,
            self.dice_tracker,
            self.weight_tracker,
            self.kept_tracker,
        ]

    def compile(self, optimizer="adam", jit_compile: bool | str = False, **kwargs) -> None:
        """Adam by default; XLA off by default (forward-mode autodiff inside XLA is untested)."""
        super().compile(optimizer=optimizer, jit_compile=jit_compile, **kwargs)

    def call(self, x, training: bool = False):
        return self.segmenter(x, training=training)

    def sample_weights(self, e: tf.Tensor | None, g: tf.Tensor | None) -> tf.Tensor:
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
        direction = clean_grads if self.lam > 0.0 else None
        with tf.GradientTape() as tape:
            noisy, e, g = _noisy_pass(
                self.scorer,
                variables,
                x_noisy,
                y_noisy,
                self.loss_fn,
                self.ds_weights,
                direction,
                self.lam < 1.0,
                True,
            )
            w = tf.stop_gradient(self.sample_weights(e, g))
            noisy_objective = tf.reduce_sum(w * noisy)
            scaled = scale(noisy_objective)
        grads = tape.gradient(
            scaled, _tf_variables(variables), unconnected_gradients=tf.UnconnectedGradients.ZERO
        )
        if self.expert_weight != 0.0:
            grads = [gn + self.expert_weight * gc for gn, gc in zip(grads, clean_grads)]
        self.optimizer.apply_gradients(zip(grads, variables))

        self.loss_tracker.update_state(noisy_objective + self.expert_weight * clean_loss)
        self.clean_loss_tracker.update_state(clean_loss)
        # Dice against the expert masks: the only labels this step can trust.
        self.dice_tracker.update_state(losses_lib.dice(_main(y_clean), clean_out["main"]))
        self.weight_tracker.update_state(tf.reduce_mean(w))
        self.kept_tracker.update_state(tf.reduce_mean(tf.cast(w > 0, tf.float32)))
        return {m.name: m.result() for m in self.metrics}

    def test_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        outputs = self.segmenter(x, training=False)
        per_sample = per_sample_loss(outputs, y, self.loss_fn, self.ds_weights)
        self.loss_tracker.update_state(per_sample, sample_weight=sample_weight)
        self.dice_tracker.update_state(
            losses_lib.dice(_main(y), outputs["main"]), sample_weight=sample_weight
        )
        return {m.name: m.result() for m in (self.loss_tracker, self.dice_tracker)}


def _main(y):
    return y["main"] if isinstance(y, dict) else y


def make_trainer(
    name: str,
    segmenter: keras.Model,
    loss: str | LossFn = "bce_dice",
    ds_weights: Sequence[float] = DS_WEIGHTS,
    query: bool = False,
    lam: float | None = None,
    expert_weight: float = 1.0,
) -> ReweightedTrainer:
    """A `ReweightedTrainer` by registry name; `lam=None` (or < 0, the config's -1) takes its default."""
    if name not in TRAINERS:
        raise DsalError(f"trainer={name!r} is not a re-weighting trainer: use one of {sorted(TRAINERS)}")
    settings = dict(TRAINERS[name])
    if lam is not None and lam >= 0:
        settings["lam"] = lam
    return ReweightedTrainer(
        segmenter, loss=loss, ds_weights=ds_weights, query=query, expert_weight=expert_weight, **settings
    )


# ------------------------------------------------------------------ data
def make_reweighted_dataset(
    x_noisy: np.ndarray,
    y_noisy: np.ndarray,
    x_clean: np.ndarray,
    y_clean: np.ndarray,
    batch_size: int,
    seed: int = 0,
    preprocess: Callable | None = None,
    augment: bool = False,
    repeat: bool = False,
) -> tf.data.Dataset:
    """`((x_noisy, y_noisy), (x_clean, y_clean))` batches; one epoch is one pass over the noisy set.

    The clean set is repeated and reshuffled, so a small expert set never ends an epoch; with
    `repeat` the noisy set repeats too (then bound the epoch with `.take(steps)`).
    `preprocess` maps an image batch to float32 (e.g. a `data.Normalizer`); default: a cast.
    """
    from .data import make_dataset

    if len(x_noisy) == 0 or len(x_clean) == 0:
        raise DsalError("make_reweighted_dataset needs at least one noisy and one clean image")
    prep = preprocess if preprocess is not None else (lambda x: tf.cast(x, tf.float32))
    noisy = make_dataset(x_noisy, y_noisy, prep, batch_size, shuffle=True, augment=augment, seed=seed,
                         repeat=repeat)
    clean = make_dataset(
        x_clean, y_clean, prep, batch_size, shuffle=True, augment=augment, seed=seed + 1, repeat=True
    )
    return tf.data.Dataset.zip((noisy, clean)).prefetch(tf.data.AUTOTUNE)


def fit_reweighted(
    segmenter: keras.Model,
    cfg,
    x_clean: np.ndarray,
    y_clean: np.ndarray,
    x_noisy: np.ndarray,
    y_noisy: np.ndarray,
    val_ds: tf.data.Dataset,
    normalizer: Callable,
    callbacks: list,
    epochs: int,
    seed: int,
    verbose: int | str = "auto",
) -> dict[str, list[float]]:
    """Train `segmenter` with `cfg.trainer` re-weighting: clean = expert labels, noisy = machine labels.

    An epoch is one pass over the larger of the two sets (the smaller one repeats), so expert
    images are never under-trained when the machine set is small, as in early DSAL rounds.
    """
    trainer = make_trainer(cfg.trainer, segmenter, loss=cfg.loss, ds_weights=cfg.ds_weights,
                           query=cfg.rgs_query, lam=cfg.rgs_lambda)
    trainer.compile(optimizer=keras.optimizers.Adam(cfg.learning_rate))
    steps = -(-max(len(x_noisy), len(x_clean)) // cfg.batch_size)
    ds = make_reweighted_dataset(x_noisy, y_noisy, x_clean, y_clean, cfg.batch_size, seed=seed,
                                 preprocess=normalizer, augment=cfg.augment, repeat=True)
    return trainer.fit(ds.take(steps), validation_data=val_ds, epochs=epochs, callbacks=callbacks,
                       verbose=verbose, shuffle=False).history
