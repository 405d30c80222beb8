"""Building, compiling and fitting the deeply supervised U-Net with plain Keras `fit`.

Devices: the model is built under a `tf.distribute` strategy (`DISTRIBUTE`), so the same code
runs on one CPU, several GPUs (MirroredStrategy) or several workers. Mixed precision is a flag;
the heads stay float32.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from .config import Config
from .data import Normalizer, Split
from .determinism import reset_seed_generators
from .errors import DsalError
from .files import atomic_write
from .losses import deep_supervision, dice
from .model import unet_for

CHECKPOINT = "best.keras"
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
    AVX512-BF16 or AMX, fp32 elsewhere."""
    if cfg.mixed_precision != "auto":
        return cfg.mixed_precision
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
    losses, weights = deep_supervision(cfg.loss, cfg.ds_weights)
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
    model = unet_for(cfg)
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


class BestCheckpoint(keras.callbacks.Callback):
    """Save the U-Net whenever `val_main_dice` improves. Unlike `ModelCheckpoint`, it saves the
    wrapped segmenter when a re-weighting trainer drives `fit`, so every checkpoint is a plain U-Net."""

    def __init__(self, path: Path, monitor: str = "val_main_dice"):
        super().__init__()
        self.path, self.monitor, self.best = Path(path), monitor, -float("inf")

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is not None and float(value) > self.best:
            self.best = float(value)
            segmenter = getattr(self.model, "segmenter", self.model)
            atomic_write(self.path, segmenter.save)


class StopOnNaN(keras.callbacks.Callback):
    """A NaN or infinite training loss ends the run with one line naming the round and epoch; the
    checkpoints written so far (the last good weights) stay as they are."""

    def __init__(self, where: str):
        super().__init__()
        self.where, self.epoch = where, 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            raise DsalError(f"{self.where}, epoch {self.epoch + 1}: the training loss became {float(loss)}; "
                            "lower LEARNING_RATE or check the masks (the last good checkpoint is kept)")


def _callbacks(cfg: Config, out_dir: Path, epochs: int) -> list:
    cbs: list = [
        StopOnNaN(out_dir.name.replace("_", " ")),
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
    return cbs


def fit(
    model: keras.Model,
    cfg: Config,
    x: np.ndarray,
    y: np.ndarray,
    is_pseudo: np.ndarray,
    val: Split,
    normalizer: Normalizer,
    out_dir: Path,
    epochs: int,
    seed: int,
) -> dict[str, list[float]]:
    """Train for `epochs`, keep the best epoch by `val_main_dice`, and load it back into `model`.

    The trainer is `TRAINERS[cfg.trainer]` (dsal_tf/trainers/); for the weighting trainers the
    pseudo labels are the noisy stream and the oracle labels the clean one (see `trainers.base`).
    """
    from .trainers import get_trainer

    out_dir.mkdir(parents=True, exist_ok=True)
    verbose = 1 if cfg.progress and sys.stdout.isatty() else 2
    keras.utils.set_random_seed(seed)
    reset_seed_generators(model, seed)  # dropout draws the same masks straight through or resumed
    history = get_trainer(cfg.trainer).fit_arrays(model, cfg, x, y, is_pseudo, val, normalizer,
                                                  _callbacks(cfg, out_dir, epochs), epochs, seed, verbose)
    best = out_dir / CHECKPOINT
    if best.is_file():
        model.set_weights(keras.models.load_model(best, compile=False).get_weights())
    else:  # zero epochs: the starting weights are this round's model
        atomic_write(best, model.save)
    if (out_dir / HISTORY_PART).is_file():
        os.replace(out_dir / HISTORY_PART, out_dir / "history.csv")
    return history
