"""Semi-supervised training on the whole pool against plain training: the label-efficiency curves.

    python bench/semisup_isic.py --data /path/to/isic2017 --budgets 80,160,320,600 --seeds 0 \\
        --trainers standard,mean_teacher,bcp [--steps 1200] [--exp-dir exp]
    python bench/semisup_isic.py --dataset hippocampus --seeds 0 --full   # issue 26 table 3 (volumes)
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

`--dataset hippocampus` (`CURVES`): the same rows on the hippocampus volumes (140 pool, 40 test
volumes) with bench/hippocampus.py's model and epoch (16 filters, batch 2 of the planned 32x48x32
patches, STEPS_PER_EPOCH 50, fp32: the auto choice on volumes); 10 labelled volumes (7%), `standard`
against `bcp`, full supervision on all 140, 1000 steps in every row (20 epochs of 50), table
bench/results/semisup_hippocampus.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from hippocampus import SETTINGS as HIPPOCAMPUS_SETTINGS  # noqa: E402

RESULTS = Path(os.environ.get("RESULTS_DIR") or Path(__file__).resolve().parent / "results")
POOL, BATCH = 1600, 16


@dataclass(frozen=True)
class Curve:
    """One label-efficiency table: its data, the config every row shares, the budgets and the steps."""

    dataset: str  # `--dataset`; runs are <exp-dir>/semisup-<dataset>/<trainer>-n<budget>-s<seed>
    title: str
    data: str  # the default data folder
    pool: int  # labels of full supervision
    unit: str  # what a label is: "images", "volumes"
    budgets: tuple[int, ...]
    trainers: tuple[str, ...]
    steps: int  # optimizer steps of every row
    settings: dict  # config values of every row (model, batch, epoch)
    about: str  # the model, batch and test set, for the table's header

    @property
    def batch(self) -> int:
        return int(self.settings["batch_size"])

    def epochs(self, budget: int, steps: int) -> int:
        """Epochs of about `steps` optimizer steps: an epoch is STEPS_PER_EPOCH steps where the settings
        fix it (volumes), else ceil(budget / batch) (the space's epoch over images)."""
        per_epoch = self.settings.get("steps_per_epoch") or math.ceil(budget / self.batch)
        return math.ceil(steps / per_epoch)

    @property
    def key(self) -> str:
        return f"semisup-{self.dataset}"

    @property
    def results(self) -> Path:
        return RESULTS / f"semisup_{self.dataset}.md"


VOLUME_SETTINGS = ("BASE_FILTERS", "BATCH_SIZE", "STEPS_PER_EPOCH")  # bench/hippocampus.py's model and epoch
CURVES = {
    "isic2017": Curve(
        "isic2017", "ISIC 2017", "../shared/data/isic2017", POOL, "images", (80, 160, 320, 600),
        ("standard", "mean_teacher", "bcp"), 1200, {"preset": "isic2017-cpu", "batch_size": BATCH},
        f"`isic2017-cpu` model (64x64, 16 filters), batch {BATCH}; test Dice on the 400 test images"),
    # issue 26, table 3: 10 labelled volumes of 140 (7%); bcp costs ~2.3 standard steps (semisup_step_time.md)
    "hippocampus": Curve(
        "hippocampus", "hippocampus MRI, MSD Task04", "../shared/data/hippocampus", 140, "volumes", (10,),
        ("standard", "bcp"), 1000, {k.lower(): HIPPOCAMPUS_SETTINGS[k] for k in VOLUME_SETTINGS},
        "3D U-Net, " + ", ".join(f"{k}={HIPPOCAMPUS_SETTINGS[k]}" for k in VOLUME_SETTINGS)
        + " as bench/hippocampus.py (the default 32x48x32 patches; fp32, the auto choice on "
        "volumes); test Dice on the 40 test volumes"),
}
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
        lines += al_aim(d)
    return "\n".join(lines) + "\n"


def al_aim(d: pd.DataFrame) -> list[str]:
    """Issue 26's third aim, "does any query strategy beat random under bcp?", from the paired
    differences pooled over every seed a row has (a row with one seed: that seed's)."""
    out = ["", "Aim (issue 26): a query strategy above random + bcp, with an interval that excludes 0 "
           "(AULC and final Dice, over the seeds each row has):", ""]
    beats, loses = [], []
    for strategy, rows in d[d["baseline"] == "random"].groupby("strategy", sort=True):
        pooled = rows[rows["seeds"].astype(str) == "all"]
        rows = pooled if len(pooled) else rows
        seeds = "all" if len(pooled) else ",".join(rows["seeds"].astype(str).unique())
        parts = []
        for metric in ("aulc", "final_dice"):
            r = rows[rows["metric"] == metric]
            if len(r):
                r = r.iloc[0]
                parts.append(f"{metric} {r['diff']:+.4f} [{r['ci_low']:+.4f}, {r['ci_high']:+.4f}]")
                if r["ci_low"] > 0:
                    beats.append(f"{strategy} ({metric})")
                elif r["ci_high"] < 0:
                    loses.append(f"{strategy} ({metric})")
        out.append(f"- {strategy} (seeds {seeds}): " + "; ".join(parts))
    out += ["", "**Met**: " + ", ".join(beats) if beats else "**Missed**: no strategy beats random under `bcp`."]
    if loses:
        out[-1] += " Below random, outside the noise: " + ", ".join(loses) + "."
    return out


def row_config(data: str, exp_dir: str, budget: int, trainer: str, seed: int, steps: int, sets: dict,
               curve: Curve = CURVES["isic2017"]):
    """One row's config: `budget` random labels, one round of `steps` optimizer steps, from scratch."""
    from dsal_tf.components import load_config

    return load_config(None, {
        **curve.settings, "data_path": data, "exp_dir": exp_dir, "progress": False,
        "exp_name": f"{curve.key}/{trainer}-n{budget}-s{seed}", "seed": seed, "trainer": trainer,
        "nb_labeled": budget, "nb_iterations": 0, "nb_initial_epochs": curve.epochs(budget, steps),
        "initial_selection": "random", **sets})


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


def paired(found: dict, base: dict) -> tuple[float, float, float] | None:
    """The mean paired difference and its bootstrap 95% interval over the seeds both have (per-item
    Dice series, the same test items), or None."""
    from dsal_tf.compare import bootstrap_ci

    seeds = [s for s, d in found.items() if d is not None and base.get(s) is not None]
    if not seeds:
        return None
    return bootstrap_ci(np.stack([(found[s] - base[s]).to_numpy() for s in seeds]))


def paired_cells(found: dict, base: dict) -> list[str]:
    """`paired` as two table cells, or two empty cells."""
    d = paired(found, base)
    return ["", ""] if d is None else [f"{d[0]:+.4f}", f"[{d[1]:+.4f}, {d[2]:+.4f}]"]


def aims(dice, budgets, seeds, pool: int) -> list[str]:
    """Issue 26's aims for `bcp`, met or missed with their numbers, over the seeds every row involved has:
    within 1.0 Dice point of full supervision with 20% of the labels (stretch: 0.5 with 20%, or 1.0 with
    10%), and above `standard` at every budget up to 20% with an interval excluding 0. `dice(trainer,
    budget, seed)` is a row's per-item Dice or None."""
    def diff(trainer, budget, base_trainer, base_budget):
        return paired({s: dice(trainer, budget, s) for s in seeds},
                      {s: dice(base_trainer, base_budget, s) for s in seeds})

    def fmt(d):
        return f"{d[0]:+.4f} [{d[1]:+.4f}, {d[2]:+.4f}]"

    lines = []
    at = {round(b / pool, 3): b for b in budgets}
    b20, b10 = at.get(0.2), at.get(0.1)
    if b20 and (d := diff("bcp", b20, "standard", pool)) is not None:
        verdict = "met" if d[0] >= -0.010 else "missed"
        plain = diff("standard", b20, "standard", pool)  # the same gap for plain training: what bcp adds
        lines.append(f"- `bcp` with 20% of the labels within 1.0 Dice point of full supervision: **{verdict}**, "
                     f"{fmt(d)}" + (f" (`standard` with 20%: {fmt(plain)})." if plain is not None else "."))
        d10 = diff("bcp", b10, "standard", pool) if b10 else None
        stretch = d[0] >= -0.005 or (d10 is not None and d10[0] >= -0.010)
        lines.append(f"- Stretch (within 0.5 with 20%, or within 1.0 with 10%): **{'met' if stretch else 'missed'}**; "
                     + (f"10%: {fmt(d10)}." if d10 is not None else "10%: pending."))
    upto = [b for b in budgets if b / pool <= 0.2 + 1e-9]
    found = {b: diff("bcp", b, "standard", b) for b in upto}
    if upto and all(d is not None for d in found.values()):
        above = all(d[1] > 0 for d in found.values())
        lines.append(f"- `bcp` above `standard` at every budget up to 20% with an interval excluding 0: "
                     f"**{'met' if above else 'missed'}**; " + ", ".join(f"{b}: {fmt(d)}" for b, d in found.items())
                     + ".")
    return (["", f"Aims (issue 26), over seeds {','.join(map(str, seeds))} (point estimates decide; intervals "
             "are paired over seeds and test images):", ""] + lines) if lines else []


def bcp_pretraining(run_dirs) -> str:
    """How the finished `bcp` rows in `run_dirs` pre-trained, from each run's config.json (a run made
    before `BCP_PRETRAIN_MIX` existed has no such key and learnt the labels alone), for a table's header."""
    mixed = {d.name: bool(json.loads((d / "config.json").read_text()).get("bcp_pretrain_mix", False))
             for d in run_dirs if (d / "config.json").is_file()}
    if not mixed:
        return ""
    if all(mixed.values()):
        return " `bcp` pre-trains on labelled pairs mixed by its box (`BCP_PRETRAIN_MIX`, the authors' code)."
    if not any(mixed.values()):
        return " `bcp` pre-trains on the labels alone (`BCP_PRETRAIN_MIX = false`)."
    return (" `bcp` rows pre-trained on mixed labelled pairs (`BCP_PRETRAIN_MIX`): "
            + ", ".join(n for n, m in sorted(mixed.items()) if m) + "; on the labels alone: "
            + ", ".join(n for n, m in sorted(mixed.items()) if not m) + ".")


def table(exp_dir: str, budgets, trainers, seeds, steps: int, precision: str,
          curve: Curve = CURVES["isic2017"]) -> str:
    root = Path(exp_dir) / curve.key

    def dice(trainer, budget, seed):
        path = root / f"{trainer}-n{budget}-s{seed}" / "round_00" / "test_metrics.csv"
        return pd.read_csv(path).set_index("name")["dice"] if path.is_file() else None

    mode = "" if curve.dataset == "isic2017" else f"--dataset {curve.dataset} "
    full = {s: dice("standard", curve.pool, s) for s in seeds}
    lines = [f"# Semi-supervised training on the whole pool: label efficiency ({curve.title})", "",
             f"`python bench/semisup_isic.py {mode}--data /path/to/data --budgets {','.join(map(str, budgets))} "
             f"--trainers {','.join(trainers)} --seeds S --steps {steps} [--full]` for S in "
             f"{','.join(map(str, seeds))}. "
             f"{curve.about}; {steps} optimizer steps in every row, random expert labels (the same {curve.unit} for "
             f"every trainer of a seed), precision {precision}. Differences against `standard` of the same budget "
             f"and seed, and against full supervision (all {curve.pool} labels) of the same seed, paired per test "
             "item, with the bootstrap 95% interval over seeds and items."
             + bcp_pretraining(root / f"bcp-n{b}-s{s}" for b in budgets for s in seeds
                               if dice("bcp", b, s) is not None),
             "",
             "| labels | share | trainer | seeds | test Dice | - standard | 95% interval | - full | 95% interval |",
             "|---:|---:|---|---|---:|---:|---|---:|---|"]
    for budget in budgets:
        for trainer in trainers:
            found = {s: dice(trainer, budget, s) for s in seeds}
            have = [s for s, d in found.items() if d is not None]
            if not have:
                lines.append(f"| {budget} | {budget / curve.pool:.1%} | {trainer} | pending | | | | | |")
                continue
            mean = np.mean([found[s].mean() for s in have])
            base = {s: dice("standard", budget, s) for s in have} if trainer != "standard" else {}
            cells = paired_cells(found, base) + paired_cells(found, full)
            lines.append(f"| {budget} | {budget / curve.pool:.1%} | {trainer} | {','.join(map(str, have))} | "
                         f"{mean:.4f} | " + " | ".join(cells) + " |")
    done = [d.mean() for d in full.values() if d is not None]
    lines += ["", f"Full supervision (all {curve.pool} labels, `standard`, {steps} steps): "
              + (f"{np.mean(done):.4f} over {len(done)} seed(s)." if done else "pending.")]
    if curve.dataset == "isic2017":
        lines += aims(dice, budgets, [s for s in seeds if full[s] is not None], curve.pool)
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
    ap.add_argument("--dataset", default="isic2017", choices=sorted(CURVES),
                    help="Which label-efficiency table (its data, model, budgets, trainers and steps by default).")
    ap.add_argument("--data", default=None, help="Data folder (default: the dataset's under ../shared/data).")
    ap.add_argument("--exp-dir", default="exp")
    ap.add_argument("--budgets", default=None, help="Labels per row, comma-separated (default: the dataset's).")
    ap.add_argument("--trainers", default=None, help="Comma-separated (default: the dataset's).")
    ap.add_argument("--seeds", default="0", help="Seeds to run now.")
    ap.add_argument("--table-seeds", default="0,1,2", help="Seeds the table reports (unfinished: pending).")
    ap.add_argument("--steps", type=int, default=None, help="Optimizer steps of every row (default: the dataset's).")
    ap.add_argument("--full", action="store_true", help="Also the full-supervision row (every pool label).")
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

    curve = CURVES[args.dataset]
    sets = parse_set_options(tuple(args.sets))
    budgets = [int(b) for b in args.budgets.split(",")] if args.budgets else list(curve.budgets)
    trainers = args.trainers.split(",") if args.trainers else list(curve.trainers)
    seeds, steps, data = [int(s) for s in args.seeds.split(",")], args.steps or curve.steps, args.data or curve.data
    out = curve.results
    jobs = [(b, t, s) for s in seeds for b in budgets for t in trainers] + ([(curve.pool, "standard", s) for s in seeds]
                                                                          if args.full else [])
    precision = sets.get("MIXED_PRECISION", "auto")
    for budget, trainer, seed in jobs:
        run_row(row_config(data, args.exp_dir, budget, trainer, seed, steps, sets, curve), print)
        out.write_text(table(args.exp_dir, budgets, trainers, [int(s) for s in args.table_seeds.split(",")],
                             steps, precision, curve))
    print(out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
