"""Strategies side by side: same data, split, seeds and budget; one run folder each.

Rows are strategy specs: a query strategy name, optionally `+<selection>` (`dsal+diverse` is DSAL
with SELECTION = "diverse"; also `+rank`, `+histogram`, `+power`) and `@<variant>`, a named set of
settings from `VARIANTS` (`dsal@minfg`: PSEUDO_MIN_FOREGROUND = 0.01; `dsal@pre8`: the pre-issue-8
U-Net; `dsal@reference`: the DSAL reference code's data settings). A variant that changes the model or the
data round 0 trains on (`INIT_FIELDS`: greyscale input is a one-channel model) gets its own initial model per
seed (`init@<variant>-s<seed>`); every other row starts from the shared one. Each row runs with its strategy's own
weak labeler (PSEUDO_POLICY = "auto": CEAL's bins for `ceal`, DSAL's confidence rule otherwise)
unless `pseudo` names one policy for every row.

Layout (`exp/<name>/`):
    init-s<seed>/          the initial model of each seed, trained once and shared by strategies
    <spec>-s<seed>/        one active-learning run (resumable, evaluated on the test split)
    full-s<seed>/          full supervision on the whole pool (the reference)
    comparison.csv         per strategy and round: mean and std over seeds of test Dice, IoU, HD95
    summary.csv            per strategy: weak labeler, selection, final Dice, area under the
                           learning curve (AULC), wall time
    differences.csv        paired differences against the baseline (final Dice, AULC) and against
                           full supervision (final Dice): per seed and pooled, with bootstrap 95%
                           intervals over test images and seeds; `outside_noise` = 0 not inside
    spearman.csv           per strategy, round and seed, on the scored pool (`score_table`): Spearman(uncertainty,
                           1 - true Dice); Spearman(uncertainty, predicted foreground); the partial Spearman
                           of uncertainty and 1 - true Dice given the foreground; the oracle picks' mean
                           predicted foreground and the pool's (docs/methods.md#dsal-and-lesion-size)
    learning_curves.png    test Dice against expert labels, a line and a std band per strategy
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from .active import run_active_learning
from .components import pseudo_name
from .config import Config
from .errors import DsalError
from .evaluate import evaluate_run
from .run import SCORES, Run
from .space import space_for
from .strategies import QUERY_STRATEGIES, SELECTIONS

# named ablation rows: settings that differ from the comparison's in exactly the stated way
VARIANTS: dict[str, dict] = {
    "minfg": {"pseudo_min_foreground": 0.01},  # the weak labeler skips (near-)empty predictions
    "pre8": {"side_upsampling": "bilinear", "dropout_at": "bottleneck+deepest"},  # the pre-issue-8 U-Net
    "boostmis-trainer": {"trainer": "boostmis"},  # adaptive pixel pseudo labels over the unlabelled pool
    "fgonly": {"random_fg_share": 1.0},  # random_fg: every pick among the items with predicted foreground
    # the DSAL reference code's data settings (the isic2017 preset's): greyscale, /255, no augmentation, batch Dice
    "reference": {"color": "gray", "normalization": "unit", "augment": False, "batch_dice": True},
}
# settings that change the network itself; COLOR sets its input channels (3 for rgb, 1 for gray)
MODEL_FIELDS = ("base_filters", "depth", "dropout", "side_upsampling", "dropout_at", "norm", "color")
# ... and those that change what round 0 trains on: a row changing any of them cannot share the initial model
INIT_FIELDS = (*MODEL_FIELDS, "img_rows", "img_cols", "normalization", "augment", "loss", "batch_dice", "ds_weights")
BOOTSTRAP_REPS = 2000


def parse_strategy_spec(spec: str) -> dict:
    """`dsal` -> {query_strategy: dsal}; `dsal+diverse` -> also {selection: diverse};
    `dsal@pre8` -> also the `VARIANTS["pre8"]` settings."""

    spec, _, variant = spec.partition("@")
    if variant and variant not in VARIANTS:
        raise DsalError(f"--strategies: unknown variant @{variant}; use one of "
                        f"{['@' + v for v in VARIANTS]}, e.g. dsal@minfg")
    name, _, selection = spec.partition("+")
    if name not in QUERY_STRATEGIES:
        raise DsalError(f"--strategies: unknown strategy {name!r} in {spec!r}; choose from "
                        f"{sorted(QUERY_STRATEGIES)}, optionally +{'/+'.join(SELECTIONS)}")
    if selection and selection not in SELECTIONS:
        raise DsalError(f"--strategies: unknown selection {selection!r} in {spec!r}; "
                        f"use one of {sorted(SELECTIONS)}, e.g. dsal+diverse")
    return {"query_strategy": name, **({"selection": selection} if selection else {}),
            **VARIANTS.get(variant, {})}


def initial_changes(cfg: Config, overrides: dict) -> dict:
    """The settings of a row (`parse_strategy_spec`) that its initial model must be trained with, as they
    differ from the comparison's `cfg`; empty when the row can start from the shared initial model."""
    return {k: v for k, v in overrides.items() if k in INIT_FIELDS and getattr(cfg, k) != v}


