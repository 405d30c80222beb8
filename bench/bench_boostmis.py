"""BoostMIS closed loop on generated feature vectors: accuracy and macro F1 per round.

Variants (each `dsal classify` settings): BoostMIS (boostmis queries + adaptive pseudo labels),
random queries + adaptive pseudo labels, random queries + FixMatch's fixed threshold (0.95),
boostmis queries without pseudo labels, random queries without pseudo labels (the baseline: each
variant's final accuracy gets a paired difference from it). Data: 3 imbalanced classes (60/30/10 %),
each a mixture of two Gaussian clusters in D = 128, train 2000 / val 300 / test 1000 (the seed's
file format).

    python bench/bench_boostmis.py [--seeds 0,1,2] [--iterations 5] [--steps 300] [--threshold T] [--optimizer O]
                                   [--one-head]

The adaptive variants use the `--threshold` cutoff rule (`global` or `per_class`) and every variant the
`--optimizer` (`adam` or `sgd`); both default to `dsal classify`'s defaults (global and sgd since issue
27.2's fresh-head rows), and every round starts from the head's first weights unless `--one-head`
(BOOSTMIS_FRESH_HEAD off: one head trained on through the rounds). Each run starts afresh in
exp/bench_boostmis/ (a stale run there is deleted); the table goes to `--out` (default
bench/results/boostmis_issue27.md). Earlier tables: boostmis.md (before issue 16's fixes) and
boostmis_issue16.md (after them: `--threshold global --optimizer adam --one-head`).

    python bench/bench_boostmis.py --ablation [--seeds 0,1,2] [--iterations 5] [--steps 300] [--rows a,b]

Issue 27.2's discriminating benchmark: which difference from the authors' code makes the pseudo
labels collapse. Random queries throughout (the pseudo labels are the question); rows `ABLATION`:
today's configuration, each `Booster.Settings` change alone, and the authors' code's configuration;
each against the no-pseudo-label run with the same first labels, optimizer and EMA (`baseline_of`),
paired per test item over seeds (`compare.bootstrap_ci`). The unlabelled targets are known, so the
Booster tallies its kept pseudo labels per class: accuracy (right / kept) and share (kept / all kept),
per round. Finished runs (exp/bench_boostmis_ablation/<row>-s<seed>/result.json) are skipped; the table
(`--out`, default bench/results/boostmis_ablation.md) is rebuilt over every finished seed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from bench_boostmis_ablation import run_ablation  # noqa: E402

from dsal_tf.classify import TRAINING, ClassifySettings, classify_loop, load_feature_splits  # noqa: E402
from dsal_tf.compare import bootstrap_ci  # noqa: E402
from dsal_tf.strategies.boostmis import THRESHOLDS  # noqa: E402
from dsal_tf.trainers.boostmis import OPTIMIZERS  # noqa: E402

VARIANTS = {
    "BoostMIS (boostmis + adaptive)": ("boostmis", "adaptive"),
    "random + adaptive": ("random", "adaptive"),
    "random + fixed 0.95 (FixMatch)": ("random", "fixed"),
    "boostmis query, no pseudo labels": ("boostmis", "none"),
    "random, no pseudo labels": ("random", "none"),
}
BASELINE = "random, no pseudo labels"  # the paired differences are against it


def make_features(folder: Path, seed: int = 123, dim: int = 128) -> Path:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(3, 2, dim)) * 0.22
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 2000), ("val", 300), ("test", 1000)):
        y = rng.choice(3, size=n, p=[0.6, 0.3, 0.1])
        sub = rng.integers(0, 2, size=n)
        x = centres[y, sub] + rng.normal(size=(n, dim))
        np.save(folder / f"{split}-features.npy", x.astype(np.float32))
        np.save(folder / f"{split}-targets.npy", y.astype(np.int64))
    return folder


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--iterations", type=int, default=5)
    ap.add_argument("--labeled", type=int, default=30)
    ap.add_argument("--queries", type=int, default=30)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--threshold", default=TRAINING.boostmis_threshold, choices=sorted(THRESHOLDS))
    ap.add_argument("--optimizer", default=TRAINING.boostmis_optimizer, choices=sorted(OPTIMIZERS))
    ap.add_argument("--one-head", action="store_true", help="one head through the rounds (BOOSTMIS_FRESH_HEAD off)")
    results = Path(os.environ.get("RESULTS_DIR") or "bench/results")
    ap.add_argument("--out", default=str(results / "boostmis_issue27.md"))
    ap.add_argument("--exp-dir", default="exp")
    ap.add_argument("--ablation", action="store_true", help="issue 27.2's ablation (bench_boostmis_ablation.py)")
    ap.add_argument("--rows", default="", help="--ablation: only these rows (comma-separated keys)")
    args = ap.parse_args()
    if "/" not in args.out:  # a bare file name goes to the results folder
        args.out = str(results / args.out)
    if args.ablation:
        out = args.out if args.out != str(results / "boostmis_issue27.md") else str(results / "boostmis_ablation.md")
        run_ablation(make_features(Path(args.exp_dir) / "bench_boostmis" / "features"), args, out)
        return
    root = Path(args.exp_dir) / "bench_boostmis"
    feats = make_features(root / "features")
    seeds = [int(s) for s in args.seeds.split(",")]
    yt = load_feature_splits(feats)["test"][1]
    frames, correct = [], {}
    for label, (strategy, pseudo) in VARIANTS.items():
        for seed in seeds:
            t = time.perf_counter()
            run = root / f"{strategy}-{pseudo}-{args.threshold}-{args.optimizer}{'-one' * args.one_head}-s{seed}"
            shutil.rmtree(run, ignore_errors=True)  # the table is always from this code
            settings = ClassifySettings(args.labeled, args.queries, args.iterations, strategy, pseudo, seed, args.steps,
                                        threshold=args.threshold, boostmis_optimizer=args.optimizer,
                                        boostmis_fresh_head=not args.one_head)
            last = []
            classify_loop(feats, run, settings, log=lambda m: None, on_round=last.append)
            correct[label, seed] = (last[-1]["test_pred"] == yt).astype(np.int8)
            df = pd.read_csv(run / "results.csv")
            df["variant"], df["seed"] = label, seed
            frames.append(df)
            print(f"{label} seed {seed}: final accuracy {df['accuracy'].iloc[-1]:.4f} "
                  f"macro F1 {df['macro_f1'].iloc[-1]:.4f} ({time.perf_counter() - t:.0f}s)", flush=True)
    all_ = pd.concat(frames)
    lines = ["# BoostMIS on generated feature vectors", "",
             "Generated data (not ISIC, not MESCC): 3 imbalanced classes (60/30/10 %), two Gaussian clusters "
             "per class, D = 128; train 2000, test 1000. "
             f"{args.labeled} initial expert labels, {args.queries} per round, {args.steps} MLP updates per round, "
             f"seeds {args.seeds}; mean +- std over seeds, on the test split. Adaptive cutoff: {args.threshold}, "
             f"optimizer {args.optimizer} "
             "(issue 16: N_A = the last round's labels, pseudo labels from the online head, the EMA head "
             "evaluated; " + ("one head through the rounds)." if args.one_head else
                              "issue 27.2: each round from the head's first weights)."), "",
             "Command: `python bench/bench_boostmis.py "
             f"--seeds {args.seeds} --iterations {args.iterations} --steps {args.steps} --threshold {args.threshold} "
             f"--optimizer {args.optimizer} " + ("--one-head " if args.one_head else "") +
             f"--out {Path(args.out).name if Path(args.out).parent == results else args.out}`", ""]
    for metric in ("accuracy", "macro_f1"):
        g = all_.groupby(["variant", "n_labelled"])[metric].agg(["mean", "std"]).reset_index()
        cols = sorted(g["n_labelled"].unique())
        lines += [f"## {metric} by expert labels", "", "| variant | " + " | ".join(map(str, cols)) + " |",
                  "|---|" + "---|" * len(cols)]
        for label in VARIANTS:
            row = g[g["variant"] == label].set_index("n_labelled")
            lines.append(f"| {label} | " + " | ".join(f"{row.loc[c, 'mean']:.3f} +- {row.loc[c, 'std']:.3f}"
                                                      for c in cols) + " |")
        lines.append("")
    lines += [f"## final accuracy: difference from '{BASELINE}'", "",
              "Paired per test item and seed (the same first labels and seeds), 95 % bootstrap interval "
              "(dsal_tf.compare.bootstrap_ci: seeds, then test items).", "", "| variant | difference |", "|---|---|"]
    for label in VARIANTS:
        if label != BASELINE:
            m, lo, hi = bootstrap_ci(np.array([correct[label, s] - correct[BASELINE, s] for s in seeds]))
            lines.append(f"| {label} | {m:+.3f} [{lo:+.3f}, {hi:+.3f}] |")
    lines.append("")
    pseudo = all_.groupby("variant")["n_pseudo"].mean()
    lines += ["Mean pseudo-labelled share of the unlabelled pool kept by the final thresholds (n_pseudo, "
              "all rounds): " + ", ".join(f"{k}: {v:.0f}" for k, v in pseudo.items()), ""]
    Path(args.out).write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
