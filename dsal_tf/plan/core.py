"""The steps the image and the volume planners share (`images.py`, `volumes.py`), and their constants.

The active-learning schedule (`schedule`), the budget rule (`predict_seconds`, `choose`, `fit_epochs`, with
`Batches` counting the batches of each pass), the memory the batch-size rules plan against (`activation_bytes`,
`memory_bytes`), the learning probe's core and verdict (`_probe_fit`, `probe_verdict`), what every step of a plan
shares (`Planning`) and the steps themselves: `search_candidates` (`measure_candidate`), `choose_learning` and
`fit_choice`, run by `decide`; `training_settings` and `protocol_reasons` give the settings and reasons both
planners plan alike. Imports neither planner: each hands its own candidates in (`Planning.make`).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..config import Config
from ..errors import DsalError

SPLITS = ("train", "val", "test")
SPECK_FRACTION = 0.01  # a component under 1% of its mask's largest one is a speck (annotation noise), not a structure
FILTERS = (16, 32, 8)  # base-filter ladder; 8 only when no 16-filter candidate fits the budget
SMALL_FOREGROUND = 0.05  # mean foreground fraction below which the foreground counts as small
MEMORY_SHARE = 0.25
# The active-learning schedule, scaled from `isic2017-cpu` (1600 pool: 600 initial, 5 rounds of 70,
# pseudo labels from round 3, 40 + 40(t-3)) by the pool size.
SCHEDULE_REFERENCE = dict(pool=1600, nb_labeled=600, nb_next_sample=70, nb_pseudo_initial=40, pseudo_rate=40)
NB_ITERATIONS, PSEUDO_EPOCH = 5, 3
MIN_INITIAL_STEPS = 150  # cutting epochs to fit a budget stops here
INITIAL_STEPS, ROUND_STEPS = 450, 200  # optimizer steps of the initial model and round 1 (isic2017-cpu: 12, 5 epochs)
PROBE_STEPS = 100  # optimizer steps of the learning probe
PROBE_MIN_RISE = 0.02  # the probe's training soft Dice must rise by this much, or the candidate is refused
MAX_PROBES = 4  # probes per plan; none of them learning is an error
# Planning counts against the budget, and the probes together take at most PROBE_SHARE of it: each probe gets half
# of what is left of that share. Fewer than MIN_PROBE_STEPS steps say little about learning (and the step time
# needs 10 steps of warm-up), so a probe that short moves to the cheapest candidate on the same side of the size
# rule, and when that is short too the plan is not probed (a warning says so). Before (issue 25), a 15-minute plan
# probed 100 steps of a 7-s step on 80 small images and was still planning after 10 minutes.
PROBE_SHARE = 0.1
MIN_PROBE_STEPS = 30
# Kept back for the prediction's error: a 12-minute plan on covid_ct predicted 11.7 minutes in all and took 11.99
# (training 2% slower than predicted; bench/results/plan_budget.md), too close to the budget.
BUDGET_MARGIN = 0.05
# Tried in order on the would-be choice (a recipe touching a setting the user fixed is skipped); the second is
# nnU-Net's. Probe on covid_ct (issue 20), 128x128, 8 filters, 60 steps: per-image soft Dice 0.023 -> 0.0001
# (all-background), bce_dice + batch Dice 0.023 -> 0.106; on the demo set the first learns.
RECIPES: tuple[dict, ...] = ({}, {"loss": "bce_dice", "batch_dice": True})


# ------------------------------------------------------------------------------------ schedule
def schedule(n_pool: int, batch_size: int, epoch_steps: Callable[[int], int] | None = None) -> dict[str, int]:
    """The active-learning schedule and epochs for a pool of `n_pool` images (or volumes).

    Labels scale with the pool like `isic2017-cpu`; epochs give the initial model about
    `INITIAL_STEPS` optimizer steps and round 1 about `ROUND_STEPS` (isic2017-cpu: 12 and 5).
    `epoch_steps(n)`: optimizer steps of an epoch over n labelled items (default ceil(n / batch_size),
    one pass over the images; a volume epoch is `STEPS_PER_EPOCH` patch steps)."""
    ref = SCHEDULE_REFERENCE
    steps = epoch_steps or (lambda n: math.ceil(n / batch_size))

    def scaled(k):
        return max(1, round(n_pool * ref[k] / ref["pool"]))

    nb_labeled = min(n_pool, scaled("nb_labeled"))
    q = scaled("nb_next_sample")
    initial = min(50, max(5, math.ceil(INITIAL_STEPS / steps(nb_labeled))))
    active = min(30, max(2, math.ceil(ROUND_STEPS / steps(nb_labeled + q))))
    return dict(nb_labeled=nb_labeled, nb_iterations=NB_ITERATIONS, nb_next_sample=q, pseudo_epoch=PSEUDO_EPOCH,
                nb_pseudo_initial=scaled("nb_pseudo_initial"), pseudo_rate=scaled("pseudo_rate"),
                nb_initial_epochs=initial, nb_active_epochs=active)


# ------------------------------------------------------------------------------------ budget rule
Batches = Callable[[Config, str, int], int]


def image_batches(cfg: Config, kind: str, n: int) -> int:
    """Batches of a pass over `n` images, whatever its `kind` ("train": an epoch, "val", "score"):
    ceil(n / BATCH_SIZE)."""
    return math.ceil(n / cfg.batch_size)


def predict_seconds(cfg: Config, timing: dict, n_pool: int, n_val: int, load_s: float = 0.0,
                    batches: Batches | None = None) -> dict[str, float]:
    """Predicted run time of `cfg` from measured per-batch times (seconds).

    `timing`: `train_step_s`, `eval_step_s` (a validation batch), `score_step_s` (a pool-scoring
    batch), `epoch_overhead_s` (per epoch: checkpoint, logs), `trace_s` (once per run) and, where
    measured, `round_trace_s` (once per scoring pass: a volume space traces its windows each round).
    `batches(cfg, kind, n)`: batches of a pass of `kind` ("train": one epoch, "val", "score") over
    n items; default `image_batches`. Initial model: epochs x (training + validation batches); each
    round r: one scoring pass over the unlabelled pool, then epochs over the oracle + pseudo labels;
    plus data loading and tracing."""
    count = batches or image_batches
    val_batches = count(cfg, "val", n_val)

    def fit_s(n_train, epochs):
        return epochs * (count(cfg, "train", n_train) * timing["train_step_s"] + val_batches * timing["eval_step_s"]
                         + timing["epoch_overhead_s"])

    n_lab = min(cfg.nb_labeled, n_pool)
    train = fit_s(n_lab, cfg.nb_initial_epochs)
    score = 0.0
    for r in range(1, cfg.nb_iterations + 1):
        unl = n_pool - n_lab
        score += count(cfg, "score", unl) * timing["score_step_s"] + (timing.get("round_trace_s", 0.0) if unl else 0.0)
        n_lab = min(n_pool, n_lab + cfg.nb_next_sample)
        n_pseudo = min(cfg.nb_pseudo(r), max(0, unl - cfg.nb_next_sample))
        train += fit_s(n_lab + n_pseudo, cfg.nb_active_epochs)
    total = load_s + timing["trace_s"] + train + score
    return dict(load_s=round(load_s, 2), trace_s=round(timing["trace_s"], 2), train_s=round(train, 2),
                score_s=round(score, 2), total_s=round(total, 2))


def input_size(c: dict) -> tuple[int, ...]:
    """A candidate's (or ladder size's) input: (rows, cols) of an image, or a volume's patch (D, H, W)."""
    return tuple(int(n) for n in c["patch_size"]) if "patch_size" in c else (c["img_rows"], c["img_cols"])


