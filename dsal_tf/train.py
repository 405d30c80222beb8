"""Building, compiling and fitting the deeply supervised U-Net with plain Keras `fit`.

Devices: the model is built under a `tf.distribute` strategy (`DISTRIBUTE`), so the same code
runs on one CPU, several GPUs (MirroredStrategy) or several workers. Mixed precision is a flag;
the heads stay float32.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from .config import Config
from .data import Normalizer, Rows, Split, all_foreground_dice, foreground_rows  # noqa: F401 (Rows: FitJob.unlabelled)
from .determinism import reset_seed_generators
from .errors import DsalError
from .files import atomic_write
from .losses import deep_supervision, dice
from .model import (
    float32_copy,  # noqa: F401 (re-exported)
    unet_for,
)
from .run import CHECKPOINT  # the run folder owns the file names
from .space import eval_batch_size, space_for  # noqa: F401 (eval_batch_size re-exported)

HISTORY_PART = "history.csv.part"
tf.get_logger().setLevel("ERROR")  # retracing notices are expected: evaluation and ensembles load many models


def get_distribution(cfg: Config) -> tf.distribute.Strategy:
    """`auto`: MirroredStrategy on more than one GPU, else the default (no-op) strategy."""
    if cfg.distribute == "mirrored" or (
        cfg.distribute == "auto" and len(tf.config.list_logical_devices("GPU")) > 1
    ):
        return tf.distribute.MirroredStrategy()
    if cfg.distribute == "multiworker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.get_strategy()


def cpu_has_bf16(cpuinfo: str | None = None) -> bool:
    """Whether the CPU computes bf16 natively (AVX512-BF16 or AMX), read from the OS's flags."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = {f for line in cpuinfo.splitlines() if line.startswith("flags") for f in line.split(":", 1)[1].split()}
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def resolve_precision(cfg: Config) -> str:
    """`MIXED_PRECISION` as a concrete choice: "off", "float16" or "bfloat16".

    "auto": bf16 on GPUs of compute capability >= 8.0, fp16 on older GPUs, bf16 on CPUs with
    AVX512-BF16 or AMX, fp32 elsewhere; fp32 where the space says reduced precision is not safe
    by default (volumes, see `VolumeSpace.reduced_precision_by_default`)."""
    if cfg.mixed_precision != "auto":
        return cfg.mixed_precision
    if not space_for(cfg).reduced_precision_by_default:
        return "off"
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        cc = tf.config.experimental.get_device_details(gpus[0]).get("compute_capability", (0, 0))
        return "bfloat16" if tuple(cc) >= (8, 0) else "float16"
    return "bfloat16" if cpu_has_bf16() else "off"


POLICIES = {"off": "float32", "float16": "mixed_float16", "bfloat16": "mixed_bfloat16"}


def set_precision(cfg: Config) -> str:
    """Set the Keras policy (heads and losses stay float32) and return the resolved choice."""
    choice = resolve_precision(cfg)
    keras.mixed_precision.set_global_policy(POLICIES[choice])
    return choice


def use_xla(cfg: Config) -> bool:
    if cfg.jit_compile == "auto":
        return bool(tf.config.list_logical_devices("GPU"))
    return cfg.jit_compile == "on"


def compile_model(model: keras.Model, cfg: Config) -> keras.Model:
    losses, weights = deep_supervision(cfg.loss, cfg.ds_weights, batch_dice=cfg.batch_dice)
    model.compile(
        jit_compile=use_xla(cfg),
        optimizer=keras.optimizers.Adam(cfg.learning_rate),
        loss=losses,
        loss_weights=weights,
        metrics={"main": [dice]},
    )
    return model


