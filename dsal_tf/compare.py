"""Strategies side by side: same data, split, seeds and budget; one run folder each.

Layout (`exp/<name>/`):
    init-s<seed>/          the initial model of each seed, trained once and shared by strategies
    <strategy>-s<seed>/    one active-learning run (resumable, evaluated on the test split)
    full-s<seed>/          full supervision on the whole pool (the reference)
    comparison.csv         per strategy and round: mean and std over seeds of test Dice, IoU, HD95
    summary.csv            per strategy: final Dice, area under the learning curve, wall time
    spearman.csv           per strategy and round: Spearman(uncertainty, 1 - true Dice) on the pool
    learning_curves.png    test Dice against expert labels, a line and a std band per strategy
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from .config import Config
from .data import find_pairs


def full_supervision_config(cfg: Config, exp_name: str | None = None) -> Config:
    """Every pool image labelled, no query rounds, the same total number of epochs."""
    pool = len(find_pairs(cfg.data_path, "train", cfg.mask_naming))
    if cfg.pool_size:
        pool = min(pool, cfg.pool_size)
    return cfg.replace(
        nb_labeled=pool, nb_iterations=0, pseudo_policy="none",
        nb_initial_epochs=cfg.nb_initial_epochs + cfg.nb_iterations * cfg.nb_active_epochs,
        exp_name=exp_name or f"{cfg.preset}-full-s{cfg.seed}",
    )


def _evaluated(cfg: Config, log) -> pd.DataFrame:
    """The run's evaluation table, recomputed only when a round finished after the last one."""
    from .evaluate import evaluate_run

    run = cfg.run_dir
    table = run / "evaluation.csv"
    dones = list(run.glob("round_*/DONE"))
    if table.is_file() and all(d.stat().st_mtime <= table.stat().st_mtime for d in dones):
        return pd.read_csv(table)
    return evaluate_run(cfg, log=log)


def spearman_table(run: Path) -> list[dict]:
    """Per round: how well the uncertainty predicts the real error (1 - true Dice) on the pool."""
    from scipy.stats import spearmanr

    rows = []
    for scores in sorted(run.glob("round_*/scores.csv")):
        s = pd.read_csv(scores)
        if s["uncertainty"].nunique() < 2:
            rho = float("nan")  # random has no uncertainty to rank by
        else:
            rho = float(spearmanr(s["uncertainty"], 1.0 - s["true_dice"]).statistic)
        rows.append({"round": int(scores.parent.name.split("_")[1]), "spearman": rho})
    return rows


def aulc(n_labels: np.ndarray, dice: np.ndarray) -> float:
    """Area under the Dice-vs-labels curve, normalized by the label range (a mean Dice)."""
    n_labels, dice = np.asarray(n_labels, float), np.asarray(dice, float)
    if len(n_labels) < 2 or n_labels[-1] == n_labels[0]:
        return float(dice.mean())
    return float(np.trapezoid(dice, n_labels) / (n_labels[-1] - n_labels[0]))


def run_comparison(
    cfg: Config,
    strategies: list[str],
    seeds: list[int],
    name: str,
    full_supervision: bool = True,
    log: Callable[[str], None] = print,
) -> pd.DataFrame:
    """Run every (strategy, seed) pair that is not finished yet, then aggregate all of them."""
    from .active import run_active_learning

    for seed in seeds:
        init = cfg.replace(seed=seed, nb_iterations=0, query_strategy="random", exp_name=f"{name}/init-s{seed}")
        run_active_learning(init, log=log)
        for strategy in strategies:
            scfg = cfg.replace(seed=seed, query_strategy=strategy, exp_name=f"{name}/{strategy}-s{seed}")
            log(f"== {strategy}, seed {seed}")
            run_active_learning(scfg, log=log, initial_model=init.run_dir / "round_00")
        if full_supervision:
            fcfg = full_supervision_config(cfg.replace(seed=seed), exp_name=f"{name}/full-s{seed}")
            log(f"== full supervision, seed {seed}")
            run_active_learning(fcfg, log=log)
    return aggregate(Path(cfg.exp_dir) / name, log)