def preference(c: dict) -> tuple:
    """Larger is preferred: meets the size rule, >= 16 base filters, more pixels (voxels), more filters."""
    return (c["meets_size_rule"], c["base_filters"] >= 16, math.prod(input_size(c)), c["base_filters"])


def choose(candidates: list[dict], budget_s: float) -> tuple[dict, str]:
    """The most preferred measured candidate whose predicted run time fits `budget_s`; if none
    fits, the fastest candidate that meets the size rule (or the fastest of all), with the reason."""
    measured = [c for c in candidates if c.get("predicted_s") is not None]
    if not measured:
        raise DsalError("no candidate could be measured; check that TensorFlow runs on this machine")
    fits = [c for c in measured if c["predicted_s"] <= budget_s]
    if fits:
        best = max(fits, key=preference)
        why = (f"largest candidate whose predicted run time ({best['predicted_s'] / 60:.1f} min) fits the "
               f"{budget_s / 60:.1f} minutes the budget leaves after planning (preferring the size rule, >= 16 base "
               "filters, then more pixels, then more filters)")
        if not best["meets_size_rule"]:
            why += "; WARNING: no candidate meeting the size rule fits, structures may vanish"
        return best, why
    pool = [c for c in measured if c["meets_size_rule"]] or measured
    best = min(pool, key=lambda c: c["predicted_s"])
    return best, (f"no candidate fits the {budget_s / 60:.1f} minutes the budget leaves after planning; the "
                  "fastest one"
                  f"{' meeting the size rule' if best['meets_size_rule'] else ''} "
                  f"({best['predicted_s'] / 60:.1f} min) with epochs cut to fit")


