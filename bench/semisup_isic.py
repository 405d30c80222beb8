"""Semi-supervised training on the whole pool against plain training: the label-efficiency curve.

    python bench/semisup_isic.py --data /path/to/isic2017 --budgets 80,160,320,600 --seeds 0 \\
        --trainers standard,mean_teacher,bcp [--steps 1200] [--exp-dir exp]
    python bench/semisup_isic.py step-time     # the cost of a bcp / mean_teacher step against standard
    python bench/semisup_isic.py al-table --exp-dir EXP   # the active learning + bcp table (queue: semisup/al/)

Each row trains one model from scratch on `budget` randomly chosen expert labels of the pool (the
same images for every trainer of a seed: `INITIAL_SELECTION = "random"` with the seed), with the
`isic2017-cpu` model and input size, for the same number of optimizer steps in every row (`--steps`;
epochs = ceil(steps / ceil(budget / BATCH_SIZE))), and is evaluated on the test split. Full
supervision (all 1600 labels, `standard`, the same steps) is the line to reach. A row differs from
its `standard` row of the same budget and seed only in the trainer. Rows are resumable runs
(`dsal run`); the table (bench/results/semisup_isic2017.md) is rewritten from what has finished,
with paired bootstrap intervals over seeds and test images (`compare.bootstrap_ci`).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(os.environ.get("RESULTS_DIR") or Path(__file__).resolve().parent / "results")
POOL, BATCH = 1600, 16
# Active learning with semi-supervision (issue 26, table 2): 160 random labels, then 5 rounds of 32 (to 320),
# every row trained by `bcp`; round 0 trains 1200 steps as the label-efficiency rows do (120 epochs of 10),
# each later round 20 epochs; no whole-image pseudo labels (bcp uses the pool). One `dsal compare` per row.
AL_NAME, AL_ROWS, AL_ITERATIONS = "compare-isic2017-cpu-bcp", ("random", "dsal", "entropy", "dsal+diverse"), 5
AL_SETTINGS = {"TRAINER": "bcp", "NB_LABELED": 160, "NB_NEXT_SAMPLE": 32, "NB_INITIAL_EPOCHS": 120,
               "NB_ACTIVE_EPOCHS": 20, "BATCH_SIZE": BATCH}


def al_argv(data: str, spec: str, seed: int) -> tuple[str, ...]:
    """The `dsal compare` arguments of one active-learning + bcp row and seed."""
    sets = [a for k, v in AL_SETTINGS.items() for a in ("--set", f"{k}={v}")]
    return ("compare", "--preset", "isic2017-cpu", "--data", data, "--no-progress", "--name", AL_NAME,
            "--iterations", str(AL_ITERATIONS), "--strategies", spec, "--seeds", str(seed), "--baseline", "random",
            "--no-full-supervision", *sets)


def al_table(exp_dir: str) -> str:
    """The active learning + bcp table from the compare folder and the queue's records."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from compare_table import differences, md, queue_records, runs_grid, summary

    folder = Path(exp_dir) / AL_NAME
    sets = ", ".join(f"{k}={v}" for k, v in AL_SETTINGS.items())
    lines = ["# Active learning with semi-supervision (bcp) on ISIC 2017", "",
             "`python bench/results_queue.py run --only semisup/al/` (one `dsal compare` per row and seed). "
             f"`isic2017-cpu` preset with {sets}, `--iterations {AL_ITERATIONS}`: 160 random expert labels, then 32 "
             "a round to 320; every row trains with `bcp` (its whole-image pseudo labels default to none), from the "
             "same round-0 model per seed; precision `auto` (bf16 here). Test Dice on the 400 test images; AULC over "
             "the labels; differences against random + bcp paired per test image, bootstrap 95% interval over "
             "seeds and images. Only finished runs count.", "", "## Runs", ""]
    lines += runs_grid(queue_records(Path(exp_dir), "semisup/al/"), lambda r, s: f"semisup/al/{r}/s{s}", AL_ROWS)
    s = summary(folder)
    if s is not None:
        lines += ["", "## Summary (final round; seconds per round after round 0)", "", md(s)]
    d = differences(folder)
    if d is not None:
        lines += ["", "## Paired differences against random + bcp", "", md(d)]
    return "\n".join(lines) + "\n"