def finished_runs(out: Path) -> tuple[list, list]:
    """Every finished `<strategy>-s<seed>` and `full-s<seed>` run in a comparison folder, so a
    comparison grown over several calls (more seeds, more strategies) is summarized as a whole."""
    from .active import completed_rounds

    runs, full_runs = [], []
    for run in sorted(p for p in out.glob("*-s*") if (p / "config.json").is_file()):
        strategy, _, seed = run.name.rpartition("-s")
        if strategy == "init" or not seed.isdigit():
            continue
        cfg = resolve_run(run)
        if completed_rounds(run) != list(range(cfg.nb_iterations + 1)):
            continue  # still running or interrupted: left out until it finishes
        (full_runs.append((int(seed), cfg)) if strategy == "full" else runs.append((strategy, int(seed), cfg)))
    return sorted(runs, key=lambda r: (r[0], r[1])), full_runs


def resolve_run(run: Path) -> Config:
    """The configuration a run folder was made with."""
    import json

    from .config import resolve

    return resolve(json.loads((run / "config.json").read_text()), source=str(run / "config.json"))


def aggregate(out: Path, log) -> pd.DataFrame:
    runs, full_runs = finished_runs(out)
    per_run, summary_rows, rho_rows = [], [], []
    for strategy, seed, scfg in runs:
        table = _evaluated(scfg, log).assign(strategy=strategy, seed=seed)
        per_run.append(table)
        curve = pd.read_csv(scfg.run_dir / "learning_curve.csv")
        active = curve[curve["round"] > 0]
        summary_rows.append({
            "strategy": strategy, "seed": seed,
            "final_dice": float(table["dice_mean"].iloc[-1]),
            "final_n_oracle": int(table["n_oracle"].iloc[-1]),
            "aulc": aulc(table["n_oracle"], table["dice_mean"]),
            "train_s": float(active["train_s"].sum()), "score_s": float(active["score_s"].sum()),
        })
        rho_rows += [{"strategy": strategy, "seed": seed, **r} for r in spearman_table(scfg.run_dir)]
    for seed, fcfg in full_runs:
        table = _evaluated(fcfg, log)
        curve = pd.read_csv(fcfg.run_dir / "learning_curve.csv")
        summary_rows.append({"strategy": "full", "seed": seed, "final_dice": float(table["dice_mean"].iloc[-1]),
                             "final_n_oracle": int(table["n_oracle"].iloc[-1]),
                             "aulc": float("nan"), "train_s": float(curve["train_s"].sum()), "score_s": 0.0})
    out.mkdir(parents=True, exist_ok=True)
    metrics = ["dice_mean", "iou_mean", "hd95_mean"]
    long = pd.concat(per_run, ignore_index=True)
    comparison = (long.groupby(["strategy", "round"])
                  .agg(n_oracle=("n_oracle", "first"), n_pseudo=("n_pseudo", "first"),
                       **{f"{m.split('_')[0]}_{s}": (m, s) for m in metrics for s in ("mean", "std")})
                  .reset_index())
    comparison.to_csv(out / "comparison.csv", index=False, float_format="%.4f")
    summary = (pd.DataFrame(summary_rows).groupby("strategy")
               .agg(final_dice_mean=("final_dice", "mean"), final_dice_std=("final_dice", "std"),
                    n_oracle=("final_n_oracle", "first"), aulc_mean=("aulc", "mean"), aulc_std=("aulc", "std"),
                    train_s=("train_s", "mean"), score_s=("score_s", "mean"), seeds=("seed", "count"))
               .reset_index())
    summary.to_csv(out / "summary.csv", index=False, float_format="%.4f")
    if rho_rows:
        rho = pd.DataFrame(rho_rows).groupby(["strategy", "round"])["spearman"].agg(["mean", "std"]).reset_index()
        rho.to_csv(out / "spearman.csv", index=False, float_format="%.4f")
    full = summary[summary["strategy"] == "full"]
    plot_comparison(comparison, full, out / "learning_curves.png")
    log(summary.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    log(f"wrote {out}/comparison.csv, summary.csv, spearman.csv and learning_curves.png")
    return summary


def plot_comparison(comparison: pd.DataFrame, full: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for strategy, g in comparison.groupby("strategy"):
        std = g["dice_std"].fillna(0)
        ax.plot(g["n_oracle"], g["dice_mean"], marker="o", label=strategy)
        ax.fill_between(g["n_oracle"], g["dice_mean"] - std, g["dice_mean"] + std, alpha=0.2)
    if len(full):
        ax.axhline(float(full["final_dice_mean"].iloc[0]), color="k", ls="--",
                   label=f"full supervision ({int(full['n_oracle'].iloc[0])} labels)")
    ax.set_xlabel("expert (oracle) labels")
    ax.set_ylabel("test Dice")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