def parse_strategy_list(text: str) -> list[str]:
    """Comma-separated strategy specs, each checked before any data is written."""
    specs = [s.strip() for s in text.split(",") if s.strip()]
    for s in specs:
        parse_strategy_spec(s)
    return specs


def full_supervision_config(cfg: Config, exp_name: str | None = None) -> Config:
    """Every pool image labelled, no query rounds, the same total number of epochs."""
    pool = space_for(cfg).pool_size()
    return cfg.replace(
        nb_labeled=pool, nb_iterations=0, pseudo_policy="none",
        nb_initial_epochs=cfg.nb_initial_epochs + cfg.nb_iterations * cfg.nb_active_epochs,
        exp_name=exp_name or f"{cfg.preset}-full-s{cfg.seed}",
    )


def _evaluated(cfg: Config, log) -> pd.DataFrame:
    """The run's evaluation table, recomputed only when a round finished after the last one."""
    run = Run.of(cfg)
    table = run.evaluation_file
    dones = run.done_files()
    if table.is_file() and all(d.stat().st_mtime <= table.stat().st_mtime for d in dones):
        saved = pd.read_csv(table)
        if "hd95_penalized_mean" in saved:  # else written before the column existed: evaluate again
            return saved
    return evaluate_run(cfg, log=log)


def spearman_table(run: Path) -> list[dict]:
    """Per round: how well the uncertainty predicts the real error (1 - true Dice) on the pool."""
    return [{"round": row["round"], "spearman": row["spearman"]} for row in score_table(run)]


def score_table(run: Path) -> list[dict]:
    """Per round of a run, from its scores.csv: `spearman` (uncertainty against 1 - true Dice) and
    `size_bias`'s columns (NaN where a scores.csv predates the `foreground` column)."""
    folder = Run(run)
    rows = []
    for r in folder.rounds_with(SCORES):
        s = pd.read_csv(folder.scores_file(r))
        if s["uncertainty"].nunique() < 2:
            rho = float("nan")  # random has no uncertainty to rank by
        else:
            rho = _spearman(s["uncertainty"], 1.0 - s["true_dice"])
        rows.append({"round": r, "spearman": rho, **size_bias(s)})
    return rows


def size_bias(scores: pd.DataFrame) -> dict:
    """Does a round's score follow the predicted lesion size? From one scores.csv frame:

    - `spearman_fg`: Spearman(uncertainty, predicted foreground fraction);
    - `partial_spearman_fg`: `partial_spearman`(uncertainty, 1 - true Dice | foreground), how well the
      score predicts the error beyond size (over the rows where all three are known);
    - `picks_fg`, `pool_fg`: the mean predicted foreground of the oracle's picks and of the scored pool.

    All NaN without a `foreground` column (scores.csv written before it existed)."""
    nan = float("nan")
    if "foreground" not in scores:
        return {"spearman_fg": nan, "partial_spearman_fg": nan, "picks_fg": nan, "pool_fg": nan}
    fg, u = scores["foreground"].to_numpy(float), scores["uncertainty"].to_numpy(float)
    err = 1.0 - scores["true_dice"].to_numpy(float)
    known = np.isfinite(u) & np.isfinite(err) & np.isfinite(fg)
    picks = (scores["chosen"] == "oracle").to_numpy() if "chosen" in scores else np.zeros(len(scores), bool)
    return {"spearman_fg": _spearman(u, fg),
            "partial_spearman_fg": partial_spearman(u[known], err[known], fg[known]),
            "picks_fg": float(fg[picks].mean()) if picks.any() else nan,
            "pool_fg": float(fg.mean()) if len(fg) else nan}


def _spearman(x, y) -> float:
    """Spearman's rho with average ranks for ties; NaN when either side is constant or empty."""
    r = _rank_correlations(np.asarray(x, float), np.asarray(y, float))
    return float(r[0, 1])