def fit_epochs(cfg: Config, timing: dict, n_pool: int, n_val: int, load_s: float, budget_s: float,
               batches: Batches | None = None) -> Config:
    """Scale both epoch counts down until the prediction fits, but never below `MIN_INITIAL_STEPS`
    optimizer steps for the initial model and 1 epoch per round: fewer and it learns nothing
    (measured: 3 epochs at 144x144 on the small-lesion set left val Dice at 0.01)."""
    count = batches or image_batches
    floor = min(cfg.nb_initial_epochs, math.ceil(MIN_INITIAL_STEPS / count(cfg, "train", min(cfg.nb_labeled, n_pool))))
    for f in np.linspace(1.0, 0.05, 40):
        c = cfg.replace(nb_initial_epochs=max(floor, int(cfg.nb_initial_epochs * f)),
                        nb_active_epochs=max(1, int(cfg.nb_active_epochs * f)))
        if predict_seconds(c, timing, n_pool, n_val, load_s, batches)["total_s"] <= budget_s:
            return c
    return c


# ------------------------------------------------------------------------------------ measured steps
def activation_bytes(cfg: Config, input_shape: tuple | None = None) -> int:
    """Bytes of float32 activations one image (or one `input_shape` patch) keeps for backprop (outputs
    of every layer, x2 for their gradients); the basis of the batch-size rule."""
    from ..model import unet_for

    m = unet_for(cfg, input_shape)
    elems = sum(int(np.prod(layer.output.shape[1:])) for layer in m.layers)
    return 2 * 4 * elems


def memory_bytes() -> int:
    """Memory the planner may plan against: the GPU's (nvidia-smi) if one is visible, else RAM."""
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        import subprocess

        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=10).stdout
            return int(min(int(v) for v in out.split())) * 2**20
        except (OSError, ValueError, subprocess.SubprocessError):
            return 16 * 2**30
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _timed(fn: Callable[[], Any]) -> float:
    """Seconds `fn()` takes."""
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def probe_verdict(before: float, after: float, steps: int, min_rise: float = PROBE_MIN_RISE) -> tuple[bool, str]:
    """Whether a probe learned (its training soft Dice rose by at least `min_rise`), and why."""
    if not (math.isfinite(before) and math.isfinite(after)):
        return False, f"the training soft Dice became {after} within {steps} steps"
    change = f"training soft Dice {before:.3f} -> {after:.3f} in {steps} steps"
    if after - before >= min_rise:
        return True, change
    what = "fell towards all-background" if after < before else "did not rise"
    return False, f"{change}: it {what} (a rise of {min_rise:g} is needed)"