def new_model(cfg: Config, seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    model = unet_for(cfg, space_for(cfg).model_input_shape)
    return compile_model(model, cfg)


def load_model(path: Path, cfg: Config | None = None) -> keras.Model:
    """A saved U-Net; recompiled with `cfg` when given (training continues with a fresh optimizer)."""
    model = keras.models.load_model(path, compile=False)
    return compile_model(model, cfg) if cfg is not None else model


def reset_optimizer(model: keras.Model, learning_rate: float) -> None:
    """Zero Adam's moments and step and restore the base learning rate, so a round trains the
    same whether the run went straight through or was resumed from a checkpoint."""
    # under mixed precision the optimizer is a LossScaleOptimizer: keep its adaptive loss scale
    opt = getattr(model.optimizer, "inner_optimizer", model.optimizer)
    for v in opt.variables:
        v.assign(tf.zeros_like(v))
    opt.learning_rate = learning_rate


def validation_every(cfg: Config, epochs: int) -> int:
    """Validate every k epochs (`VALIDATION_FREQ`; 0 = auto). Auto: every epoch in fits of up to 10
    epochs (the active-learning rounds) and whenever `EARLY_STOP_PATIENCE` or `LR_SCHEDULE = "plateau"`
    count epochs without a gain; longer fits every ceil(epochs / 10) epochs, so a fit validates about
    10 times whatever its length and its best epoch is chosen on a grid of a tenth of the fit
    (the last epoch is always validated, see `validation_epochs`)."""
    if cfg.validation_freq > 0:
        return int(cfg.validation_freq)
    if epochs <= 10 or cfg.early_stop_patience or cfg.lr_schedule == "plateau":
        return 1
    return math.ceil(epochs / 10)


def validation_epochs(epochs: int, every: int) -> list[int]:
    """The 1-based epochs validated: every `every`-th and the last (Keras `fit(validation_freq=...)`)."""
    return sorted(set(range(every, epochs + 1, every)) | ({epochs} if epochs > 0 else set()))


def validation_freq(cfg: Config, epochs: int) -> int | list[int]:
    """What `fit(validation_freq=...)` gets for a fit of `epochs` epochs (1 = every epoch)."""
    every = validation_every(cfg, epochs)
    return 1 if every == 1 else validation_epochs(epochs, every)


class BestCheckpoint(keras.callbacks.Callback):
    """Keep the U-Net's weights whenever `val_main_dice` improves, and write them to `path` once, when
    the fit ends (`flush`; `fit` also flushes when the fit stops on an error, so the last good weights
    are kept). Unlike `ModelCheckpoint`, it saves the wrapped segmenter when a re-weighting trainer
    drives `fit`, so every checkpoint is a plain U-Net. One write per fit, not one per improvement: a
    round killed mid-fit is redone from its start (its folder has no DONE), so a file written before the
    end was never read."""

    def __init__(self, path: Path, monitor: str = "val_main_dice"):
        super().__init__()
        self.path, self.monitor, self.best = Path(path), monitor, -float("inf")
        self.weights = None  # the best weights so far, kept so `fit` need not load the file back
        self.written = True  # nothing to write yet

    def _segmenter(self):
        return getattr(self.model, "segmenter", self.model)

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is not None and float(value) > self.best:
            self.best = float(value)
            self.weights = self._segmenter().get_weights()
            self.written = False

    def on_train_end(self, logs=None):
        self.flush()

    def flush(self) -> None:
        """Write the best weights kept so far to `path` (the segmenter then holds them)."""
        if self.written or self.weights is None:
            return
        segmenter = self._segmenter()
        segmenter.set_weights(self.weights)
        atomic_write(self.path, segmenter.save)
        self.written = True


class StopOnNaN(keras.callbacks.Callback):
    """A NaN or infinite training loss ends the run with one line naming the round and epoch; the
    checkpoints written so far (the last good weights) stay as they are.

    Checked once per epoch, on the epoch's mean loss (one NaN or infinite batch makes the mean NaN
    or infinite), before `BestCheckpoint` sees the epoch: reading the loss off the device after
    every batch cost a device-to-host read per step. A batch loss handed over as a host number (not a tensor)
    is still checked at once, since that costs nothing."""

    def __init__(self, where: str):
        super().__init__()
        self.where, self.epoch = where, 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def _check(self, loss) -> None:
        if loss is not None and not math.isfinite(float(loss)):
            raise DsalError(f"{self.where}, epoch {self.epoch + 1}: the training loss became {float(loss)}; "
                            "lower LEARNING_RATE or check the masks (the last good checkpoint is kept)")

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if isinstance(loss, (int, float, np.number)):  # already on the host; a tensor waits for the epoch end
            self._check(loss)

    def on_epoch_end(self, epoch, logs=None):
        self.epoch = epoch
        self._check((logs or {}).get("loss"))


def warmup_lr(base: float, step: int, total: int) -> float:
    """Step `step` (0-based) of a linear warm-up over `total` steps trains at base * (step + 1) / total."""
    return base * min(1.0, (step + 1) / total) if total > 0 else base


class WarmUp(keras.callbacks.Callback):
    """Linear learning-rate warm-up over the first `epochs` epochs of a round, set before every batch,
    so Adam's first steps from zero moments cannot push a small net into a saturated, all-background
    state. `steps_per_epoch` defaults to what `fit` reports (without it the ramp goes by epoch).
    After the warm-up the rate is left alone: `LR_SCHEDULE` takes over from there."""

    def __init__(self, base_lr: float, epochs: int, steps_per_epoch: int | None = None):
        super().__init__()
        self.base, self.epochs, self.per_epoch = float(base_lr), int(epochs), steps_per_epoch
        self.step, self.by_epoch = 0, False

    def on_train_begin(self, logs=None):
        self.step = 0
        self.per_epoch = self.per_epoch or (self.params or {}).get("steps")
        self.by_epoch = not self.per_epoch

    def _set(self, step: int, total: int) -> None:
        if step < total:
            self.model.optimizer.learning_rate = warmup_lr(self.base, step, total)

    def on_epoch_begin(self, epoch, logs=None):
        if self.by_epoch:
            self._set(epoch, self.epochs)

    def on_train_batch_begin(self, batch, logs=None):
        if not self.by_epoch:
            self._set(self.step, self.epochs * self.per_epoch)
        self.step += 1


def collapsed(val_dice: list[float], floor: float, patience: int) -> bool:
    """Whether the last `patience` validation Dice values all lie below `floor` (patience 0: never)."""
    return patience > 0 and len(val_dice) >= patience and all(v < floor for v in val_dice[-patience:])


def foreground_collapse_advice(cfg: Config) -> str:
    """What brought a net back from all-foreground, in the order it is worth trying: a loss with a gradient
    at a saturated sigmoid (BCE), a warm-up, a smaller rate, float32."""
    tries = [('LOSS="bce_dice"', cfg.loss not in ("bce", "bce_dice")),
             ("LR_WARMUP_EPOCHS=1", cfg.lr_warmup_epochs == 0)]
    return ", ".join([t for t, useful in tries if useful] + [f"LEARNING_RATE={cfg.learning_rate / 10:g}"]
                     + (["MIXED_PRECISION=off"] if cfg.mixed_precision != "off" else []))


def collapse_advice(cfg: Config, all_foreground: bool = False) -> str:
    """The settings worth trying after a collapse, skipping those already in use."""
    tries = [("BATCH_DICE=True", not cfg.batch_dice), ('LOSS="bce_dice"', cfg.loss != "bce_dice"),
             ('NORM="instance"', cfg.norm == "none"),
             ("FOREGROUND_OVERSAMPLE=0.33", cfg.foreground_oversample == 0 and not all_foreground),
             ("LR_WARMUP_EPOCHS=1", cfg.lr_warmup_epochs == 0)]
    return ", ".join([t for t, useful in tries if useful] + [f"LEARNING_RATE={cfg.learning_rate / 10:g}"])


class StopOnCollapse(keras.callbacks.Callback):
    """End the round with one line when the model has collapsed to a constant mask (added only when the
    training masks have foreground), and a round must not be reported finished with it:
    - all-background: `val_main_dice` stays below `COLLAPSE_FLOOR` for `COLLAPSE_PATIENCE` epochs;
    - all-foreground: as long, and for at least `MIN_CHECKS` validations, it stays within `NEAR` of
      `all_foreground`, the validation Dice of a mask that is foreground everywhere
      (`data.all_foreground_dice`; `{where: value}` for more than one reading of "everywhere", such as a
      volume's voxels but not its padding), and moves less than `STILL` (a stuck net repeats its value;
      one that learns moves). Only values clear of the floor count (`value - NEAR > floor`): on small
      structures a mask that is foreground everywhere scores near 0, as a near-background model does.
      Soft Dice cannot bring a saturated all-foreground net back: its gradient through the sigmoid
      vanishes.
    The round is left unfinished; no silent restart."""

    NEAR, STILL, MIN_CHECKS = 0.01, 0.002, 3

    def __init__(self, where: str, floor: float, patience: int, advice: str, monitor: str = "val_main_dice",
                 every: int = 1, all_foreground: float | dict[str, float] | None = None,
                 foreground_advice: str | None = None):
        super().__init__()
        self.where, self.floor, self.patience, self.advice, self.monitor = where, floor, patience, advice, monitor
        refs = all_foreground if isinstance(all_foreground, dict) else (
            {} if all_foreground is None else {"everywhere": all_foreground})
        self.all_foreground = {k: float(v) for k, v in refs.items() if v - self.NEAR > floor}
        self.foreground_advice = foreground_advice or advice
        self.values: list[float] = []
        # validated every `every` epochs (`validation_epochs`): patience epochs are this many validations
        self.checks = math.ceil(patience / max(int(every), 1)) if patience > 0 else 0

    def on_train_begin(self, logs=None):
        self.values = []

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is None:
            return
        self.values.append(float(value))
        where = f"{self.where}, epoch {epoch + 1}: the model collapsed to all-"
        if collapsed(self.values, self.floor, self.checks):
            raise DsalError(
                f"{where}background (val Dice {self.values[-1]:.4f}, below COLLAPSE_FLOOR={self.floor:g} for "
                f"{self.patience} epochs, although the training masks have foreground); the round is not "
                f"finished: try {self.advice}")
        n = max(self.checks, self.MIN_CHECKS) if self.checks else 0  # one validation alone proves nothing
        window = self.values[-n:] if n else []
        if not (n and len(window) == n and max(window) - min(window) < self.STILL):
            return
        for place, ref in self.all_foreground.items():
            if all(abs(v - ref) < self.NEAR for v in window):
                raise DsalError(
                    f"{where}foreground (val Dice {self.values[-1]:.4f} over the last {n} validations, near the "
                    f"{ref:.4f} of a mask that is foreground {place}); the round is not finished: "
                    f"try {self.foreground_advice}")


def _callbacks(cfg: Config, out_dir: Path, epochs: int, fg_images: int = 0, n_images: int = 0,
               all_foreground: float | dict[str, float] | None = None) -> list:
    """The round's callbacks; `fg_images` of the `n_images` training masks have foreground; `all_foreground`:
    the validation Dice of an all-foreground mask (`data.all_foreground_dice`; `StopOnCollapse` takes more than
    one), None to skip that check."""
    where = out_dir.name.replace("_", " ")
    cbs: list = [
        StopOnNaN(where),
        BestCheckpoint(out_dir / CHECKPOINT),
        keras.callbacks.CSVLogger(str(out_dir / HISTORY_PART)),  # renamed to history.csv when fit ends
    ]
    if cfg.tensorboard:  # one log folder per round (and per ensemble member) under exp/<name>/tensorboard/
        run = out_dir.parent if out_dir.name.startswith("round_") else out_dir.parent.parent
        cbs.append(keras.callbacks.TensorBoard(log_dir=str(run / "tensorboard" / out_dir.relative_to(run))))
    if cfg.early_stop_patience:
        cbs.append(keras.callbacks.EarlyStopping(monitor="val_main_dice", mode="max",
                                                 patience=cfg.early_stop_patience))
    if cfg.lr_schedule == "plateau":
        cbs.append(keras.callbacks.ReduceLROnPlateau(monitor="val_main_dice", mode="max", factor=0.5, patience=3))
    elif cfg.lr_schedule == "cosine":
        base = cfg.learning_rate
        cbs.append(keras.callbacks.LearningRateScheduler(
            lambda e, _lr: 0.5 * base * (1 + math.cos(math.pi * e / max(epochs, 1)))))
    if cfg.lr_warmup_epochs:  # after the schedule: the warm-up overrides it for its epochs
        cbs.append(WarmUp(cfg.learning_rate, cfg.lr_warmup_epochs))
    if cfg.collapse_patience and fg_images:
        cbs.append(StopOnCollapse(where, cfg.collapse_floor, cfg.collapse_patience,
                                  collapse_advice(cfg, all_foreground=fg_images == n_images),
                                  every=validation_every(cfg, epochs), all_foreground=all_foreground,
                                  foreground_advice=foreground_collapse_advice(cfg)))
    return cbs


@dataclass
class FitJob:
    """One fit: the model, the round's training set, the unlabelled pool, and where the round's
    checkpoint goes. What `train.fit` hands a trainer (`TRAINERS[TRAINER].fit_job`).

    `x`, `y`: the images and masks trained on (oracle labels, then pseudo labels; arrays or `Rows`);
    `is_pseudo`: which rows carry machine labels (the noisy stream of the weighting trainers).
    `unlabelled`: the pool images nobody has labelled yet, `Rows` of the memory map read lazily
    (`unlabelled_stream`), for trainers that learn from the whole pool every step; None where a fit
    has no pool (a teacher on expert labels). `space`: the run's space (streams and axes).
    `from_scratch`: `model` is new (untrained), not a trained model that goes on (the loop's rounds
    after the first, a student that starts as its teacher): trainers run their warm-ups only then."""

    model: keras.Model
    cfg: Config
    x: Any
    y: Any
    is_pseudo: np.ndarray
    val: Split
    normalizer: Normalizer
    out_dir: Path
    epochs: int
    seed: int
    unlabelled: Rows | None = None
    space: Any = None
    callbacks: list = field(default_factory=list)
    verbose: int | str = "auto"
    from_scratch: bool = True

    def __post_init__(self):
        if self.space is None:
            self.space = space_for(self.cfg)

    @property
    def validation_freq(self) -> int | list[int]:
        """What Keras `fit(validation_freq=...)` gets: every epoch, or every k-th and the last."""
        return validation_freq(self.cfg, self.epochs)

    def unlabelled_stream(self, seed: int, repeat: bool = True):
        """Batches of unlabelled pool images (normalised, augmented like training, reshuffled each
        pass), or None without a pool. Read from the memory map batch by batch, never whole."""
        if self.unlabelled is None or len(self.unlabelled) == 0:
            return None
        return self.space.image_stream(self.unlabelled, self.normalizer, seed, repeat=repeat)


def all_foreground_references(val: Split) -> dict[str, float]:
    """The validation Dice of the masks a model collapsed to all-foreground predicts, by where the foreground
    is: everywhere; on volumes also everywhere inside each volume and nowhere on its padding (the metric
    counts the padding, and a net may tell padding from tissue)."""
    refs = {"everywhere": all_foreground_dice(val.masks)}
    if len(val.masks.shape) == 5:
        from .volume_space import box_sizes

        refs["everywhere inside the volumes (not on their padding)"] = all_foreground_dice(
            val.masks, sizes=box_sizes(val.images))
    return refs


def fit(job: FitJob) -> dict[str, list[float]]:
    """Train `job.model` for `job.epochs`, keep the best epoch by `val_main_dice`, and load it back.

    The trainer is `TRAINERS[cfg.trainer]` (dsal_tf/trainers/); for the weighting trainers the
    pseudo labels are the noisy stream and the oracle labels the clean one (see `trainers.base`).
    """
    from .trainers import get_trainer

    cfg, model, out_dir = job.cfg, job.model, job.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    job.verbose = 1 if cfg.progress and sys.stdout.isatty() else 2
    keras.utils.set_random_seed(job.seed)
    reset_seed_generators(model, job.seed)  # dropout draws the same masks straight through or resumed
    fg_images = len(foreground_rows(job.y)) if cfg.collapse_patience else 0
    all_fg = all_foreground_references(job.val) if fg_images else None
    job.callbacks = _callbacks(cfg, out_dir, job.epochs, fg_images, len(job.y), all_fg)
    checkpoint = next(c for c in job.callbacks if isinstance(c, BestCheckpoint))
    try:
        history = get_trainer(cfg.trainer).fit_job(job)
    except BaseException:  # NaN, collapse, Ctrl-C: the best weights so far go to disk, as those errors say
        try:
            checkpoint.flush()
        except OSError:  # a full disk now: the error that stopped the fit says more
            pass
        raise
    checkpoint.flush()  # done at the fit's end already, unless a trainer ended without a Keras fit
    best = out_dir / CHECKPOINT
    if checkpoint.weights is not None:  # the weights just written to `best`, without reading the file back
        model.set_weights(checkpoint.weights)
    elif best.is_file():
        model.set_weights(keras.models.load_model(best, compile=False).get_weights())
    else:  # zero epochs: the starting weights are this round's model
        atomic_write(best, model.save)
    if (out_dir / HISTORY_PART).is_file():
        os.replace(out_dir / HISTORY_PART, out_dir / "history.csv")
    return history
