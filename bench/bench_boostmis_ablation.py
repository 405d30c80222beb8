"""Issue 27.2: BoostMIS's pseudo-label collapse on the generated features, one change at a time.

Run through `python bench/bench_boostmis.py --ablation` (the features and the options are that
script's). Each run is `dsal classify`'s loop (`classify.classify_loop`: one head through the rounds,
a fresh optimizer and `Booster` each round, `steps` updates of batch 64, the EMA head evaluated on the
test split) with random queries, the settings of `trainers.booster.Booster.Settings`, and the
unlabelled targets handed to the Booster for its per-class tally (never learned). No resume inside a
run: a run is seconds; finished runs are skipped by their result.json.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from dsal_tf.classify import NoPseudoLabels, build_head, load_feature_splits, macro_f1
from dsal_tf.compare import bootstrap_ci
from dsal_tf.strategies.boostmis import LearningStatus
from dsal_tf.trainers.booster import Booster, balanced_initial
from dsal_tf.trainers.boostmis import make_optimizer

WARMUP = "one round"  # (g): the first round's updates without pseudo labels (resolved to --steps)
ABLATION = {  # key: (label, Booster.Settings changes); every row has pseudo labels
    "today": ("today: adaptive eps_t, Adam 1e-3, EMA 0.99, online labels, random first labels", {}),
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
}
BASELINE_FIELDS = ("boostmis_initial", "boostmis_optimizer", "ema_decay")  # what a no-pseudo-label run shares


def baseline_of(changes: dict) -> str:
    """The key of the no-pseudo-label run with the same first labels, optimizer and EMA as `changes`."""
    kept = [f"{k.removeprefix('boostmis_')}={changes[k]}" for k in BASELINE_FIELDS if k in changes]
    return "none" + "".join(f"+{k}" for k in kept)


def settings_of(changes: dict, steps: int) -> Booster.Settings:
    values = {k: (steps if v == WARMUP else v) for k, v in changes.items()}
    s = replace(Booster.Settings(), **values)
    s.check()
    return s


def ablation_run(data: dict, s: Booster.Settings, pseudo: bool, seed: int, labeled: int, queries: int,
                 iterations: int, steps: int, batch: int = 64) -> dict:
    """One closed loop (random queries); per round accuracy, macro F1 and the pseudo-label tally per
    class, and the final round's per-test-item correctness (for paired intervals)."""
    (x, y), (xt, yt) = data["train"], data["test"]
    n_classes = int(max(y.max(), data["val"][1].max(), yt.max())) + 1
    mean, std = x.mean(0), x.std(0) + 1e-6
    x, xt = (x - mean) / std, (xt - mean) / std
    rng0 = np.random.default_rng([seed, 0])
    labelled = (balanced_initial(y, labeled, rng0) if s.boostmis_initial == "balanced"
                else np.sort(rng0.choice(len(x), labeled, replace=False)))  # classify_loop's draw
    keras.utils.set_random_seed(seed * 1000)
    head = build_head(x.shape[1], n_classes)
    ema_head = keras.Model.from_config(head.get_config())
    ema_head.set_weights(head.get_weights())
    ema_head.trainable = False
    rounds, previous = [], None
    for r in range(iterations + 1):
        n_added = len(labelled) - len(previous) if previous is not None else 0
        unl = np.setdiff1d(np.arange(len(x)), labelled)
        keras.utils.set_random_seed(seed * 1000 + r)
        rule = (LearningStatus(n_classes, s.boostmis_tau, n_added, max(queries, 1), rule=s.boostmis_threshold,
                               cutoff=s.boostmis_cutoff) if pseudo else NoPseudoLabels(n_classes, n_added, queries))
        optimizer, wd = make_optimizer(s.boostmis_optimizer)
        p_target = np.bincount(y[labelled], minlength=n_classes) / len(labelled) if s.boostmis_align else None
        booster = Booster(head, ema_head, rule, s.ema_decay, seed * 1000 + r, step0=r * steps,
                          labeller=s.boostmis_labeller, warmup=s.boostmis_warmup, weight_decay=wd, p_target=p_target)
        booster.compile(optimizer=optimizer)
        lab = tf.data.Dataset.from_tensor_slices((x[labelled], y[labelled])).repeat().shuffle(4096, seed=seed)
        ulb = tf.data.Dataset.from_tensor_slices((x[unl], y[unl])).repeat().shuffle(4096, seed=seed + 1)
        ds = tf.data.Dataset.zip((ulb.batch(batch), lab.batch(batch))).take(steps)
        booster.fit(ds, epochs=1, verbose=0, shuffle=False)
        pred = ema_head(xt, training=False)["prob"].numpy().argmax(1)
        kept, right = booster.pl_kept.numpy(), booster.pl_correct.numpy()
        rounds.append(dict(round=r, n_labelled=len(labelled), accuracy=float(np.mean(pred == yt)),
                           macro_f1=macro_f1(yt, pred, n_classes), pl_kept=kept.tolist(), pl_correct=right.tolist(),
                           first_labels=np.bincount(y[labelled], minlength=n_classes).tolist()))
        picks = np.random.default_rng([seed, r + 1]).permutation(len(unl))[:queries]  # classify's `random`
        previous, labelled = labelled, np.sort(np.r_[labelled, unl[picks]])
    return dict(rounds=rounds, correct=(pred == yt).astype(np.int8).tolist())


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
    data = load_feature_splits(features)
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
            res = dict(record=record, **ablation_run(data, s, pseudo, seed, **shape))
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
             "no-pseudo-label run with the same first labels, optimizer and EMA decay (its accuracy in the "
             "'baseline' column), and against today's no-pseudo-label run; 95 % bootstrap intervals "
             "(dsal_tf.compare.bootstrap_ci: seeds, then test items). Pseudo-label accuracy and share: the kept "
             "pseudo labels of all rounds, per predicted class 0/1/2 (accuracy = right / kept, share = kept / all "
             "kept; the pool is about 0.60/0.30/0.10). Kept per round: pseudo labels learned in a round, summed "
             "over its updates' unlabelled batches (64 each), mean over rounds and seeds.", "",
             f"Command: `python bench/bench_boostmis.py --ablation --seeds {args.seeds} --iterations "
             f"{args.iterations} --steps {args.steps}" + (f" --rows {args.rows}" if args.rows else "") + "`", "",
             "| row | final accuracy | baseline (no pseudo labels) | difference vs. that baseline | difference vs. "
             "today's baseline | kept per round | PL accuracy per class | PL share per class |",
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