def _probe_fit(cfg: Config, model, ds, steps: int, y_eval: np.ndarray, predict: Callable[[], np.ndarray],
               warmup_epoch_steps: int) -> dict[str, Any]:
    """The probe's core, for images and volumes: the soft Dice of `predict()` (the main head's probabilities of
    the items whose masks are `y_eval`, one ratio over all their pixels) before and after `steps` steps of
    `model.fit` on `ds` (with the run's warm-up, `warmup_epoch_steps` steps an epoch), and the mean step time
    after the first 10 steps."""
    import keras

    from .. import train
    from ..losses import SMOOTH

    y = np.asarray(y_eval, np.float64)

    def soft_dice() -> float:
        p = np.asarray(predict(), np.float64).reshape(y.shape)
        return float((2 * (y * p).sum() + SMOOTH) / (y.sum() + p.sum() + SMOOTH))

    ends: list[float] = []
    clock = keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: ends.append(time.perf_counter()))
    callbacks = [clock]
    if cfg.lr_warmup_epochs:
        callbacks.insert(0, train.WarmUp(cfg.learning_rate, cfg.lr_warmup_epochs, steps_per_epoch=warmup_epoch_steps))
    t = time.perf_counter()
    before = soft_dice()
    model.fit(ds, steps_per_epoch=steps, epochs=1, verbose=0, shuffle=False, callbacks=callbacks)
    after = soft_dice()
    step_s = float(np.mean(np.diff(ends[10:]))) if len(ends) > 11 else None
    return dict(steps=steps, soft_dice_before=round(before, 4), soft_dice_after=round(after, 4),
                train_step_s=None if step_s is None else round(step_s, 4), probe_s=round(time.perf_counter() - t, 1))


# ------------------------------------------------------------------------------------ the plan
def training_settings(fg: float | None) -> dict[str, tuple[Any, str]]:
    """The loss and optimizer settings images and volumes share, from the mean foreground fraction `fg`."""
    small = fg is not None and fg < SMALL_FOREGROUND
    return {
        # Measured on the small-lesion set (0.5% foreground): Dice + BCE drove every head to all-background
        # within 2 epochs (loss frozen at 1.075, val Dice 0.01, at 128x128 and 144x144); soft Dice learns.
        # That BCE clipped at 1e-7 (no gradient once saturated; issue 20 replaced it). The learning probe
        # checks the choice on every plan and falls back to RECIPES.
        "loss": ("dice", f"mean foreground fraction {fg}"
                 + (f" < {SMALL_FOREGROUND} (small foreground): soft Dice, which the class imbalance does not swamp; "
                    "Dice + BCE collapsed to all-background here" if small else ": soft Dice")),
        "batch_dice": (False, "soft Dice per image, as the reference"),
        "learning_rate": (1e-3, "Adam 1e-3, as isic2017-cpu (1e-5 of the paper is for 15 epochs of 32-filter nets)"),
        "pool_size": (0, "the whole pool"),
    }


@dataclass(frozen=True)
class Planning:
    """What the steps of `make_plan` share: the fingerprint, the settings the user fixed (lower-case keys),
    the settings from the fingerprint alone, the pool and validation sizes, the memory planned against,
    the predicted data-loading seconds, the budget in seconds, whether the run is full supervision, how many
    batches each pass has (`predict_seconds`; None: images), how a ladder size becomes a candidate
    (`images.candidate`, or `volumes.volume_candidate`: each planner sets its own) and when planning started
    (`time.perf_counter()`: planning counts against the budget, `left_s`)."""

    fp: dict
    fixed: dict[str, Any]
    base: dict[str, Any]
    n_pool: int
    n_val: int
    memory: int
    load_s: float
    budget_s: float
    full_supervision: bool = False
    batches: Batches | None = None
    make: Callable[..., tuple[Config, dict]] | None = None
    started: float = field(default_factory=time.perf_counter)

    def left_s(self, reserve: float = 0.0) -> float:
        """Seconds of the budget left for the run: the budget less its `BUDGET_MARGIN`, the planning so far and
        `reserve`."""
        return (1.0 - BUDGET_MARGIN) * self.budget_s - (time.perf_counter() - self.started) - reserve


def pool_counts(data_path: str | Path, fp: dict, fixed: dict[str, Any], items: str) -> tuple[int, int]:
    """(pool, validation) sizes from the fingerprint, POOL_SIZE capping the pool; no validation `items` is an error."""
    n_pool, n_val = fp["counts"]["train"], fp["counts"]["val"]
    if fixed.get("pool_size"):
        n_pool = min(n_pool, int(fixed["pool_size"]))
    if n_val == 0:
        raise DsalError(f"no validation {items} in {Path(data_path) / 'valImg'}; add some (checkpoints use them)")
    return n_pool, n_val