def _rank_correlations(*columns: np.ndarray) -> np.ndarray:
    """The Pearson correlations of the columns' average ranks (Spearman's rho), NaN where undefined."""
    from scipy.stats import rankdata

    if len(columns[0]) < 2:
        return np.full((len(columns), len(columns)), np.nan)
    ranks = np.stack([rankdata(c) for c in columns])
    centred = ranks - ranks.mean(axis=1, keepdims=True)
    scale = np.outer(*2 * [np.sqrt((centred ** 2).sum(axis=1))])
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(scale > 0, (centred @ centred.T) / scale, np.nan)


def partial_spearman(x, y, z) -> float:
    """The Spearman correlation of `x` and `y` with `z` held fixed: the partial-correlation formula on the
    three Spearman coefficients, (r_xy - r_xz r_yz) / sqrt((1 - r_xz^2)(1 - r_yz^2)). It is the same number
    as the Pearson correlation of the residuals of rank(x) and rank(y) after a straight-line fit on rank(z).
    NaN when undefined: a constant column, or x or y ranked exactly like z."""
    r = _rank_correlations(np.asarray(x, float), np.asarray(y, float), np.asarray(z, float))
    rxy, rxz, ryz = r[0, 1], r[0, 2], r[1, 2]
    denominator = (1.0 - rxz ** 2) * (1.0 - ryz ** 2)
    if not np.isfinite(denominator) or denominator <= 1e-12:
        return float("nan")
    return float(np.clip((rxy - rxz * ryz) / np.sqrt(denominator), -1.0, 1.0))


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
    pseudo: str | None = None,
    baseline: str = "random",
) -> pd.DataFrame:
    """Run every (strategy spec, seed) pair that is not finished yet, then aggregate all of them.

    `pseudo`: one weak labeler for every row (default: each strategy's own)."""
    specs = {s: parse_strategy_spec(s) for s in strategies}
    base = cfg.replace(pseudo_policy=pseudo or "auto", selection="auto")
    for seed in seeds:
        # the initial model takes no pseudo labels and makes no query: one per seed, whatever `pseudo`
        init = base.replace(seed=seed, nb_iterations=0, query_strategy="random", pseudo_policy="auto",
                            exp_name=f"{name}/init-s{seed}")
        run_active_learning(init, log=log)
        for spec, overrides in specs.items():
            start = init
            changes = initial_changes(init, overrides)
            if changes:  # another network, or other inputs, cannot start from the shared initial model
                variant = spec.partition("@")[2]
                start = init.replace(exp_name=f"{name}/init@{variant}-s{seed}", **changes)
                run_active_learning(start, log=log)
            scfg = base.replace(seed=seed, exp_name=f"{name}/{spec}-s{seed}", **overrides)
            log(f"== {spec}, seed {seed}")
            run_active_learning(scfg, log=log, initial_model=Run.of(start).round_dir(0))
        if full_supervision:
            fcfg = full_supervision_config(base.replace(seed=seed), exp_name=f"{name}/full-s{seed}")
            log(f"== full supervision, seed {seed}")
            run_active_learning(fcfg, log=log)
    return aggregate(Path(cfg.exp_dir) / name, log, baseline)


def finished_runs(out: Path) -> tuple[list, list]:
    """Every finished `<strategy>-s<seed>` and `full-s<seed>` run in a comparison folder, so a
    comparison grown over several calls (more seeds, more strategies) is summarized as a whole."""
    runs, full_runs = [], []
    for run in sorted(p for p in out.glob("*-s*") if Run(p).config_file.is_file()):
        strategy, _, seed = run.name.rpartition("-s")
        if strategy.partition("@")[0] == "init" or not seed.isdigit():
            continue
        cfg = resolve_run(run)
        if Run(run).completed() != list(range(cfg.nb_iterations + 1)):
            continue  # still running or interrupted: left out until it finishes
        (full_runs.append((int(seed), cfg)) if strategy == "full" else runs.append((strategy, int(seed), cfg)))
    return sorted(runs, key=lambda r: (r[0], r[1])), full_runs


def resolve_run(run: Path) -> Config:
    """The configuration a run folder was made with."""
    return Run(run).saved_config()


def per_image_dice(run: Path) -> tuple[np.ndarray, pd.DataFrame]:
    """(n_oracle per round, test Dice as a [rounds x images] frame, columns = image names) from
    each round's `test_metrics.csv` (written by evaluation)."""
    folder = Run(run)
    curve = pd.read_csv(folder.curve_file).sort_values("round")
    rows = {}
    for r in curve["round"]:
        per_image = pd.read_csv(folder.test_metrics(int(r)))
        rows[int(r)] = per_image.set_index("name")["dice"]
    return curve["n_oracle"].to_numpy(float), pd.DataFrame(rows).T.sort_index()


