"""Dense-CRF pseudo-label refinement: seconds per image and how often the refinement is kept.

    python bench/bench_crf.py [--data ../shared/data/isic2017] [--n 100]

Uses ground-truth masks dilated by 2 px as stand-in predictions (so the CRF has a boundary to fix)
and writes bench/results/crf.md. Not a test: it only measures.
"""

from __future__ import annotations

import time
from pathlib import Path

import click
import cv2
import numpy as np


@click.command()
@click.option("--data", default="../shared/data/isic2017", show_default=True)
@click.option("--n", default=100, show_default=True)
def main(data: str, n: int) -> None:
    from dsal_tf.config import resolve
    from dsal_tf.crf import refine_pseudo_labels
    from dsal_tf.data import load_split
    from dsal_tf.metrics import dice

    lines = ["# Dense-CRF refinement of pseudo labels\n",
             f"Command: `python bench/bench_crf.py --data {data} --n {n}`. Stand-in predictions: ground truth "
             "dilated by 2 px. Kept: Dice(prediction, CRF) > USE_CRF_THRES.\n",
             "| size | ms per image | kept at 0.98 | kept at 0.90 | Dice to truth before | after (all refined) |",
             "|---|---:|---:|---:|---:|---:|"]
    for rows, cols in ((64, 64), (192, 240)):
        cfg = resolve({"data_path": data, "img_rows": rows, "img_cols": cols, "preset": "isic2017-cpu"})
        split = load_split(cfg, "val")
        images, truth = split.images[:n], split.masks[:n]
        kernel = np.ones((5, 5), np.uint8)
        pred = np.stack([cv2.dilate(m[..., 0], kernel)[..., None] for m in truth])
        t = time.perf_counter()
        refined_all, _ = refine_pseudo_labels(images, pred, threshold=-1.0)
        ms = 1000 * (time.perf_counter() - t) / len(images)
        kept98 = refine_pseudo_labels(images, pred, 0.98)[1]
        kept90 = refine_pseudo_labels(images, pred, 0.90)[1]
        before = np.mean([dice(a, b) for a, b in zip(pred, truth)])
        after = np.mean([dice(a, b) for a, b in zip(refined_all, truth)])
        lines.append(f"| {rows}x{cols} | {ms:.1f} | {kept98}/{len(images)} | {kept90}/{len(images)} | "
                     f"{before:.4f} | {after:.4f} |")
    out = Path(__file__).parent / "results" / "crf.md"
    out.write_text("\n".join(lines) + "\n")
    click.echo(out.read_text())


if __name__ == "__main__":
    main()
