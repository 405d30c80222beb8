"""Test-split evaluation of every round: per-image Dice, IoU, HD95 and ASD, tables and plots.

Writes into the run folder:
    evaluation.csv            one row per round: n_oracle, n_pseudo, mean and std of each metric,
                              and `n_undefined`: test images whose HD95/ASD is undefined (exactly
                              one of prediction and ground truth empty), left out of those means
    round_XX/test_metrics.csv per test image
    learning_curve.png        test Dice against the number of expert labels
    overlays/round_XX.png     first and last round: NB_OVERLAYS test items with ground-truth (green) and
                              prediction (red) contours (a volume: three planes, `overlays.py`)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from .config import Config
from .data import Normalizer, Split
from .errors import DsalError
from .files import atomic_write
from .metrics import batch_metrics
from .overlays import write_grid
from .run import Run, round_name
from .space import eval_batch_size, predict_main, space_for  # noqa: F401 (predict_main re-exported)

METRICS = ("dice", "iou", "hd95", "asd", "hd95_penalized")


def saved_config(cfg: Config) -> Config:
    """The configuration a run was made with (image size, data, ...), not today's constants."""
    return Run.of(cfg).saved_config(progress=cfg.progress)


def summarize(per_image: pd.DataFrame) -> dict[str, float]:
    """Mean and std of each metric. HD95/ASD are undefined (nan) when exactly one mask is empty;
    those images are left out of the surface means and counted in `n_undefined` (Dice and IoU
    count them, as 0). All-nan columns give nan, not a warning."""
    out: dict[str, float] = {}
    for m in METRICS:
        if m not in per_image:  # a table written before the metric existed
            continue
        v = per_image[m].to_numpy(float)
        v = v[~np.isnan(v)]
        out[f"{m}_mean"] = float(v.mean()) if len(v) else float("nan")
        out[f"{m}_std"] = float(v.std()) if len(v) else float("nan")
    out["n_undefined"] = int(per_image["hd95"].isna().sum())
    return out


def evaluate_model(model, test: Split, normalizer: Normalizer, batch_size: int) -> tuple[pd.DataFrame, np.ndarray]:
    prob = predict_main(model, test.images, normalizer, batch_size)
    pred = (prob > 0.5).astype(np.uint8)
    per_image = pd.DataFrame({"name": test.names, **batch_metrics(test.masks, pred)})
    return per_image, pred


def plot_curve(table: pd.DataFrame, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.errorbar(table["n_oracle"], table["dice_mean"], yerr=table["dice_std"], marker="o", capsize=3)
    ax.set_xlabel("expert (oracle) labels")
    ax.set_ylabel("test Dice")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def evaluate_run(cfg: Config, rounds: list[int] | None = None, log: Callable[[str], None] = print) -> pd.DataFrame:
    cfg = saved_config(cfg)
    folder = Run.of(cfg)
    run = folder.path
    available = folder.completed()
    if not available:
        raise DsalError(f"{run} has no finished round yet; run: python main.py --exp {cfg.name}")
    rounds = available if rounds is None else rounds
    missing = sorted(set(rounds) - set(available))
    if missing:
        raise DsalError(f"round {missing[0]} of {run} is not finished; finished rounds: {available}")
    space = space_for(cfg)
    test = space.load_splits(("test",))["test"]
    normalizer = folder.normalizer()
    curve = pd.read_csv(folder.curve_file).set_index("round")
    rows = []
    model = None
    for r in rounds:
        if model is None:
            model = folder.load_model(r)
        else:  # same architecture every round: swap weights, keep the traced predict graph
            model.load_weights(folder.checkpoint(r))
        per_image, pred = space.evaluate(model, test, normalizer)
        atomic_write(folder.test_metrics(r), lambda tmp: per_image.to_csv(tmp, index=False))
        rows.append({"round": r, "n_oracle": int(curve.loc[r, "n_oracle"]),
                     "n_pseudo": int(curve.loc[r, "n_pseudo"]), **summarize(per_image)})
        if r in (rounds[0], rounds[-1]) and cfg.nb_overlays:
            write_grid(space.overlay_rows(test, pred, cfg.nb_overlays), run / "overlays" / f"{round_name(r)}.png")
    table = pd.DataFrame(rows)
    atomic_write(folder.evaluation_file, lambda tmp: table.to_csv(tmp, index=False, float_format="%.4f"))
    if table["n_undefined"].any():
        log(f"HD95/ASD undefined (one mask empty) for up to {int(table['n_undefined'].max())} of "
            f"{len(test.names)} test images a round; left out of hd95/asd means (n_undefined column)")
    plot_curve(table, run / "learning_curve.png", cfg.name)
    log(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    log(f"wrote {folder.evaluation_file} and {run / 'learning_curve.png'}")
    return table
