"""Issue 27.2: BoostMIS's pseudo-label collapse on the generated features, one change at a time.

Run through `python bench/bench_boostmis.py --ablation` (the features and the options are that
script's). Each run is `dsal classify`'s loop itself (`classify.classify_loop`: one head through the
rounds unless the row says a fresh head, a fresh optimizer and `Booster` each round, `steps` updates of
batch 64, the EMA head evaluated on the test split) with random queries and the settings of
`trainers.booster.Booster.Settings`; its `on_round` hands over each round's test predictions and the
Booster's per-class tally of its pseudo labels. No resume inside a run: a run is seconds; it starts
afresh in <row>-s<seed>/run, and finished runs are skipped by their result.json.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from dsal_tf.classify import ClassifySettings, booster_options, classify_loop, load_feature_splits
from dsal_tf.compare import bootstrap_ci
from dsal_tf.trainers.booster import Booster

WARMUP = "one round"  # (g): the first round's updates without pseudo labels (resolved to --steps)
ABLATION = {  # key: (label, Booster.Settings changes); every row has pseudo labels
    "today": ("start (issue 16): adaptive eps_t, Adam 1e-3, EMA 0.99, online labels, random first labels, one head",
              {}),
    "constant": ("(a) constant 0.95 cutoff", {"boostmis_cutoff": "constant"}),
    "per_class": ("(b) per-class thresholds", {"boostmis_threshold": "per_class"}),
    "align": ("(c) distribution alignment", {"boostmis_align": True}),
    "balanced": ("(d) class-balanced first labels", {"boostmis_initial": "balanced"}),
    "sgd": ("(e) SGD 0.03, momentum 0.9, wd 5e-4", {"boostmis_optimizer": "sgd"}),
    "ema": ("(f) EMA 0.999, labels from the EMA head", {"ema_decay": 0.999, "boostmis_labeller": "ema"}),
    "warmup": ("(g) warm-up: no pseudo labels in the first round", {"boostmis_warmup": WARMUP}),
    "authors": ("authors' code: constant 0.95, balanced, SGD + wd, EMA 0.999 (online labels)",
                {"boostmis_cutoff": "constant", "boostmis_initial": "balanced", "boostmis_optimizer": "sgd",
                 "ema_decay": 0.999}),
    # the combinations of the changes that lost least alone (b, e, f): added after the first table
    "per_class+sgd": ("(b) + (e): per-class thresholds, SGD + wd",
                      {"boostmis_threshold": "per_class", "boostmis_optimizer": "sgd"}),
    "per_class+ema": ("(b) + (f): per-class thresholds, EMA 0.999 labels",
                      {"boostmis_threshold": "per_class", "ema_decay": 0.999, "boostmis_labeller": "ema"}),
    "authors+per_class": ("authors' code + (b) per-class thresholds",
                          {"boostmis_cutoff": "constant", "boostmis_initial": "balanced", "boostmis_optimizer": "sgd",
                           "ema_decay": 0.999, "boostmis_threshold": "per_class"}),
    # the difference issue 16 made and the first table left out: one head trained on through every round
    "fresh": ("(h) a fresh head each round (round 0's weights, the EMA warm-up again)", {"boostmis_fresh_head": True}),
    "fresh+sgd": ("(h) + (e): a fresh head each round, SGD + wd", {"boostmis_fresh_head": True,
                                                                   "boostmis_optimizer": "sgd"}),
    "fresh+per_class+sgd": ("(h) + (b) + (e): a fresh head each round, per-class thresholds, SGD + wd",
                            {"boostmis_fresh_head": True, "boostmis_threshold": "per_class",
                             "boostmis_optimizer": "sgd"}),
}
# what a no-pseudo-label run shares with the row it is the baseline of
BASELINE_FIELDS = ("boostmis_initial", "boostmis_optimizer", "ema_decay", "boostmis_fresh_head")


def baseline_of(changes: dict) -> str:
    """The key of the no-pseudo-label run with the same first labels, optimizer, EMA and head policy as `changes`."""
    kept = [f"{k.removeprefix('boostmis_')}={changes[k]}" for k in BASELINE_FIELDS if k in changes]
    return "none" + "".join(f"+{k}" for k in kept)


# "today" (the key of the first table's runs): the configuration the ablation started from, pinned (the classify
# defaults changed after it)
TODAY = {"boostmis_threshold": "global", "boostmis_optimizer": "adam", "boostmis_fresh_head": False}


def settings_of(changes: dict, steps: int) -> Booster.Settings:
    values = {k: (steps if v == WARMUP else v) for k, v in {**TODAY, **changes}.items()}
    s = replace(Booster.Settings(), **values)
    s.check()
    return s


def ablation_run(features: Path, run_dir: Path, s: Booster.Settings, pseudo: bool, seed: int, labeled: int,
                 queries: int, iterations: int, steps: int) -> dict:
    """One `dsal classify` loop (random queries; `adaptive` pseudo labels, or `none`) in `run_dir`, afresh;
    per round accuracy, macro F1 and the pseudo-label tally per class, and the final round's per-test-item
    correctness (for paired intervals)."""
    data = load_feature_splits(features)
    y, yt = data["train"][1], data["test"][1]
    settings = ClassifySettings(labeled, queries, iterations, "random", "adaptive" if pseudo else "none", seed, steps,
                                **booster_options(s))
    rounds, preds = [], []

    def keep(r: dict) -> None:
        n_classes = len(r["pl_kept"])
        rounds.append(dict(round=r["round"], n_labelled=r["n_labelled"], accuracy=r["accuracy"],
                           macro_f1=r["macro_f1"], pl_kept=r["pl_kept"].tolist(), pl_correct=r["pl_correct"].tolist(),
                           first_labels=np.bincount(y[r["labelled"]], minlength=n_classes).tolist()))
        preds.append(r["test_pred"])

    shutil.rmtree(run_dir, ignore_errors=True)
    classify_loop(features, run_dir, settings, log=lambda m: None, on_round=keep)
    return dict(rounds=rounds, correct=(preds[-1] == yt).astype(np.int8).tolist())


def configs(rows: list[str]) -> dict[str, tuple[bool, dict]]:
    """`{key: (pseudo labels?, changes)}`: the asked rows and the baselines they are compared with."""
    out = {}
    for key in rows:
        changes = ABLATION[key][1]
        out[key] = (True, changes)
        base = baseline_of(changes)
        out[base] = (False, {k: changes[k] for k in BASELINE_FIELDS if k in changes})
    return out


def run_ablation(features: Path, args, out: str) -> None:
    rows = [r for r in args.rows.split(",") if r] or list(ABLATION)
    unknown = sorted(set(rows) - set(ABLATION))
    if unknown:
        raise SystemExit(f"--rows {unknown} not in {list(ABLATION)}")
    seeds = [int(v) for v in args.seeds.split(",")]
    root = Path(args.exp_dir) / "bench_boostmis_ablation"
    shape = dict(labeled=args.labeled, queries=args.queries, iterations=args.iterations, steps=args.steps)
    results = {}
    for key, (pseudo, changes) in configs(rows).items():
        s = settings_of(changes, args.steps)
        for seed in seeds:
            f = root / f"{key}-s{seed}" / "result.json"
            record = dict(pseudo=pseudo, settings=s.to_dict(), seed=seed, **shape)
            if f.is_file() and json.loads(f.read_text())["record"] == record:
                results[key, seed] = json.loads(f.read_text())
                continue
            t = time.perf_counter()
            res = dict(record=record, **ablation_run(features, f.parent / "run", s, pseudo, seed, **shape))
            res["minutes"] = (time.perf_counter() - t) / 60
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(json.dumps(res))
            results[key, seed] = res
            print(f"{key} seed {seed}: final accuracy {res['rounds'][-1]['accuracy']:.4f} "
                  f"({60 * res['minutes']:.0f}s)", flush=True)
    Path(out).write_text(ablation_table(results, rows, seeds, args, out))
    print(f"wrote {out}")


def per_class(kept: np.ndarray, right: np.ndarray) -> tuple[str, str]:
    """'a/b/c' strings: accuracy right/kept per pseudo-label class ('-' where none kept) and share kept/all."""
    acc = "/".join(f"{r / k:.2f}" if k else "-" for k, r in zip(kept, right))
    share = "/".join(f"{k / max(kept.sum(), 1):.2f}" for k in kept)
    return acc, share


def ablation_table(results: dict, rows: list[str], seeds: list[int], args, out: str) -> str:
    def final(key):
        return np.array([results[key, s]["rounds"][-1]["accuracy"] for s in seeds])

    def diff(key, base):
        d = np.array([np.subtract(results[key, s]["correct"], results[base, s]["correct"]) for s in seeds])
        m, lo, hi = bootstrap_ci(d)
        return f"{m:+.3f} [{lo:+.3f}, {hi:+.3f}]"

    lines = ["# BoostMIS ablation on generated feature vectors (issue 27.2)", "",
             "Generated data as in boostmis_issue16.md (3 classes 60/30/10 %, D = 128, train 2000, test 1000). "
             f"{args.labeled} first expert labels, {args.queries} random queries a round, {args.iterations + 1} "
             f"rounds of {args.steps} updates, seeds {args.seeds}. Accuracy of the EMA head on the test split after "
             "the last round (mean +- std over seeds). Differences: paired per test item and seed against the "
             "no-pseudo-label run with the same first labels, optimizer, EMA decay and head policy (its accuracy "
             "in the 'baseline' column), and against the starting configuration's no-pseudo-label run; 95 % "
             "bootstrap intervals "
             "(dsal_tf.compare.bootstrap_ci: seeds, then test items). Pseudo-label accuracy and share: the kept "
             "pseudo labels of all rounds, per predicted class 0/1/2 (accuracy = right / kept, share = kept / all "
             "kept; the pool is about 0.60/0.30/0.10). Kept per round: pseudo labels learned in a round, summed "
             "over its updates' unlabelled batches (64 each), mean over rounds and seeds.", "",
             f"Command: `python bench/bench_boostmis.py --ablation --seeds {args.seeds} --iterations "
             f"{args.iterations} --steps {args.steps}" + (f" --rows {args.rows}" if args.rows else "") + "`", "",
             "| row | final accuracy | baseline (no pseudo labels) | difference vs. that baseline | difference vs. "
             "the start's baseline | kept per round | PL accuracy per class | PL share per class |",
             "|---|---|---|---|---|---|---|---|"]
    today_base = baseline_of({})
    for key in rows:
        label, changes = ABLATION[key]
        base = baseline_of(changes)
        kept = sum(np.array(results[key, s]["rounds"][r]["pl_kept"]) for s in seeds
                   for r in range(len(results[key, s]["rounds"])))
        right = sum(np.array(results[key, s]["rounds"][r]["pl_correct"]) for s in seeds
                    for r in range(len(results[key, s]["rounds"])))
        n_rounds = len(seeds) * len(results[key, seeds[0]]["rounds"])
        acc, share = per_class(kept, right)
        vs_today = diff(key, today_base) if (today_base, seeds[0]) in results else "-"
        lines.append(f"| {label} | {final(key).mean():.3f} +- {final(key).std(ddof=1) if len(seeds) > 1 else 0:.3f} "
                     f"| {final(base).mean():.3f} ({base}) | {diff(key, base)} | {vs_today} | "
                     f"{kept.sum() / n_rounds:.0f} | {acc} | {share} |")
    lines += ["", "## Pseudo labels per round (all seeds pooled): accuracy / share per class, test accuracy", "",
              "| row | " + " | ".join(f"round {r}" for r in range(args.iterations + 1)) + " |",
              "|---|" + "---|" * (args.iterations + 1)]
    for key in rows:
        cells = []
        for r in range(args.iterations + 1):
            kept = sum(np.array(results[key, s]["rounds"][r]["pl_kept"]) for s in seeds)
            right = sum(np.array(results[key, s]["rounds"][r]["pl_correct"]) for s in seeds)
            acc, share = per_class(kept, right)
            test = np.mean([results[key, s]["rounds"][r]["accuracy"] for s in seeds])
            cells.append(f"{acc} / {share}, {test:.3f}")
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    minutes = sum(v["minutes"] for v in results.values())
    lines += ["", f"Runs: {len(results)} ({minutes:.1f} minutes of compute as recorded when each ran).", ""]
    return "\n".join(lines)
