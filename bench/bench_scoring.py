"""Scoring cost per active-learning round on the same pool and model: random and DSAL and entropy
(one pass), ensemble (NB_ENSEMBLE passes, member training not included), CEAL (T MC-dropout
passes). Not a test: it only times.

    python bench/bench_scoring.py [--data ../shared/data/isic2017] [--pool 1000] [--passes 20]

Writes bench/results/scoring.md.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import click
import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


@click.command()
@click.option("--data", default="../shared/data/isic2017", show_default=True)
@click.option("--pool", "pool_n", default=1000, show_default=True, help="Unlabelled images to score.")
@click.option("--passes", default=20, show_default=True, help="CEAL's MC-dropout passes T.")
@click.option("--repeats", default=3, show_default=True)
def main(data: str, pool_n: int, passes: int, repeats: int) -> None:
    from dsal_tf.config import resolve
    from dsal_tf.data import Normalizer, load_split
    from dsal_tf.space import space_for
    from dsal_tf.strategies import QUERY_STRATEGIES
    from dsal_tf.train import new_model

    cfg = resolve({"preset": "isic2017-cpu", "data_path": data, "mc_passes": passes})
    if Path(data, "trainImg").is_dir():
        split = load_split(cfg, "train")
        images, masks, source = split.images[:pool_n], split.masks[:pool_n], f"ISIC 2017 train ({data})"
    else:
        rng = np.random.default_rng(0)
        images = rng.integers(0, 255, (pool_n, cfg.img_rows, cfg.img_cols, 3), dtype=np.uint8)
        masks, source = (images[..., :1] > 127).astype(np.uint8), "random images"
    norm = Normalizer.fit(images, cfg.normalization)
    model = new_model(cfg, 0)
    rows = []
    space = space_for(cfg)
    nb_ensemble = QUERY_STRATEGIES["ensemble_s"].from_config(cfg).settings.nb_ensemble
    for name in ("random", "dsal", "entropy", "ensemble_s", "ceal"):
        strategy = QUERY_STRATEGIES[name].from_config(cfg)
        if name == "ensemble_s":  # scoring cost only: NB_ENSEMBLE forward passes (members untrained here)
            strategy.members = [model] + [new_model(cfg, k) for k in range(1, nb_ensemble)]
        space.score_pool(strategy, model, images[: cfg.batch_size], masks[: cfg.batch_size], norm)  # trace
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            space.score_pool(strategy, model, images, masks, norm)
            times.append(time.perf_counter() - t)
        rows.append((name, float(np.median(times))))
    base = dict(rows)["dsal"]
    lines = [
        f"# Scoring cost per round (median of {repeats})\n",
        f"Pool: {len(images)} images from {source}, {cfg.img_rows}x{cfg.img_cols}, isic2017-cpu U-Net "
        f"(base {cfg.base_filters}), batch {cfg.batch_size}, CPU ({os.cpu_count()} cores). CEAL T = {passes}, "
        f"ensemble of {nb_ensemble}. Each pass includes the confidence, prediction and true-Dice outputs.\n",
        f"Command: `python bench/bench_scoring.py --data {data} --pool {pool_n} --passes {passes}`\n",
        "| strategy | seconds per round | ms per image | x DSAL |",
        "|---|---:|---:|---:|",
    ]
    for name, t in rows:
        lines.append(f"| {name} | {t:.2f} | {1000 * t / len(images):.2f} | {t / base:.2f} |")
    out = Path(__file__).parent / "results" / "scoring.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    click.echo(out.read_text())


if __name__ == "__main__":
    main()