def image_aulc(n_labels: np.ndarray, dice: np.ndarray) -> np.ndarray:
    """`aulc` of every column of `dice` [rounds, images] at once."""
    dice = np.asarray(dice, float)
    if len(n_labels) < 2 or n_labels[-1] == n_labels[0]:
        return dice.mean(axis=0)
    return np.trapezoid(dice, np.asarray(n_labels, float), axis=0) / (n_labels[-1] - n_labels[0])


def _bootstrap_means(arrays: np.ndarray, reps: int, seed: int) -> np.ndarray:
    """Resampled means `[reps, k]` of the k paired arrays `arrays` [k, seeds, images], every array
    with the same draws: seeds with replacement, then images with replacement inside each drawn seed."""
    a = np.asarray(arrays, float)
    _, n_seeds, n_img = a.shape
    rng = np.random.default_rng(seed)
    s_idx = rng.integers(0, n_seeds, (reps, n_seeds))
    i_idx = rng.integers(0, n_img, (reps, n_seeds, n_img))
    return a[:, s_idx[..., None], i_idx].mean(axis=(2, 3)).T


def bootstrap_ci(diffs: np.ndarray, reps: int = BOOTSTRAP_REPS, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float, float]:
    """Mean of paired differences `diffs` [seeds, images] and its percentile bootstrap interval.

    Two-stage resampling: seeds with replacement, then test images with replacement inside each
    drawn seed (the same image draw for both strategies: the differences are already paired)."""
    d = np.atleast_2d(np.asarray(diffs, float))
    means = _bootstrap_means(d[None], reps, seed)[:, 0]
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return float(d.mean()), float(lo), float(hi)


def bootstrap_ratio_ci(num: np.ndarray, den: np.ndarray, reps: int = BOOTSTRAP_REPS, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float, float]:
    """`mean(num) / mean(den)` of two paired arrays [seeds, images] and its percentile bootstrap
    interval, both means from the same draws (as `bootstrap_ci`'s). For a share of a gap recovered:
    num = row - baseline, den = upper bound - baseline, per image. A draw whose denominator is 0
    gives an infinite ratio and widens the interval to it."""
    n, d = np.atleast_2d(np.asarray(num, float)), np.atleast_2d(np.asarray(den, float))
    if n.shape != d.shape:
        raise ValueError(f"num {n.shape} and den {d.shape} must pair: the same seeds and images")
    means = _bootstrap_means(np.stack([n, d]), reps, seed)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = means[:, 0] / means[:, 1]
    ratios = np.where(np.isnan(ratios), np.inf, ratios)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(ratios, [alpha, 1.0 - alpha])
    return float(n.mean() / d.mean()), float(lo), float(hi)


def paired_differences(curves: dict, baseline: str) -> list[dict]:
    """`curves[(strategy, seed)] = (n_oracle, dice frame)`. Per strategy other than `baseline`,
    on the seeds both have: final-round Dice and AULC differences (strategy - baseline), per
    seed and pooled, with bootstrap intervals. Against `full`, only the final Dice exists."""
    rows = []
    strategies = sorted({s for s, _ in curves} - {baseline})
    for strategy in strategies:
        seeds = sorted(seed for s, seed in curves if s == strategy and (baseline, seed) in curves)
        metrics = ("final_dice",) if "full" in (strategy, baseline) else ("final_dice", "aulc")
        for metric in metrics:
            per_seed = []
            for seed in seeds:
                (n_a, a), (n_b, b) = curves[(strategy, seed)], curves[(baseline, seed)]
                names = a.columns.intersection(b.columns)
                if metric == "final_dice":
                    diff = a[names].iloc[-1].to_numpy() - b[names].iloc[-1].to_numpy()
                else:
                    diff = image_aulc(n_a, a[names].to_numpy()) - image_aulc(n_b, b[names].to_numpy())
                per_seed.append(diff)
                rows.append(_difference_row(strategy, baseline, metric, str(seed), diff))
            if len(per_seed) > 1 and len({len(p) for p in per_seed}) == 1:
                rows.append(_difference_row(strategy, baseline, metric, "all", np.stack(per_seed)))
    return rows


def _difference_row(strategy, baseline, metric, seeds, diffs) -> dict:
    mean, lo, hi = bootstrap_ci(diffs)
    return {"strategy": strategy, "baseline": baseline, "metric": metric, "seeds": seeds,
            "diff": mean, "ci_low": lo, "ci_high": hi, "outside_noise": bool(lo > 0 or hi < 0)}