def candidate_key(c: dict) -> tuple:
    """A candidate's identity: (img_rows, img_cols, base_filters, batch_size), or (*patch_size, ...) of a volume."""
    return (*input_size(c), c["base_filters"], c["batch_size"])


def key_label(key: tuple) -> str:
    """`128x128 f16` or `32x48x32 f16`: a candidate key as logs and refusals name it."""
    return "x".join(str(n) for n in key[:-2]) + f" f{key[-2]}"


def as_protocol(plan: Planning, cfg: Config) -> Config:
    """`cfg` as the protocol that will run: with full supervision what `dsal run --full-supervision` trains
    (the whole pool, the same total epochs)."""
    if not plan.full_supervision:
        return cfg
    from ..compare import full_supervision_config

    return full_supervision_config(cfg).replace(exp_name=plan.fixed.get("exp_name", ""))


def measure_candidate(plan: Planning, cfg: Config, row: dict, measure: Callable[[Config], dict],
                      log: Callable[[str], None] = print) -> dict:
    """`row` with the measured per-step times of `cfg` and its predicted run time."""
    t = time.perf_counter()
    timing = measure(cfg)
    row.update(timing, measure_s=round(time.perf_counter() - t, 1))
    pred = predict_seconds(cfg, timing, plan.n_pool, plan.n_val, plan.load_s, plan.batches)
    row.update(predicted=pred, predicted_s=pred["total_s"])
    log(f"  {key_label(candidate_key(row))} b{cfg.batch_size}: "
        f"train {timing['train_step_s'] * 1000:.0f} ms/step, predicted {pred['total_s'] / 60:.1f} min")
    return row


def search_candidates(plan: Planning, ladder: list[dict], measure: Callable[[Config], dict],
                      log: Callable[[str], None] = print,
                      reserve: float = 0.0) -> tuple[list[dict], dict[tuple, Config]]:
    """Measure candidates: the size ladder upwards (from the smallest size meeting the size rule) at each
    filter count, stopping at the first size over what is left of the budget (`plan.left_s(reserve)`); costs
    grow with size and filters, so nothing skipped could fit. 32 filters only at sizes where 16 fit; 8 only if
    no 16 fits. Returns the candidate rows in the order measured and their settings by `candidate_key`."""
    rows: dict[tuple, dict] = {}
    configs: dict[tuple, Config] = {}
    make = plan.make
    allowed = [s for s in ladder if s["meets_size_rule"]] or ladder[-1:]
    fit16: list[dict] = []
    for filters in FILTERS:
        sizes = allowed if filters != 32 else [s for s in allowed if any(_same(s, f) for f in fit16)]
        if filters == 8 and fit16:
            break
        for size in sizes:
            cfg, row = make(plan, size, filters)
            key = candidate_key(row)
            if key not in rows:
                rows[key], configs[key] = measure_candidate(plan, cfg, row, measure, log), cfg
            if rows[key]["predicted_s"] > plan.left_s(reserve):
                break
            if filters == 16:
                fit16.append(size)
    return list(rows.values()), configs


def fit_choice(plan: Planning, cfg: Config, best: dict, learned: dict | None) -> tuple[Config, dict[str, float]]:
    """The chosen settings with epochs cut to what planning left of the budget where needed (unless the user fixed
    them), and their predicted run time. The learning probe's warm step time corrects the measured one: the
    choice's training step is scaled by the probed candidate's ratio of probed to measured step time (the choice's
    own probe time when it was probed itself)."""
    timing = dict(best)
    if learned is not None and learned.get("step_margin"):
        timing["train_step_s"] = best["train_step_s"] * learned["step_margin"]
    budget_s = plan.left_s()
    over = predict_seconds(cfg, timing, plan.n_pool, plan.n_val, plan.load_s, plan.batches)["total_s"] > budget_s
    if over and not {"nb_initial_epochs", "nb_active_epochs"} & set(plan.fixed):
        cfg = fit_epochs(cfg, timing, plan.n_pool, plan.n_val, plan.load_s, budget_s, plan.batches)
    return cfg, predict_seconds(cfg, timing, plan.n_pool, plan.n_val, plan.load_s, plan.batches)


