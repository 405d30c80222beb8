"""The run configuration: `constants.py` read once into a frozen, validated object.

Resolution order (later wins): built-in defaults < preset (`PRESET`) < the constants file <
CLI overrides. Every name is checked; an unknown or out-of-range constant is a `DsalError`
that names it and suggests the closest valid name.
"""

from __future__ import annotations

import dataclasses
import json
import runpy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import DsalError
from .settings import coerce, suggest


@dataclass(frozen=True)
class Config:
    """All settings of one run. Field names are the lower-case names of `constants.py`."""

    # --- where things live
    preset: str = "demo"  # named defaults: demo, auto (planned from the data), isic2017, isic2017-cpu, bone_age
    exp_name: str = ""  # "" -> derived from preset, strategy and seed
    exp_dir: str = "exp"  # where run folders are written
    data_path: str = "orgData"  # data root: {train,val,test}{Img,GT}
    cache_dir: str = ""  # "" -> <exp_dir>/.cache
    # --- data
    img_rows: int = 64  # network input height (images are area-resized to it)
    img_cols: int = 64  # network input width
    color: str = "rgb"  # "rgb" or "gray"
    mask_naming: str = "auto"  # "auto", "isic" (X.jpg -> X_segmentation.png) or "same"
    normalization: str = "zscore"  # "zscore" (train-pool statistics) or "unit" (/255)
    augment: bool = True  # random flips (and 90-degree turns of square inputs) while training
    pool_size: int = 0  # use only the first N training images (0 = all)
    synthetic_counts: tuple = (240, 40, 40)  # train/val/test images `make-synthetic` writes
    synthetic_size: int = 128  # side of the synthetic images on disk
    # --- model
    base_filters: int = 8  # filters of the first U-Net block (doubling per level)
    depth: int = 4  # U-Net levels (>= 3: the side heads sit on the 1/4 and 1/2 blocks)
    dropout: float = 0.5  # dropout rate (also the MC-dropout of CEAL)
    loss: str = "auto"  # "dice", "bce", "bce_dice"; "auto": dice on images, bce_dice on NIfTI volumes
    ds_weights: tuple = (0.6, 0.3, 0.1)  # deep-supervision loss weights of main, side_1, side_2
    side_upsampling: str = "nearest"  # side-head logits: "nearest" (reference) or "bilinear" (pre-issue-8 variant)
    dropout_at: str = "bottleneck"  # "bottleneck" (reference) or "bottleneck+deepest" (also the deepest encoder block)
    norm: str = "none"  # U-Net normalization after each conv: "none" (reference), "batch" or "instance"
    batch_dice: bool = False  # soft Dice over the whole batch (nnU-Net's batch Dice) instead of per image
    # --- training
    learning_rate: float = 1e-3  # Adam learning rate
    batch_size: int = 16  # training batch size
    nb_initial_epochs: int = 15  # epochs of round 0 (from scratch)
    nb_active_epochs: int = 8  # epochs of every later round (continuing from the last best model)
    early_stop_patience: int = 0  # 0 = off
    validation_freq: int = 0  # validate every k epochs; 0 = auto (k = 1 up to 10 epochs, else ceil(epochs/10))
    lr_schedule: str = "none"  # "none", "plateau" or "cosine"
    # "auto" (bf16 on AVX512-BF16/AMX CPUs and GPUs of cc >= 8, fp16 on older GPUs), "off", "float16", "bfloat16"
    mixed_precision: str = "auto"
    lr_warmup_epochs: int = 0  # linear learning-rate warm-up over the first k epochs of each round (0 = off)
    foreground_oversample: float = 0.0  # share of each batch drawn from images with foreground (0 = plain shuffle)
    collapse_floor: float = 0.01  # val Dice below this for COLLAPSE_PATIENCE epochs, with foreground in the
    collapse_patience: int = 5  # training masks (or still at an all-foreground mask's): round stopped (0 = off)
    jit_compile: str = "auto"  # XLA: "auto" (on with a GPU, off on CPU where it is slower), "on", "off"
    distribute: str = "auto"  # "auto", "none", "mirrored" or "multiworker"
    seed: int = 0  # every random choice of the run follows from it
    # --- active learning
    nb_labeled: int = 40  # initial oracle labels (round 0)
    nb_iterations: int = 3  # active-learning rounds after round 0
    nb_next_sample: int = 20  # oracle labels per round
    query_strategy: str = "dsal"  # how the pool is ranked (`dsal run --help` lists them)
    pseudo_policy: str = "auto"  # "auto" = the strategy's own (CEAL: "ceal", others: "confidence")
    selection: str = "auto"  # "rank" (top-n), "histogram" (CEAL bins), "diverse", "power", "auto" (strategy's own)
    deterministic: bool = True  # seeds + tf op determinism: reruns give identical weights and pools
    pseudo_epoch: int = 2  # first round with pseudo labels
    nb_pseudo_initial: int = 20  # pseudo labels in that round ...
    pseudo_rate: int = 20  # ... growing by this many per round
    trainer: str = "standard"  # dsal_tf/trainers/ (`dsal run --help` lists them)
    oracle: str = "simulated"  # "simulated" (masks on disk are revealed) or "files" (a person draws them)
    tensorboard: bool = False  # Keras TensorBoard logs per round under exp/<name>/tensorboard/
    # --- run control
    resume_on: bool = True  # go on from the last complete round of an existing run
    nb_overlays: int = 6  # test images drawn per round by `python test.py`
    progress: bool = True  # progress bars
    plan_budget_minutes: float = 15.0  # PRESET "auto": the run-time budget the plan fits
    # --- every other constant, by lower-case name: owned, coerced and checked by the algorithm class
    # that declares it (`dsal_tf/settings.py`, resolved by `components.build`); config.json lists them flat
    settings: dict = field(default_factory=dict, compare=True)

    # ---------------------------------------------------------------- helpers
    @property
    def name(self) -> str:
        return self.exp_name or f"{self.preset}-{self.query_strategy}-s{self.seed}"

    @property
    def run_dir(self) -> Path:
        return Path(self.exp_dir) / self.name

    @property
    def channels(self) -> int:
        return 3 if self.color == "rgb" else 1

    @property
    def cache_path(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else Path(self.exp_dir) / ".cache"

    def nb_pseudo(self, iteration: int) -> int:
        """How many pseudo labels iteration `iteration` (1-based) takes; 0 before `pseudo_epoch`."""
        if self.pseudo_policy == "none" or iteration < self.pseudo_epoch:
            return 0
        return self.nb_pseudo_initial + self.pseudo_rate * (iteration - self.pseudo_epoch)

    def replace(self, **changes: Any) -> Config:
        return resolve({**self.to_dict(), **changes}, source="override")

    def to_dict(self) -> dict:
        """Every setting by name, the algorithm settings flat beside the fields (as `constants.py` has them)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "settings"}
        return {**self.settings, **out}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


FIELDS = {f.name: f for f in dataclasses.fields(Config) if f.name != "settings"}

# ------------------------------------------------------------------- presets
PRESETS: dict[str, dict[str, Any]] = {
    # Embedded synthetic data; the whole loop finishes on 2 CPU cores in a few minutes.
    "demo": {},
    # Planned from the data on first use (`dsal plan`, dsal_tf/plan/), stored in the run folder.
    "auto": {},
    # The DSAL reference code's ISIC 2017 protocol (its src/constants.py, docs/methods.md#dsal): greyscale
    # inputs divided by 255 (its z_score = False), no augmentation, one soft Dice over the whole batch.
    # Settings it shares with our defaults (4 levels, bottleneck dropout 0.5, nearest side heads, no norm,
    # DS_WEIGHTS 0.6/0.3/0.1, no LR schedule or early stop, CONF_THRES, 20 MC passes) are not repeated.
    # A saved run keeps the values in its config.json; runs made before 2026-12-01 (c5c42df) lack
    # BATCH_DICE and would take True from here on resume.
    "isic2017": dict(
        img_rows=192, img_cols=240, color="gray", base_filters=32, dropout=0.5, loss="dice",
        batch_dice=True, augment=False, normalization="unit",
        learning_rate=1e-5, batch_size=32, nb_initial_epochs=15, nb_active_epochs=10,
        nb_labeled=600, nb_iterations=10, nb_next_sample=35, pseudo_epoch=5,
        nb_pseudo_initial=20, pseudo_rate=20, pool_size=1600,
    ),
    # A reduced ISIC protocol that finishes in about 15 minutes on 2 CPU cores.
    "isic2017-cpu": dict(
        img_rows=64, img_cols=64, color="rgb", base_filters=16, dropout=0.5, loss="dice",
        learning_rate=1e-3, batch_size=16, nb_initial_epochs=12, nb_active_epochs=5,
        nb_labeled=600, nb_iterations=5, nb_next_sample=70, pseudo_epoch=3,
        nb_pseudo_initial=40, pseudo_rate=40, pool_size=1600, normalization="zscore",
        lr_schedule="none",
    ),
    # RSNA bone age (139 images, same-name masks): BCE loss, no z-score.
    "bone_age": dict(
        img_rows=192, img_cols=240, color="gray", base_filters=32, loss="bce",
        normalization="unit", mask_naming="same", learning_rate=1e-5, batch_size=8,
        nb_labeled=40, nb_iterations=5, nb_next_sample=10, pseudo_epoch=3,
        nb_pseudo_initial=5, pseudo_rate=5,
    ),
}

# ---------------------------------------------------------------- validation
_CHOICES = {
    "color": ("rgb", "gray"),
    "mask_naming": ("auto", "isic", "same"),
    "normalization": ("zscore", "unit"),
    "loss": ("auto", "dice", "bce", "bce_dice"),
    "lr_schedule": ("none", "plateau", "cosine"),
    "distribute": ("auto", "none", "mirrored", "multiworker"),
    "side_upsampling": ("nearest", "bilinear"),
    "dropout_at": ("bottleneck", "bottleneck+deepest"),
    "norm": ("none", "batch", "instance"),
    "mixed_precision": ("auto", "off", "float16", "bfloat16"),
    "jit_compile": ("auto", "on", "off"),
    "preset": tuple(PRESETS),
}  # the names of registered classes (QUERY_STRATEGY, TRAINER, ...) are checked by `components.build`
_POSITIVE = {"img_rows", "img_cols", "base_filters", "depth", "batch_size", "nb_labeled", "nb_next_sample",
             "synthetic_size"}
_NON_NEGATIVE = {
    "nb_initial_epochs", "nb_active_epochs", "early_stop_patience", "validation_freq", "nb_iterations",
    "pseudo_epoch", "nb_pseudo_initial", "pseudo_rate", "pool_size", "nb_overlays",
    "lr_warmup_epochs", "collapse_patience",
}


def _coerce(name: str, value: Any, source: str) -> Any:
    if name == "mixed_precision" and isinstance(value, bool):  # the old boolean switch
        return "float16" if value else "off"
    return coerce(name, value, FIELDS[name].default, source)


def _check_ranges(cfg: Config, source: str) -> None:
    for name in _POSITIVE:
        if getattr(cfg, name) <= 0:
            raise DsalError(f"{name.upper()} in {source} must be > 0, got {getattr(cfg, name)}")
    for name in _NON_NEGATIVE:
        if getattr(cfg, name) < 0:
            raise DsalError(f"{name.upper()} in {source} must be >= 0, got {getattr(cfg, name)}")
    if cfg.depth < 3:
        raise DsalError(f"DEPTH in {source} must be >= 3 (the side heads sit on the 1/4 and 1/2 blocks)")
    for name, low, high in (("dropout", 0.0, 1.0), ("foreground_oversample", 0.0, 1.0),
                            ("collapse_floor", 0.0, 1.0)):
        if not low <= getattr(cfg, name) < high:
            raise DsalError(f"{name.upper()} in {source} must be in [{low:g}, {high:g}), got {getattr(cfg, name)}")
    for name in ("plan_budget_minutes", "learning_rate"):
        if getattr(cfg, name) <= 0:
            raise DsalError(f"{name.upper()} in {source} must be > 0, got {getattr(cfg, name)}")


def _check(cfg: Config, source: str) -> None:
    for name, options in _CHOICES.items():
        value = getattr(cfg, name)
        if value not in options:
            raise DsalError(
                f"{name.upper()} in {source} = {value!r} is not one of {list(options)}"
                + suggest(str(value), options)
            )
    _check_ranges(cfg, source)
    if len(cfg.ds_weights) != 3 or any(w < 0 for w in cfg.ds_weights):
        raise DsalError(
            f"DS_WEIGHTS in {source} needs 3 non-negative weights (main, side_1, side_2), "
            f"got {cfg.ds_weights}"
        )
    if len(cfg.synthetic_counts) != 3:
        raise DsalError(f"SYNTHETIC_COUNTS in {source} needs 3 counts (train, val, test)")
    step = 2 ** cfg.depth
    for name in ("img_rows", "img_cols"):
        if getattr(cfg, name) % step:
            raise DsalError(
                f"{name.upper()} in {source} = {getattr(cfg, name)} must be divisible by "
                f"2**DEPTH = {step}; use {getattr(cfg, name) // step * step or step}"
            )


def resolve(values: dict[str, Any], source: str = "constants.py") -> Config:
    """Build a validated `Config` from `{name: value}` (names in any case).

    Names that are not `Config` fields are algorithm settings: they are kept, as given, in
    `Config.settings`, and `components.build` checks them against the classes that own them (a
    typo is reported there, with the closest valid name)."""
    merged: dict[str, Any] = {}
    settings: dict[str, Any] = {}
    for key, value in values.items():
        name = key.lower()
        if name == "settings" and isinstance(value, dict):  # a Config's own dict, passed back in
            settings.update({k.lower(): v for k, v in value.items()})
        elif name in FIELDS:
            merged[name] = _coerce(name, value, source)
        else:
            settings[name] = value
    preset = merged.get("preset", Config.preset)
    if preset not in PRESETS:
        raise DsalError(
            f"PRESET in {source} = {preset!r} is not one of {list(PRESETS)}" + suggest(preset, PRESETS)
        )
    cfg = Config(**{**PRESETS[preset], **merged, "settings": dict(sorted(settings.items()))})
    _check(cfg, source)
    return cfg.replace(loss=auto_loss(cfg.data_path)) if cfg.loss == "auto" else cfg


def auto_loss(data_path: str) -> str:
    """`LOSS = "auto"`: soft Dice on images (the reference DSAL loss, the tables' setting), Dice + BCE on
    NIfTI volumes (nnU-Net's loss): with soft Dice alone, two of four hippocampus seeds collapsed to
    all-background in round 0 (val Dice 0.0003), and with Dice + BCE seed 1 reached 0.80
    (bench/results/hippocampus.md). A folder with no data yet counts as images."""
    from .folders import dataset_rank

    return "bce_dice" if dataset_rank(data_path) == 3 else "dice"


def read_constants(path: str | Path) -> dict[str, Any]:
    """The upper-case names a constants file defines (it is plain Python, run once)."""
    path = Path(path)
    if not path.is_file():
        raise DsalError(f"constants file {path} not found; pass --constants PATH or create it")
    try:
        namespace = runpy.run_path(str(path))
    except Exception as exc:  # a syntax error in the user's file, say so in one line
        raise DsalError(f"{path} could not be read: {type(exc).__name__}: {exc}") from None
    return {k: v for k, v in namespace.items() if k.isupper() and not k.startswith("_")}


def load_config(
    constants: str | Path | None = "constants.py", overrides: dict[str, Any] | None = None
) -> Config:
    """Defaults < preset < constants file < overrides (CLI)."""
    values: dict[str, Any] = {}
    source = "constants.py"
    if constants is not None and Path(constants).is_file():
        values.update(read_constants(constants))
        source = str(constants)
    elif constants is not None and Path(constants).name != "constants.py":
        raise DsalError(f"constants file {constants} not found; check the --constants path")
    cfg = resolve(values, source=source)
    if overrides:
        cfg = resolve({**values, **{k: v for k, v in overrides.items() if v is not None}},
                      source="the command line")
    return cfg


def parse_set_options(pairs: tuple[str, ...]) -> dict[str, Any]:
    """`--set KEY=VALUE` pairs into a dict; values parsed as Python literals when possible."""
    import ast

    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise DsalError(f"--set {pair!r} needs the form KEY=VALUE, e.g. --set NB_ITERATIONS=5")
        key, raw = pair.split("=", 1)
        try:
            out[key.strip()] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            out[key.strip()] = raw
    return out


__all__ = ["Config", "PRESETS", "load_config", "resolve", "read_constants", "parse_set_options"]
