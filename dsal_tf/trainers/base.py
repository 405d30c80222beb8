"""The shared core of every trainer: per-sample and pixel-weighted losses, the paired noisy/clean
sampler, and `PairedTrainer`, the Keras `Model` that wraps a U-Net and drives `fit`.

Every trainer here sees the same data: each step one batch of B "noisy" images (machine labels,
pseudo labels or corrupted masks) and one batch of B "clean" images (expert labels, the meta set),
from `paired_dataset` over the run's space (`job.space.train_stream`: whole images in 2D, random
patches of volumes in 3D; `make_paired_dataset` is the same over in-memory 2D arrays). Its update
is a step of `PairedTrainer.optimizer_for` (Adam at LEARNING_RATE; MW-Net and MCPM: their authors' SGD) on

    noisy_objective(weights) + expert_weight * mean_j L_j(clean),

so trainers differ only in how the noisy batch is weighted (`uniform`: w_i = 1/B, the control).

Layout: channels last, images `[N,*spatial,C]` (NHWC in 2D, NDHWC in 3D), masks and pixel maps
`[N,*spatial,1]`, per-sample values `[N]`. Every function here is rank-generic: per-sample values
reduce over `space.item_axes` (every axis but the first).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from .. import losses as losses_lib
from ..errors import DsalError
from ..model import HEADS
from ..registry import registrar
from ..settings import Settings, in_range, positive, suggest
from ..space import item_axes

LossFn = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]
DS_WEIGHTS = (0.6, 0.3, 0.1)


TRAINERS: dict[str, type] = {}


register_trainer = registrar(TRAINERS)  # @register_trainer("name"): selectable as TRAINER = name


# ------------------------------------------------------------------ losses
@dataclass(frozen=True)
class PairedSettings(Settings):
    """Every trainer on the paired sampler."""

    meta_size: int = 0  # clean set of the weighting trainers: 0 = every oracle label, N = a seeded N of them

    def check(self):
        positive("meta_size", self.meta_size, strict=False)


@dataclass(frozen=True)
class ReweightSettings(PairedSettings):
    """The noisy-teacher re-weighting trainers and their `uniform` control."""

    rgs_lambda: float = -1.0  # trust vs. informativeness; -1 = the trainer's own (rgs 1.0, rgm 0.0, rgsm 0.5)
    rgs_query: bool = False  # "+AL": weights also favour the informative samples
    reweight_loss: str = "bce_dice"  # per-sample loss (docs/methods.md#noisy-teacher); "run" = LOSS

    def check(self):
        super().check()
        if self.rgs_lambda != -1.0:
            in_range("rgs_lambda", self.rgs_lambda, 0.0, 1.0, high_open=False, note=" (or -1 for the default)")
        choices = ("bce_dice", "run", "dice", "bce")
        if self.reweight_loss not in choices:
            raise DsalError(f"REWEIGHT_LOSS = {self.reweight_loss!r} is not one of {list(choices)}"
                            + suggest(self.reweight_loss, choices))


def reweight_loss_name(cfg) -> str:
    """The per-sample loss of the noisy-teacher trainers and their controls: `REWEIGHT_LOSS`
    (BCE + Dice by default, docs/methods.md#noisy-teacher), or the run's `LOSS` when it says "run"."""
    choice = ReweightSettings.from_config(cfg).reweight_loss
    return cfg.loss if choice == "run" else choice


def resolve_loss(loss: str | LossFn) -> LossFn:
    """A loss name from `losses.LOSSES` or a per-sample callable `(y, p) -> [N]`."""
    if callable(loss):
        return loss
    if loss not in losses_lib.LOSSES:
        raise DsalError(f"unknown loss {loss!r}: use one of {sorted(losses_lib.LOSSES)}")
    return losses_lib.get_loss(loss)


def per_sample_loss(outputs: dict, y, loss_fn: LossFn, ds_weights: Sequence[float] = DS_WEIGHTS) -> tf.Tensor:
    """`L_i = sum_k ds_weights[k] * loss(y_i, outputs[head_k]_i)`, shape [N], in float32.

    `y` is one mask `[N,*spatial,1]` shared by all heads, or a `{head: mask}` dict.
    """
    total = 0.0
    for head, weight in zip(HEADS, ds_weights):
        if weight == 0:
            continue
        target = y[head] if isinstance(y, dict) else y
        total += float(weight) * tf.cast(loss_fn(target, outputs[head]), tf.float32)
    return total


def pixel_bce(y, p) -> tf.Tensor:
    """Per-pixel (per-voxel) binary cross-entropy `[N,*spatial,1]` (the loss map MCPM's meta net reads), with
    `losses.bce_loss`'s safe log: a clip at 1e-7 had no gradient where a head saturated (issue 20)."""
    y = tf.cast(y, tf.float32)
    p = tf.cast(p, tf.float32)
    tiny = losses_lib.TINY
    return -(y * tf.math.log(tf.maximum(p, tiny)) + (1.0 - y) * tf.math.log(tf.maximum(1.0 - p, tiny)))


def pixel_weighted_loss(y, p, r, loss: str) -> tf.Tensor:
    """The configured loss with pixel weights `r` `[N,*spatial,1]`, per sample [N]; `r = 1` gives the plain loss.

    bce: `mean_xy r * bce_xy`; dice: `1 - (2 sum r y p + 1) / (sum r y + sum r p + 1)` (a pixel with
    r = 0 leaves both the overlap and the sizes); bce_dice: their sum. Any rank: sums and means run
    over every axis but the first, so a volume gives what its voxels laid out as an image give.
    """
    if loss not in losses_lib.LOSSES:
        raise DsalError(f"pixel weights need a named loss, one of {sorted(losses_lib.LOSSES)}, not {loss!r}")
    y = tf.cast(y, tf.float32)
    p = tf.cast(p, tf.float32)
    r = tf.cast(r, tf.float32)
    axes = item_axes(p)
    total = 0.0
    if loss in ("bce", "bce_dice"):
        total += tf.reduce_mean(r * pixel_bce(y, p), axis=axes)
    if loss in ("dice", "bce_dice"):
        inter = tf.reduce_sum(r * y * p, axis=axes)
        size = tf.reduce_sum(r * y, axis=axes) + tf.reduce_sum(r * p, axis=axes)
        total += 1.0 - (2.0 * inter + losses_lib.SMOOTH) / (size + losses_lib.SMOOTH)
    return total


def head_sum(fn: Callable[[str], tf.Tensor], ds_weights: Sequence[float]) -> tf.Tensor:
    """`sum_k ds_weights[k] * fn(head_k)` over the heads with a non-zero weight."""
    return sum(float(w) * fn(h) for h, w in zip(HEADS, ds_weights) if w != 0)


def mean_teacher_decay(step, gamma: float, from_scratch: bool = True) -> tf.Tensor:
    """Mean Teacher's EMA warm-up `min(1 - 1/(step + 1), gamma)`, step = 0 for the first update:
    the teacher follows the student closely while both are young, instead of staying near its
    random start for ~1/(1 - gamma) steps. A model that is not `from_scratch` (a trained one going
    on) has a useful teacher already: `gamma` from the first update (docs/methods.md#pint)."""
    if not from_scratch:
        return tf.constant(float(gamma), tf.float32)
    step = tf.cast(step, tf.float32)
    return tf.minimum(1.0 - 1.0 / (step + 1.0), float(gamma))


def ema_update(teacher: keras.Model, student: keras.Model, decay) -> None:
    """`theta_teacher = decay theta_teacher + (1 - decay) theta_student`, every weight."""
    for t, s in zip(teacher.weights, student.weights):
        d = tf.cast(decay, t.dtype)
        t.assign(d * t + (1.0 - d) * s)


def main_mask(y):
    return y["main"] if isinstance(y, dict) else y


def tf_variables(variables: Sequence) -> list:
    """The `tf.Variable` behind each Keras Variable: what forward mode and nested tapes watch, and a
    dtype that `UnconnectedGradients.ZERO` understands (a Keras Variable reports a string)."""
    return [getattr(v, "value", v) for v in variables]


# ------------------------------------------------------------------ the paired sampler
Stream = Callable[[object, object, int, bool], tf.data.Dataset]  # (images, masks, seed, repeat) -> (x, y) batches


def paired_dataset(stream: Stream, noisy: tuple, clean: tuple, seed: int = 0, repeat: bool = False) -> tf.data.Dataset:
    """`((x_noisy, y_noisy), (x_clean, y_clean))` batches, each stream from `stream(images, masks, seed,
    repeat)` (a space's `train_stream`: whole images in 2D, patches in 3D); one epoch is one epoch of
    the noisy stream.

    The clean set is repeated and reshuffled (seed + 1), so a small expert set never ends an epoch;
    with `repeat` the noisy set repeats too (then bound the epoch with `fit(steps_per_epoch=...)`).
    """
    if len(noisy[0]) == 0 or len(clean[0]) == 0:
        raise DsalError("the paired sampler needs at least one noisy and one clean image")
    return tf.data.Dataset.zip((stream(*noisy, seed, repeat), stream(*clean, seed + 1, True))).prefetch(
        tf.data.AUTOTUNE)


def space_stream(space, normalizer) -> Stream:
    """The run's training stream (`space.train_stream`, BATCH_SIZE and AUGMENT from its config) as a `Stream`."""
    return lambda images, masks, seed, repeat: space.train_stream(images, masks, normalizer, seed, repeat=repeat)


def make_paired_dataset(
    noisy: tuple[np.ndarray, np.ndarray],
    clean: tuple[np.ndarray, np.ndarray],
    batch_size: int,
    seed: int = 0,
    preprocess: Callable | None = None,
    augment: bool = False,
    repeat: bool = False,
) -> tf.data.Dataset:
    """`paired_dataset` over 2D `(images, masks)` arrays without a run (tests, benchmarks): the 2D
    stream `data.make_dataset`, which `space.ImageSpace.train_stream` is, at `batch_size`.
    `preprocess` maps an image batch to float32 (e.g. a `data.Normalizer`); default: a cast.
    """
    from ..data import make_dataset

    prep = preprocess if preprocess is not None else (lambda x: tf.cast(x, tf.float32))

    def stream(images, masks, s, rep):
        return make_dataset(images, masks, prep, batch_size, shuffle=True, augment=augment, seed=s, repeat=rep)

    return paired_dataset(stream, noisy, clean, seed, repeat)


def split_clean(is_noisy: np.ndarray, meta_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`(clean, noisy)` indices. Clean = the expert (not `is_noisy`) images; with `meta_size` > 0 and
    more expert images than that, a seeded `meta_size` of them, and the other expert images join
    the noisy stream (still trained on, now weighted like the rest)."""
    clean = np.flatnonzero(~is_noisy)
    noisy = np.flatnonzero(is_noisy)
    if 0 < meta_size < len(clean):
        keep = np.sort(np.random.default_rng([seed, meta_size]).choice(len(clean), meta_size, replace=False))
        noisy = np.sort(np.r_[noisy, np.delete(clean, keep)])
        clean = clean[keep]
    return clean, noisy


# ------------------------------------------------------------------ the trainer
class PairedTrainer(keras.Model):
    """Wraps a segmenter; `fit` on `((x_noisy, y_noisy), (x_clean, y_clean))` batches.

    Subclasses override `train_step` (the update itself changes); `evaluate` takes plain `(x, y)`
    and reports `loss` and `main_dice`, so `val_main_dice` drives checkpoints. Save
    `trainer.segmenter`, a plain U-Net, never the trainer (`train.BestCheckpoint` does).
    Trackers: `loss`, `clean_loss`, `main_dice` (on the clean batch), `mean_weight` and
    `kept_fraction` (the share of noisy samples or pixels with a non-zero weight).

    `from_scratch`: whether the segmenter starts untrained (a new model) or continues a trained one
    (the loop's rounds after the first, a student that starts as its teacher); warm-ups that exist
    because a fresh network is useless (PINT's teacher) run only from scratch. `FitJob.from_scratch`
    says which.
    """

    name: str = "paired"  # the registry name, set by `register_trainer`
    Settings = PairedSettings

    def __init__(
        self,
        segmenter: keras.Model,
        loss: str | LossFn = "bce_dice",
        ds_weights: Sequence[float] = DS_WEIGHTS,
        expert_weight: float = 1.0,
        from_scratch: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if len(ds_weights) != len(HEADS):
            raise DsalError(f"ds_weights={tuple(ds_weights)} needs {len(HEADS)} values, one per head {HEADS}")
        self.segmenter = segmenter
        self.loss_name = loss if isinstance(loss, str) else None
        self.loss_fn = resolve_loss(loss)
        self.ds_weights = tuple(float(w) for w in ds_weights)
        self.expert_weight = float(expert_weight)
        self.from_scratch = bool(from_scratch)
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.clean_loss_tracker = keras.metrics.Mean(name="clean_loss")
        self.dice_tracker = keras.metrics.Mean(name="main_dice")
        self.weight_tracker = keras.metrics.Mean(name="mean_weight")
        self.kept_tracker = keras.metrics.Mean(name="kept_fraction")
        self.built = True  # the segmenter is built; stops fit from calling us on a zipped batch

    @classmethod
    def config_kwargs(cls, cfg, total_steps: int) -> dict:
        """Constructor arguments a run gives this trainer (beyond loss and ds_weights), from its
        `Settings` and the run's loop fields."""
        return {}

    @classmethod
    def loss_for(cls, cfg) -> str:
        """The loss name this trainer uses in a run: `LOSS` unless the method fixes another."""
        return cfg.loss

    @classmethod
    def optimizer_for(cls, cfg) -> keras.optimizers.Optimizer:
        """The optimizer of the real step in a run: Adam at `LEARNING_RATE` unless the method says otherwise."""
        return keras.optimizers.Adam(cfg.learning_rate)

    @classmethod
    def for_run(cls, segmenter: keras.Model, cfg, total_steps: int, from_scratch: bool = True) -> PairedTrainer:
        """The trainer a run's config asks for; `total_steps` = optimizer steps of the whole fit."""
        return cls(segmenter, loss=cls.loss_for(cfg), ds_weights=cfg.ds_weights, from_scratch=from_scratch,
                   **cls.config_kwargs(cfg, total_steps))

    @classmethod
    def fit_job(cls, job) -> dict[str, list[float]]:
        """What `train.fit` calls: the paired sampler, or plain `fit` when nothing is noisy (round 0)."""
        val_ds = job.space.eval_stream(job.val.images, job.val.masks, job.normalizer)
        history = fit_paired(cls, job, val_ds)
        return history if history is not None else fit_plain(job)

    @property
    def metrics(self) -> list:
        return [self.loss_tracker, self.clean_loss_tracker, self.dice_tracker, self.weight_tracker,
                self.kept_tracker]

    def compile(self, optimizer="adam", jit_compile: bool | str = False, **kwargs) -> None:
        """Adam by default; XLA off by default (forward mode and nested tapes inside XLA are untested)."""
        super().compile(optimizer=optimizer, jit_compile=jit_compile, **kwargs)

    def call(self, x, training: bool = False):
        return self.segmenter(x, training=training)

    def losses_of(self, outputs: dict, y) -> tf.Tensor:
        return per_sample_loss(outputs, y, self.loss_fn, self.ds_weights)

    def track(self, objective, clean_loss, clean_out, y_clean, weights) -> dict:
        """Update the trackers; `weights` are the noisy batch's sample or pixel weights."""
        self.loss_tracker.update_state(objective)
        self.clean_loss_tracker.update_state(clean_loss)
        # Dice against the expert masks: the only labels this step can trust.
        self.dice_tracker.update_state(losses_lib.dice(main_mask(y_clean), clean_out["main"]))
        self.weight_tracker.update_state(tf.reduce_mean(weights))
        self.kept_tracker.update_state(tf.reduce_mean(tf.cast(weights > 0, tf.float32)))
        return {m.name: m.result() for m in self.metrics}

    def test_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        outputs = self.segmenter(x, training=False)
        self.loss_tracker.update_state(self.losses_of(outputs, y), sample_weight=sample_weight)
        self.dice_tracker.update_state(
            losses_lib.dice(main_mask(y), outputs["main"]), sample_weight=sample_weight
        )
        return {m.name: m.result() for m in (self.loss_tracker, self.dice_tracker)}


def steps_per_epoch(n_noisy: int, n_clean: int, batch_size: int, space=None) -> int:
    """One pass over the larger of the two sets (the smaller one repeats): the space's epoch over n
    items (`ImageSpace`: ceil(n / B) batches; `VolumeSpace`: its patch steps, as a plain fit of the
    same volumes takes), or ceil(n / `batch_size`) without a space (arrays in tests and benchmarks)."""
    n = max(n_noisy, n_clean)
    return int(space.steps_per_epoch(n)) if space is not None else max(1, math.ceil(n / batch_size))


def fit_paired(trainer_cls: type[PairedTrainer], job, val_ds: tf.data.Dataset) -> dict[str, list[float]] | None:
    """Train `job.model` with `trainer_cls` on the paired sampler over the run's space (images in 2D,
    patches in 3D): noisy = the `job.is_pseudo` items, clean = the rest (capped at `META_SIZE`, see
    `split_clean`). `None` when there is no noisy item to weigh.

    An epoch is one pass over the larger of the two sets (the smaller one repeats), so expert
    images are never under-trained when the noisy set is small, as in early DSAL rounds.
    """
    cfg, x, y, seed = job.cfg, job.x, job.y, job.seed
    clean, noisy = split_clean(np.asarray(job.is_pseudo, bool), trainer_cls.Settings.from_config(cfg).meta_size, seed)
    if len(noisy) == 0 or len(clean) == 0:
        return None
    steps = steps_per_epoch(len(noisy), len(clean), cfg.batch_size, job.space)
    trainer = trainer_cls.for_run(job.model, cfg, steps * max(job.epochs, 1), from_scratch=job.from_scratch)
    trainer.compile(optimizer=trainer_cls.optimizer_for(cfg))
    ds = paired_dataset(space_stream(job.space, job.normalizer), (x[noisy], y[noisy]), (x[clean], y[clean]),
                        seed=seed, repeat=True)
    return trainer.fit(ds, steps_per_epoch=steps, validation_data=val_ds, epochs=job.epochs, callbacks=job.callbacks,
                       verbose=job.verbose, shuffle=False, validation_freq=job.validation_freq).history


def fit_plain(job) -> dict:
    """Plain Keras `fit` of the compiled multi-output U-Net on all of `(job.x, job.y)`. An epoch is one
    pass of the space's stream (2D: every image once, the last batch partial), reshuffled each pass.

    The passes are repeated into one endless dataset with `steps_per_epoch` = one pass: Keras then keeps
    one iterator for the whole fit. Given a finite dataset it makes a new iterator at every epoch start
    and drops the last one, which stalled the loop for up to 2 s while tf.data's autotuner was on
    (bench/results/speed.md). Repeating whole passes, not elements, keeps each epoch what it was."""
    space, cfg = job.space, job.cfg
    train_ds = space.train_stream(job.x, job.y, job.normalizer, job.seed, heads=HEADS,
                                  foreground_oversample=cfg.foreground_oversample).repeat()
    val_ds = space.eval_stream(job.val.images, job.val.masks, job.normalizer, heads=HEADS)
    return job.model.fit(train_ds, steps_per_epoch=space.steps_per_epoch(len(job.y)), validation_data=val_ds,
                         epochs=job.epochs, callbacks=job.callbacks, verbose=job.verbose, shuffle=False,
                         validation_freq=job.validation_freq).history
