"""The run configuration: `constants.py` read once into a frozen, validated object.

Resolution order (later wins): built-in defaults < preset (`PRESET`) < the constants file <
CLI overrides. Every name is checked; an unknown or out-of-range constant is a `DsalError`
that names it and suggests the closest valid name.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import runpy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import DsalError


@dataclass(frozen=True)
class Config:
    """All settings of one run. Field names are the lower-case names of `constants.py`."""

    # --- where things live
    preset: str = "demo"
    exp_name: str = ""  # "" -> derived from preset, strategy and seed
    exp_dir: str = "exp"
    data_path: str = "orgData"
    cache_dir: str = ""  # "" -> <exp_dir>/.cache
    # --- data
    img_rows: int = 64
    img_cols: int = 64
    color: str = "rgb"  # "rgb" or "gray"
    mask_naming: str = "auto"  # "auto", "isic" (X.jpg -> X_segmentation.png) or "same"
    normalization: str = "zscore"  # "zscore" (train-pool statistics) or "unit" (/255)
    augment: bool = True
    pool_size: int = 0  # use only the first N training images (0 = all)
    synthetic_counts: tuple = (240, 40, 40)  # train/val/test images `make-synthetic` writes
    synthetic_size: int = 128  # side of the synthetic images on disk
    # --- model
    base_filters: int = 8
    depth: int = 4
    dropout: float = 0.5
    loss: str = "dice"  # "dice", "bce" or "bce_dice"
    ds_weights: tuple = (0.6, 0.3, 0.1)
    side_upsampling: str = "nearest"  # side-head logits: "nearest" (reference) or "bilinear" (pre-issue-8 variant)
    dropout_at: str = "bottleneck"  # "bottleneck" (reference) or "bottleneck+deepest" (also the deepest encoder block)
    norm: str = "none"  # U-Net normalization after each conv: "none" (reference), "batch" or "instance"
    batch_dice: bool = False  # soft Dice over the whole batch (nnU-Net's batch Dice) instead of per image
    # --- training
    learning_rate: float = 1e-3
    batch_size: int = 16
    nb_initial_epochs: int = 15
    nb_active_epochs: int = 8
    early_stop_patience: int = 0  # 0 = off
    validation_freq: int = 0  # validate every k epochs; 0 = auto (k = 1 up to 10 epochs, else ceil(epochs/10))
    lr_schedule: str = "none"  # "none", "plateau" or "cosine"
    # "auto" (bf16 on AVX512-BF16/AMX CPUs and GPUs of cc >= 8, fp16 on older GPUs), "off", "float16", "bfloat16"
    mixed_precision: str = "auto"
    lr_warmup_epochs: int = 0  # linear learning-rate warm-up over the first k epochs of each round (0 = off)
    foreground_oversample: float = 0.0  # share of each batch drawn from images with foreground (0 = plain shuffle)
    collapse_floor: float = 0.01  # val Dice below this for COLLAPSE_PATIENCE epochs, with foreground in the
    collapse_patience: int = 5  # training masks, stops the round as collapsed (0 = off)
    jit_compile: str = "auto"  # XLA: "auto" (on with a GPU, off on CPU where it is slower), "on", "off"
    distribute: str = "auto"  # "auto", "none", "mirrored" or "multiworker"
    seed: int = 0
    # --- active learning
    nb_labeled: int = 40
    nb_iterations: int = 3
    nb_next_sample: int = 20
    query_strategy: str = "dsal"
    pseudo_policy: str = "auto"  # "auto" = the strategy's own (CEAL: "ceal", others: "confidence")
    selection: str = "auto"  # "rank" (top-n), "histogram" (CEAL bins), "diverse", "power", "auto" (strategy's own)
    diverse_factor: int = 3  # "diverse": k-center greedy over the DIVERSE_FACTOR * n top candidates
    power_beta_start: float = 1.0  # "power": draw with p ~ rank-score**beta, beta from START (round 1) ...
    power_beta_end: float = 4.0  # ... to END (last round), linearly
    ds_ascend: bool = True  # reference meaning: True = least agreeing first (DSAL); False = ablation
    deterministic: bool = True  # seeds + tf op determinism: reruns give identical weights and pools
    conf_thres: bool = True  # confidence-histogram filter on pseudo-label candidates
    pseudo_epoch: int = 2
    nb_pseudo_initial: int = 20
    pseudo_rate: int = 20
    pseudo_min_foreground: float = 0.0  # weak labeler skips candidates predicting less foreground (0 = reference)
    use_crf: bool = False
    use_crf_thres: float = 0.98
    mc_passes: int = 20
    nb_ensemble: int = 5
    # --- noisy-teacher trainers
    trainer: str = "standard"  # dsal_tf/trainers/: standard, uniform, rgs, rgm, rgsm, mwnet, mcpm, pnt, int, pint
    rgs_query: bool = False
    rgs_lambda: float = -1.0  # -1 -> from trainer (rgs 1.0, rgm 0.0, rgsm 0.5)
    reweight_loss: str = "bce_dice"  # per-sample loss of the re-weighting trainers (METHODS.md 3); "run" = LOSS
    meta_size: int = 0  # clean set of the weighting trainers: 0 = every oracle label, N = a seeded N of them
    meta_lr: float = 1e-3  # mwnet/mcpm: Adam on the meta net (weight decay 1e-4)
    ema_decay: float = 0.99  # pnt/int/pint: EMA teacher
    teacher_passes: int = 8  # pnt/int/pint: perturbed teacher passes T
    teacher_noise: float = 0.1  # pnt/int/pint: Gaussian input noise sigma (normalised units)
    pint_tau: float = 0.34657359027997264  # pnt/pint: constant pixel-uncertainty threshold (0.5 ln 2)
    pint_warmup: float = 0.2  # pnt/int/pint: share of the steps trained plainly before any gating
    # --- BoostMIS (query and trainer `boostmis`)
    boostmis_xi: float = 10.0  # VAT power-iteration step xi
    boostmis_eps: float = 1.0  # VAT perturbation size eps (normalised units)
    boostmis_knn: int = 10  # density: mean cosine similarity to the k nearest neighbours
    boostmis_tau: float = 0.95  # confident pixel: max(p, 1-p) >= tau; taken image: that share >= tau
    boostmis_threshold: str = "global"  # pseudo-label cutoff: "global" eps_t (authors' code) or "per_class" (floored)
    # --- the strong labeler (oracle) and when to stop
    oracle: str = "simulated"  # "simulated" (masks on disk are revealed) or "files" (a person draws them)
    initial_selection: str = "auto"  # first labels: "random", "kcenter" (spread over the pool), "auto"
    stop_budget: int = 0  # stop once this many expert labels are used (0 = off)
    stop_patience: int = 0  # stop when val Dice has not improved by STOP_MIN_DELTA for k rounds (0 = off)
    stop_min_delta: float = 0.001
    stop_agreement: float = 0.0  # stop when the pool's mean side-head agreement reaches this (0 = off)
    tensorboard: bool = False  # Keras TensorBoard logs per round under exp/<name>/tensorboard/
    # --- run control
    resume_on: bool = True
    nb_overlays: int = 6
    progress: bool = True
    plan_budget_minutes: float = 15.0  # PRESET "auto": the run-time budget the plan fits

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
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


FIELDS = {f.name: f for f in dataclasses.fields(Config)}

# ------------------------------------------------------------------- presets
PRESETS: dict[str, dict[str, Any]] = {
    # Embedded synthetic data; the whole loop finishes on 2 CPU cores in a few minutes.
    "demo": {},
    # Planned from the data on first use (`dsal plan`, dsal_tf/plan.py), stored in the run folder.
    "auto": {},
    # The paper's ISIC 2017 protocol (METHODS.md section 1).
    "isic2017": dict(
        img_rows=192, img_cols=240, color="rgb", base_filters=32, dropout=0.5, loss="dice",
        learning_rate=1e-5, batch_size=32, nb_initial_epochs=15, nb_active_epochs=10,
        nb_labeled=600, nb_iterations=10, nb_next_sample=35, pseudo_epoch=5,
        nb_pseudo_initial=20, pseudo_rate=20, pool_size=1600, normalization="zscore",
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
    "loss": ("dice", "bce", "bce_dice"),
    "lr_schedule": ("none", "plateau", "cosine"),
    "distribute": ("auto", "none", "mirrored", "multiworker"),
    "selection": ("auto", "rank", "histogram", "diverse", "power"),
    "side_upsampling": ("nearest", "bilinear"),
    "dropout_at": ("bottleneck", "bottleneck+deepest"),
    "norm": ("none", "batch", "instance"),
    "mixed_precision": ("auto", "off", "float16", "bfloat16"),
    "reweight_loss": ("bce_dice", "run", "dice", "bce"),
    "boostmis_threshold": ("global", "per_class"),
    "jit_compile": ("auto", "on", "off"),
    "oracle": ("simulated", "files"),
    "initial_selection": ("auto", "random", "kcenter"),
    "preset": tuple(PRESETS),
}
_POSITIVE = {
    "img_rows", "img_cols", "base_filters", "depth", "batch_size", "nb_labeled",
    "nb_next_sample", "mc_passes", "nb_ensemble", "synthetic_size", "diverse_factor",
}
_NON_NEGATIVE = {
    "nb_initial_epochs", "nb_active_epochs", "early_stop_patience", "validation_freq", "nb_iterations",
    "pseudo_epoch", "nb_pseudo_initial", "pseudo_rate", "pool_size", "nb_overlays",
    "stop_budget", "stop_patience", "stop_min_delta", "lr_warmup_epochs", "collapse_patience",
    "power_beta_start", "power_beta_end", "pint_tau",
}


def _suggest(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _coerce(name: str, value: Any, source: str) -> Any:
    default = FIELDS[name].default
    kind = type(default)
    where = f"{name.upper()} in {source}"
    try:
        if kind is bool:
            if isinstance(value, str):
                low = value.strip().lower()
                if low not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                    raise ValueError
                return low in ("1", "true", "yes", "on")
            if not isinstance(value, (bool, int)):
                raise ValueError
            return bool(value)
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if name == "mixed_precision" and isinstance(value, bool):  # the old boolean switch
            return "float16" if value else "off"
        if kind is tuple:
            if isinstance(value, str):
                value = [v for v in value.replace("(", "").replace(")", "").split(",") if v.strip()]
            inner = type(default[0])
            return tuple(inner(v) for v in value)
        return str(value)
    except (TypeError, ValueError):
        raise DsalError(
            f"{where} = {value!r} is not a valid {kind.__name__}; use e.g. {default!r}"
        ) from None


def _check(cfg: Config, source: str) -> None:
    for name, options in _CHOICES.items():
        value = getattr(cfg, name)
        if value not in options:
            raise DsalError(
                f"{name.upper()} in {source} = {value!r} is not one of {list(options)}"
                + _suggest(str(value), options)
            )
    for name in _POSITIVE:
        if getattr(cfg, name) <= 0:
            raise DsalError(f"{name.upper()} in {source} must be > 0, got {getattr(cfg, name)}")
    for name in _NON_NEGATIVE:
        if getattr(cfg, name) < 0:
            raise DsalError(f"{name.upper()} in {source} must be >= 0, got {getattr(cfg, name)}")
    if cfg.depth < 3:
        raise DsalError(f"DEPTH in {source} must be >= 3 (the side heads sit on the 1/4 and 1/2 blocks)")
    if not 0.0 <= cfg.dropout < 1.0:
        raise DsalError(f"DROPOUT in {source} must be in [0, 1), got {cfg.dropout}")
    if cfg.plan_budget_minutes <= 0:
        raise DsalError(f"PLAN_BUDGET_MINUTES in {source} must be > 0, got {cfg.plan_budget_minutes}")
    if cfg.learning_rate <= 0:
        raise DsalError(f"LEARNING_RATE in {source} must be > 0, got {cfg.learning_rate}")
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
    if not 0.0 <= cfg.stop_agreement <= 1.0:
        raise DsalError(f"STOP_AGREEMENT in {source} must be in [0, 1] (0 = off), got {cfg.stop_agreement}")
    if not cfg.rgs_lambda == -1.0 and not 0.0 <= cfg.rgs_lambda <= 1.0:
        raise DsalError(f"RGS_LAMBDA in {source} must be in [0, 1] (or -1 for the default)")
    if cfg.meta_size < 0 or cfg.teacher_passes < 1 or cfg.teacher_noise < 0 or cfg.meta_lr <= 0:
        raise DsalError(f"META_SIZE >= 0, TEACHER_PASSES >= 1, TEACHER_NOISE >= 0 and META_LR > 0 in {source}; "
                        f"got {cfg.meta_size}, {cfg.teacher_passes}, {cfg.teacher_noise}, {cfg.meta_lr}")
    if cfg.boostmis_xi <= 0 or cfg.boostmis_eps <= 0 or cfg.boostmis_knn < 1 or not 0.5 <= cfg.boostmis_tau < 1:
        raise DsalError(f"BOOSTMIS_XI > 0, BOOSTMIS_EPS > 0, BOOSTMIS_KNN >= 1 and BOOSTMIS_TAU in [0.5, 1) "
                        f"in {source}")
    for name in ("pseudo_min_foreground", "foreground_oversample", "pint_warmup", "collapse_floor"):
        if not 0.0 <= getattr(cfg, name) < 1.0:
            raise DsalError(f"{name.upper()} in {source} must be in [0, 1), got {getattr(cfg, name)}")
    if not 0.0 <= cfg.ema_decay < 1.0:
        raise DsalError(f"EMA_DECAY in {source} must be in [0, 1), got {cfg.ema_decay}")
    from .strategies import PSEUDO_POLICIES, QUERY_STRATEGIES
    from .trainers import TRAINERS

    for name, registry in (("query_strategy", QUERY_STRATEGIES), ("pseudo_policy", PSEUDO_POLICIES),
                           ("trainer", TRAINERS)):
        value = getattr(cfg, name)
        if value not in registry and not (name == "pseudo_policy" and value == "auto"):
            raise DsalError(
                f"{name.upper()} in {source} = {value!r} is not one of {sorted(registry)}"
                + _suggest(value, registry)
            )


def resolve(values: dict[str, Any], source: str = "constants.py") -> Config:
    """Build a validated `Config` from `{name: value}` (names in any case)."""
    merged: dict[str, Any] = {}
    for key, value in values.items():
        name = key.lower()
        if name not in FIELDS:
            raise DsalError(
                f"unknown constant {key.upper()} in {source}"
                + _suggest(name.upper(), [f.upper() for f in FIELDS])
                + "; see the constants table in README.md"
            )
        merged[name] = _coerce(name, value, source)
    preset = merged.get("preset", Config.preset)
    if preset not in PRESETS:
        raise DsalError(
            f"PRESET in {source} = {preset!r} is not one of {list(PRESETS)}" + _suggest(preset, PRESETS)
        )
    cfg = Config(**{**PRESETS[preset], **merged})
    _check(cfg, source)
    return cfg


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