def aggregate(out: Path, log, baseline: str = "random") -> pd.DataFrame:

    runs, full_runs = finished_runs(out)
    per_run, summary_rows, rho_rows, curves = [], [], [], {}
    for strategy, seed, scfg in runs:
        table = _evaluated(scfg, log).assign(strategy=strategy, seed=seed)
        per_run.append(table)
        curves[(strategy, seed)] = per_image_dice(scfg.run_dir)
        curve = pd.read_csv(Run.of(scfg).curve_file)
        active = curve[curve["round"] > 0]
        summary_rows.append({
            "strategy": strategy, "pseudo": pseudo_name(scfg), "selection": scfg.selection, "seed": seed,
            "final_dice": float(table["dice_mean"].iloc[-1]),
            "final_hd95p": float(table["hd95_penalized_mean"].iloc[-1]),
            "final_n_oracle": int(table["n_oracle"].iloc[-1]),
            "aulc": aulc(table["n_oracle"], table["dice_mean"]),
            "train_s": float(active["train_s"].sum()), "score_s": float(active["score_s"].sum()),
        })
        if scfg.query_strategy != "random":  # random's scores only rank its pseudo labels
            rho_rows += [{"strategy": strategy, "seed": seed, **r} for r in score_table(scfg.run_dir)]
    for seed, fcfg in full_runs:
        table = _evaluated(fcfg, log)
        curves[("full", seed)] = per_image_dice(fcfg.run_dir)
        curve = pd.read_csv(Run.of(fcfg).curve_file)
        summary_rows.append({"strategy": "full", "pseudo": "none", "selection": "-", "seed": seed,
                             "final_dice": float(table["dice_mean"].iloc[-1]),
                             "final_hd95p": float(table["hd95_penalized_mean"].iloc[-1]),
                             "final_n_oracle": int(table["n_oracle"].iloc[-1]),
                             "aulc": float("nan"), "train_s": float(curve["train_s"].sum()), "score_s": 0.0})
    out.mkdir(parents=True, exist_ok=True)
    metrics = ["dice_mean", "iou_mean", "hd95_mean", "hd95_penalized_mean"]
    long = pd.concat(per_run, ignore_index=True)
    comparison = (long.groupby(["strategy", "round"])
                  .agg(n_oracle=("n_oracle", "first"), n_pseudo=("n_pseudo", "first"),
                       **{f"{m.removesuffix('_mean')}_{s}": (m, s) for m in metrics for s in ("mean", "std")})
                  .reset_index())
    comparison.to_csv(out / "comparison.csv", index=False, float_format="%.4f")
    summary = (pd.DataFrame(summary_rows).groupby("strategy")
               .agg(pseudo=("pseudo", "first"), selection=("selection", "first"),
                    final_dice_mean=("final_dice", "mean"), final_dice_std=("final_dice", "std"),
                    final_hd95p_mean=("final_hd95p", "mean"),
                    n_oracle=("final_n_oracle", "first"), aulc_mean=("aulc", "mean"), aulc_std=("aulc", "std"),
                    train_s=("train_s", "mean"), score_s=("score_s", "mean"), seeds=("seed", "count"))
               .reset_index())
    summary.to_csv(out / "summary.csv", index=False, float_format="%.4f")
    diff_rows = paired_differences({k: v for k, v in curves.items() if k[0] != "full"}, baseline)
    diff_rows += paired_differences(curves, "full")  # every strategy's final Dice against full supervision
    differences = pd.DataFrame(diff_rows, columns=["strategy", "baseline", "metric", "seeds", "diff", "ci_low",
                                                   "ci_high", "outside_noise"])
    differences.to_csv(out / "differences.csv", index=False, float_format="%.4f")
    if rho_rows:
        rho = pd.DataFrame(rho_rows)[["strategy", "round", "seed", "spearman", "spearman_fg", "partial_spearman_fg",
                                      "picks_fg", "pool_fg"]].sort_values(["strategy", "round", "seed"])
        rho.to_csv(out / "spearman.csv", index=False, float_format="%.4f")
    full = summary[summary["strategy"] == "full"]
    plot_comparison(comparison, full, out / "learning_curves.png")
    log(summary.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    pooled = differences[differences["seeds"].isin(["all"]) | ~differences.duplicated(
        ["strategy", "baseline", "metric"], keep=False)]
    if len(pooled):
        log("paired differences (bootstrap 95% interval over test images and seeds):")
        log(pooled.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    log(f"wrote {out}/comparison.csv, summary.csv, differences.csv, spearman.csv and learning_curves.png")
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
