"""Where the wall time of one whole run goes: `python main.py` + `python test.py` in one process.

    python bench/bench_walltime.py [--data ../shared/data/isic2017] [--preset isic2017-cpu] [--exp-dir exp]
                                   [--set KEY=VALUE ...] [--tag after]

Phases are timed by wrapping the product's own functions (nothing in the package changes): import,
decoding and caching (`load_splits`), model build/load, training steps (Keras batch callbacks; the
first step of every `fit` apart, as it holds the tracing), validation, checkpoint writes, the rest
of each `fit`, scoring (`score_pool`), evaluation (`evaluate_run`), and whatever is left. Each is
reported as a share of the wall time. Run it alone on the machine. Writes
`<exp-dir>/walltime/walltime-<preset>[-<tag>][-<set>...].md` and joins every such part into
bench/results/walltime.md; each part names the precision the run resolved to (`MIXED_PRECISION`),
its validation schedule and the commit.
"""

from __future__ import annotations

import time

T0 = time.perf_counter()

import argparse  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
from collections import defaultdict  # noqa: E402
from pathlib import Path  # noqa: E402

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import keras  # noqa: E402
import tensorflow as tf  # noqa: E402, F401

from dsal_tf import active, evaluate, space, train  # noqa: E402
from dsal_tf.config import load_config  # noqa: E402

IMPORT_S = time.perf_counter() - T0
RESULTS = Path(os.environ.get("RESULTS_DIR") or Path(__file__).resolve().parent / "results")
SPENT: dict[str, float] = defaultdict(float)


OPEN: list[float] = []  # per timed call in progress: the seconds of the timed calls inside it


def timed(owner, name: str, phase: str) -> None:
    """Replace `owner.name` by a wrapper that adds its run time to `SPENT[phase]`, less the time of timed calls
    inside it (evaluation loads the test split and the models: those count as decode and model loads, once)."""
    fn = getattr(owner, name)

    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        OPEN.append(0.0)
        try:
            return fn(*args, **kwargs)
        finally:
            total, inner = time.perf_counter() - t, OPEN.pop()
            SPENT[phase] += total - inner
            if OPEN:
                OPEN[-1] += total

    setattr(owner, name, wrapper)


class StepClock(keras.callbacks.Callback):
    """Training steps (the first of each fit apart: it traces) and validation passes."""

    def on_train_begin(self, logs=None):
        self.first, self.fit_start = True, time.perf_counter()

    def on_train_batch_begin(self, batch, logs=None):
        self.t = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        SPENT["first step of each fit (tracing)" if self.first else "train steps"] += time.perf_counter() - self.t
        self.first = False

    def on_test_begin(self, logs=None):
        self.v = time.perf_counter()

    def on_test_end(self, logs=None):
        SPENT["validation"] += time.perf_counter() - self.v

    def on_train_end(self, logs=None):
        SPENT["fit total"] += time.perf_counter() - self.fit_start


def precision_name(choice: str) -> str:
    return {"off": "fp32", "float16": "fp16", "bfloat16": "bf16"}.get(choice, choice)


def commit() -> str:
    import subprocess

    root = Path(__file__).resolve().parent.parent
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
    return out.stdout.strip() or "?"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data/isic2017")
    ap.add_argument("--preset", default="isic2017-cpu")
    ap.add_argument("--exp-dir", default="exp")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="KEY=VALUE overrides")
    ap.add_argument("--tag", default="", help="a name for this measurement (its part file and heading)")
    args = ap.parse_args()
    from dsal_tf.config import parse_set_options

    name = f"walltime-{args.preset}" + (f"-{args.tag}" if args.tag else "") + "".join(f"-{s}" for s in args.sets)
    cfg = load_config(None, {"preset": args.preset, "data_path": args.data, "exp_dir": args.exp_dir,
                             "exp_name": name, "progress": False, **parse_set_options(tuple(args.sets))})
    shutil.rmtree(cfg.run_dir, ignore_errors=True)  # a fresh run; the decoded cache is kept (see below)
    callbacks = train._callbacks
    train._callbacks = lambda *a, **k: [StepClock(), *callbacks(*a, **k)]
    timed(space.ImageSpace, "load_splits", "decode and cache")  # the run's splits and test.py's test split
    timed(train, "new_model", "model build / load")
    timed(train, "load_model", "model build / load")
    timed(train.BestCheckpoint, "on_epoch_end", "checkpoint writes")  # keeping the best weights
    # writing them, once per fit, after StepClock's on_train_end closed "fit total": not subtracted from it
    timed(train.BestCheckpoint, "flush", "checkpoint writes (end of fit)")
    timed(space.ImageSpace, "score_pool", "scoring")
    timed(evaluate, "evaluate_run", "evaluation (test split, every round)")
    t = time.perf_counter()
    active.run_active_learning(cfg, log=lambda m: None)
    evaluate.evaluate_run(cfg, log=lambda m: None)
    wall = time.perf_counter() - t + IMPORT_S
    SPENT["import"] = IMPORT_S
    inside = SPENT["train steps"] + SPENT["first step of each fit (tracing)"] + SPENT["validation"] \
        + SPENT["checkpoint writes"]
    SPENT["rest of fit (epoch ends, logging, data pipeline start)"] = SPENT.pop("fit total") - inside
    SPENT["other (pool bookkeeping, pseudo PNGs, curves)"] = wall - sum(SPENT.values())
    precision = train.resolve_precision(cfg)
    every = {e: train.validation_every(cfg, e) for e in (cfg.nb_initial_epochs, cfg.nb_active_epochs)}
    lines = [f"## {args.preset}{' ' + args.tag if args.tag else ''}{' ' + ' '.join(args.sets) if args.sets else ''}"
             f" ({precision_name(precision)})\n",
             f"Command: `python bench/bench_walltime.py --data {args.data} --preset {args.preset}"
             + (f" --tag {args.tag}" if args.tag else "")
             + "".join(f" --set {s}" for s in args.sets) + "` (alone on the machine, decoded cache warm), "
             f"commit {commit()}. Precision: `MIXED_PRECISION` = {cfg.mixed_precision} -> {precision}. "
             f"Validation every {every[cfg.nb_initial_epochs]} epoch(s) of the {cfg.nb_initial_epochs}-epoch initial "
             f"fit and every {every[cfg.nb_active_epochs]} of the {cfg.nb_active_epochs}-epoch rounds. "
             f"Wall time {wall:.1f} s = {wall / 60:.1f} min.\n",
             "| phase | seconds | share of wall time |", "|---|---:|---:|"]
    for phase, s in sorted(SPENT.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {phase} | {s:.1f} | {s / wall:.1%} |")
    useful = SPENT["train steps"] + SPENT["scoring"]
    lines += ["", f"Train steps + scoring: {useful:.1f} s = **{useful / wall:.1%}** of the wall time "
              "(aim: >= 85%).", ""]
    part = Path(args.exp_dir) / "walltime" / f"{name}.md"
    part.parent.mkdir(parents=True, exist_ok=True)
    part.write_text("\n".join(lines))
    parts = sorted(part.parent.glob("*.md"))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "walltime.md").write_text("# Where a run's wall time goes\n\n" + "\n".join(p.read_text() for p in parts))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