def row_config(data: str, exp_dir: str, budget: int, trainer: str, seed: int, steps: int, sets: dict):
    from dsal_tf.components import load_config

    epochs = math.ceil(steps / math.ceil(budget / BATCH))
    return load_config(None, {
        "preset": "isic2017-cpu", "data_path": data, "exp_dir": exp_dir, "progress": False,
        "exp_name": f"semisup-isic2017/{trainer}-n{budget}-s{seed}", "seed": seed, "trainer": trainer,
        "nb_labeled": budget, "nb_iterations": 0, "nb_initial_epochs": epochs, "initial_selection": "random",
        "batch_size": BATCH, **sets})


def run_row(cfg, log) -> pd.Series:
    """Train (or resume) one row and return its per-test-image Dice."""
    from dsal_tf.active import run_active_learning
    from dsal_tf.evaluate import evaluate_run
    from dsal_tf.run import Run

    run = Run.of(cfg)
    if not run.test_metrics(0).is_file():
        start = time.time()
        run_active_learning(cfg, log=lambda m: None)
        evaluate_run(cfg, log=lambda m: None)
        log(f"{cfg.exp_name}: {time.time() - start:.0f} s")
    return pd.read_csv(run.test_metrics(0)).set_index("name")["dice"]


def table(exp_dir: str, budgets, trainers, seeds, steps: int, precision: str) -> str:
    from dsal_tf.compare import bootstrap_ci

    root = Path(exp_dir) / "semisup-isic2017"

    def dice(trainer, budget, seed):
        path = root / f"{trainer}-n{budget}-s{seed}" / "round_00" / "test_metrics.csv"
        return pd.read_csv(path).set_index("name")["dice"] if path.is_file() else None

    lines = ["# Semi-supervised training on the whole pool: label efficiency (ISIC 2017)", "",
             f"`python bench/semisup_isic.py --data /path/to/isic2017 --budgets {','.join(map(str, budgets))} "
             f"--trainers {','.join(trainers)} --seeds S --steps {steps} [--full]` for S in "
             f"{','.join(map(str, seeds))}. "
             f"`isic2017-cpu` model (64x64, 16 filters), batch {BATCH}, {steps} optimizer steps in every row, "
             f"random expert labels (the same images for every trainer of a seed), precision {precision}; test "
             "Dice on the 400 test images; differences against `standard` of the same budget and seed, paired "
             "per test image, with the bootstrap 95% interval over seeds and images.", "",
             "| labels | share | trainer | seeds | test Dice | - standard | 95% interval |",
             "|---:|---:|---|---|---:|---:|---|"]
    for budget in budgets:
        for trainer in trainers:
            found = {s: dice(trainer, budget, s) for s in seeds}
            have = [s for s, d in found.items() if d is not None]
            if not have:
                lines.append(f"| {budget} | {budget / POOL:.1%} | {trainer} | pending | | | |")
                continue
            mean = np.mean([found[s].mean() for s in have])
            base = {s: dice("standard", budget, s) for s in have}
            paired = [s for s in have if base[s] is not None]
            diff = lo = hi = None
            if trainer != "standard" and paired:
                diff, lo, hi = bootstrap_ci(np.stack([(found[s] - base[s]).to_numpy() for s in paired]))
            cells = [f"{diff:+.4f}", f"[{lo:+.4f}, {hi:+.4f}]"] if diff is not None else ["", ""]
            lines.append(f"| {budget} | {budget / POOL:.1%} | {trainer} | {','.join(map(str, have))} | {mean:.4f} | "
                         + " | ".join(cells) + " |")
    full = [dice("standard", POOL, s) for s in seeds]
    full = [d.mean() for d in full if d is not None]
    lines += ["", f"Full supervision (all {POOL} labels, `standard`, {steps} steps): "
              + (f"{np.mean(full):.4f} over {len(full)} seed(s)." if full else "pending.")]
    return "\n".join(lines) + "\n"