def protocol_reasons(plan: Planning, reasons: dict[str, str], best: dict, recipe: dict, learned: dict | None,
                     planned: tuple[str, ...]) -> dict[str, str]:
    """`reasons` completed with what images and volumes share: the full-supervision protocol, the learning
    probe's verdict on the loss, and "set by the user" for each of the `planned` settings the user fixed."""
    if plan.full_supervision:
        reasons.update(nb_labeled="full supervision: the whole pool",
                       nb_initial_epochs=reasons["nb_initial_epochs"] + "; full supervision trains the initial "
                       "epochs plus every round's on the whole pool, as `--full-supervision` does")
    if best.get("not_probed"):
        reasons["loss"] += f"; not probed: {best['not_probed']}"
    if learned is not None:
        verdict = best["probes"][0]["reason"]
        reasons["loss"] = reasons["batch_dice"] = (
            f"{reasons['loss']}; the learning probe: {verdict}" if not recipe else
            f"the learning probe refused the planned loss ({verdict}); "
            + ", ".join(f"{k.upper()}={v!r}" for k, v in recipe.items()) + f" learned ({learned['reason']})")
    for k in plan.fixed:
        if k in planned:
            reasons[k] = "set by the user"
    return reasons


@dataclass(frozen=True)
class Decision:
    """What the shared steps decide (`decide`): the measured candidate rows and their settings, the recipes the
    probe may try, the chosen candidate with its reason, recipe and probe result, and its final settings and
    predicted run time."""

    rows: list[dict]
    configs: dict[tuple, Config]
    recipes: list[dict]
    best: dict
    reason: str
    recipe: dict
    learned: dict | None
    cfg: Config
    predicted: dict[str, float]

    def probe_summary(self, probed: bool) -> dict | None:
        """The plan's `probe` entry (None when nothing was probed)."""
        if not probed:
            return None
        return {"max_steps": PROBE_STEPS, "min_steps": MIN_PROBE_STEPS, "budget_share": PROBE_SHARE,
                "min_rise": PROBE_MIN_RISE, "recipes": self.recipes, "chosen": self.learned,
                "not_probed": self.best.get("not_probed"),
                "train_step_s_from": "probe" if self.learned and self.learned.get("step_margin") else "measured steps"}

    def warnings(self, plan: Planning, budget_minutes: float) -> list[str]:
        """What the user should know about the budget and the probe."""
        out = []
        if self.predicted["total_s"] > plan.left_s():
            spent = time.perf_counter() - plan.started
            out.append(f"nothing fits the {budget_minutes:g}-minute budget on this machine now: the run needs "
                       f"{self.predicted['total_s'] / 60:.1f} min after {spent / 60:.1f} min of planning; raise "
                       "--budget-minutes (or PLAN_BUDGET_MINUTES)")
        if self.best.get("not_probed"):
            out.append(f"the learning probe did not run ({self.best['not_probed']}): the loss is not checked; a larger "
                       "budget checks it")
        return out


def decide(plan: Planning, ladder: list[dict], measure: Callable[[Config], dict], probe: Callable | None,
           log: Callable[[str], None] = print) -> Decision:
    """The steps images and volumes share: `search_candidates` over the ladder, `choose_learning` with the
    recipes the user's settings allow, and `fit_choice`."""
    reserve = PROBE_SHARE * plan.budget_s if probe is not None else 0.0
    rows, configs = search_candidates(plan, ladder, measure, log, reserve)
    recipes = [r for r in RECIPES if not set(r) & set(plan.fixed)]
    best, reason, recipe, learned = choose_learning(plan, rows, configs, probe, recipes, log, reserve)
    cfg, predicted = fit_choice(plan, configs[candidate_key(best)].replace(**recipe), best, learned)
    return Decision(rows, configs, recipes, best, reason, recipe, learned, cfg, predicted)


def probe_steps(row: dict, allowance_s: float) -> int:
    """Training steps of a probe of the measured candidate `row` that fit `allowance_s` seconds: its warm-up
    (`trace_s`), then steps at its measured step time, with a fifth of the allowance kept for the probe's two
    scoring passes; `PROBE_STEPS` at most."""
    return max(0, min(PROBE_STEPS, int(0.8 * (allowance_s - row.get("trace_s", 0.0)) / row["train_step_s"])))


def probe_target(best: dict, rows: list[dict], allowance_s: float) -> tuple[dict, int] | None:
    """Where to probe `best` within `allowance_s`, and for how many steps: `best` itself if `MIN_PROBE_STEPS` fit,
    else the cheapest unrefused candidate on the same side of the size rule if they fit there, else None."""
    steps = probe_steps(best, allowance_s)
    if steps >= MIN_PROBE_STEPS:
        return best, steps
    same = [c for c in rows if "refused" not in c and c["meets_size_rule"] == best["meets_size_rule"]]
    cheap = min(same, key=lambda c: c["train_step_s"])
    steps = probe_steps(cheap, allowance_s)
    return (cheap, steps) if steps >= MIN_PROBE_STEPS else None


def choose_learning(plan: Planning, rows: list[dict], configs: dict[tuple, Config], probe: Callable | None,
                    recipes: list[dict], log: Callable[[str], None] = print,
                    reserve: float = 0.0) -> tuple[dict, str, dict, dict | None]:
    """`choose` within what is left of the budget after planning so far and the probes' `reserve`, then the
    learning probe `probe(cfg, steps)` on the choice, recipe by recipe, until one learns: returns (candidate,
    reason, recipe, probe result). A candidate none of whose recipes learns is marked `refused` with the reasons
    and the next preferred one is probed; `MAX_PROBES` in all. Each probe gets half of what is left of `reserve`
    (`probe_target`: the choice, or a cheaper stand-in; a stand-in's verdict on a recipe is reused, not probed
    again); when none fits, the choice and its first recipe not yet refused stay unprobed (`not_probed`). Without
    a probe: `choose` alone."""
    done: list[str] = []
    verdicts: dict[tuple, dict] = {}  # (probed candidate, recipe) -> probe result
    spent = 0.0
    while True:
        left = [c for c in rows if "refused" not in c]
        if not left or len(done) >= MAX_PROBES:
            raise DsalError(f"no planned candidate learned in the probe ({'; '.join(done)}); set LOSS=\"bce_dice\", "
                            "BATCH_DICE=True or NORM=\"instance\" with --set, or check the masks")
        best, reason = choose(left, plan.left_s(max(0.0, reserve - spent)))
        if probe is None:
            return best, reason, {}, None
        for recipe in recipes[:MAX_PROBES - len(done)]:
            target = probe_target(best, left, (reserve - spent) / 2)
            if target is None:  # the recipe not yet refused is taken unprobed
                best["not_probed"] = (f"{PROBE_SHARE:.0%} of the budget, {reserve / 60:.1f} min, leaves no room for "
                                      f"{MIN_PROBE_STEPS} probe steps"
                                      + (f"; {recipe} taken unprobed after the planned loss was refused"
                                         if best.get("probes") else ""))
                log(f"  probe skipped: {best['not_probed']}")
                return best, reason, recipe, None
            at, steps = target
            memo = (candidate_key(at), json.dumps(recipe, sort_keys=True))
            if memo not in verdicts:
                t = time.perf_counter()
                verdicts[memo] = probe(configs[candidate_key(at)].replace(**recipe), steps)
                spent += time.perf_counter() - t
            result = dict(verdicts[memo])
            if at is not best:
                result["probed_at"] = key_label(candidate_key(at))
            if result.get("train_step_s"):
                result["step_margin"] = round(result["train_step_s"] / at["train_step_s"], 4)
            ok, why = probe_verdict(result["soft_dice_before"], result["soft_dice_after"], result["steps"])
            best.setdefault("probes", []).append({"recipe": recipe, **result, "learned": ok, "reason": why})
            done.append(f"{key_label(candidate_key(best))} {recipe or 'as planned'}"
                        + (f" (probed at {result['probed_at']})" if "probed_at" in result else "") + f": {why}")
            log(f"  probe {done[-1]}")
            if ok:
                return best, reason, recipe, {**result, "reason": why}
        best["refused"] = "; ".join(f"{p['recipe'] or 'as planned'}: {p['reason']}" for p in best["probes"])


def _same(a: dict, b: dict) -> bool:
    return input_size(a) == input_size(b)