def step_time(repeats: int = 20) -> str:
    """Seconds per optimizer step of each trainer on the same batch size (random data, isic2017-cpu U-Net)."""
    import keras
    import tensorflow as tf

    from dsal_tf import train
    from dsal_tf.config import resolve
    from dsal_tf.trainers import TRAINERS

    cfg = resolve({"preset": "isic2017-cpu", "batch_size": BATCH})
    choice = train.set_precision(cfg)
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(BATCH, 64, 64, 3)).astype("float32"))
    y = tf.constant((rng.random((BATCH, 64, 64, 1)) > 0.7).astype("float32"))
    rows = []
    for name in ("standard", "mean_teacher", "bcp"):
        model = train.new_model(cfg, 0)
        if name == "standard":
            ys = {h: y for h in ("main", "side_1", "side_2")}
            step = lambda: model.train_on_batch(x, ys)  # noqa: E731
        else:
            trainer = TRAINERS[name](model, TRAINERS[name].Settings(), seed=0, total_steps=100)
            trainer.compile(optimizer=keras.optimizers.Adam(1e-3))
            fn = tf.function(trainer.train_step)
            step = lambda fn=fn: fn(((x, y), x))  # noqa: E731
        step()  # trace
        t = time.perf_counter()
        for _ in range(repeats):
            step()
        rows.append((name, (time.perf_counter() - t) / repeats))
    base = rows[0][1]
    lines = ["## Step time", "", f"`python bench/semisup_isic.py step-time`: one optimizer step, batch {BATCH} "
             f"(+ {BATCH} unlabelled images for the semi-supervised trainers), isic2017-cpu U-Net, precision "
             f"{choice}, mean of {repeats} steps after tracing, alone on the 2-core machine.", "",
             "| trainer | s / step | x standard |", "|---|---:|---:|"]
    lines += [f"| {n} | {s:.3f} | {s / base:.2f} |" for n, s in rows]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("command", nargs="?", default="table", choices=("table", "step-time", "al-table"))
    ap.add_argument("--data", default="../shared/data/isic2017")
    ap.add_argument("--exp-dir", default="exp")
    ap.add_argument("--budgets", default="80,160,320,600")
    ap.add_argument("--trainers", default="standard,mean_teacher,bcp")
    ap.add_argument("--seeds", default="0", help="Seeds to run now.")
    ap.add_argument("--table-seeds", default="0,1,2", help="Seeds the table reports (unfinished: pending).")
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--full", action="store_true", help="Also the full-supervision row (all 1600 labels).")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.command == "step-time":
        (RESULTS / "semisup_step_time.md").write_text(step_time())
        print((RESULTS / "semisup_step_time.md").read_text())
        return 0
    if args.command == "al-table":
        (RESULTS / "semisup_al_isic2017.md").write_text(al_table(args.exp_dir))
        return 0
    from dsal_tf.config import parse_set_options

    sets = parse_set_options(tuple(args.sets))
    budgets = [int(b) for b in args.budgets.split(",")]
    trainers, seeds = args.trainers.split(","), [int(s) for s in args.seeds.split(",")]
    out = RESULTS / "semisup_isic2017.md"
    jobs = [(b, t, s) for s in seeds for b in budgets for t in trainers] + ([(POOL, "standard", s) for s in seeds]
                                                                          if args.full else [])
    precision = sets.get("MIXED_PRECISION", "auto")
    for budget, trainer, seed in jobs:
        run_row(row_config(args.data, args.exp_dir, budget, trainer, seed, args.steps, sets), print)
        out.write_text(table(args.exp_dir, budgets, trainers, [int(s) for s in args.table_seeds.split(",")],
                             args.steps, precision))
    print(out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
