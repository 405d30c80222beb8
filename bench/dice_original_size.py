"""Test Dice at the images' original size, so runs trained at different input sizes compare fairly.

`python test.py` scores a run at its own input size (masks resized with nearest neighbour), which
flatters a small input size on small structures: the ones that vanish vanish from the truth too.
Here the truth is the original mask, and the prediction is `dsal predict`'s mask, already resized
back to the original size:

    dsal predict --exp RUN --round last -i DATA/testImg -o exp/pred/RUN --no-progress
    python bench/dice_original_size.py exp/pred/RUN DATA/testGT

Prints mean Dice and IoU over the images, and the lesion recall: the fraction of ground-truth
8-connected components that the prediction touches.
"""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np

from dsal_tf.metrics import dice, iou


def main(pred_dir: str, gt_dir: str) -> None:
    gt_dir_p = Path(gt_dir)
    dices, ious, found, total = [], [], 0, 0
    for pred_path in sorted(Path(pred_dir).glob("*.png")):
        stem = pred_path.stem
        gt_path = next(p for p in (gt_dir_p / f"{stem}_segmentation.png", gt_dir_p / f"{stem}.png") if p.is_file())
        gt = cv2.imread(str(gt_path), cv2.IMREAD_GRAYSCALE) > 0
        pred = cv2.imread(str(pred_path), cv2.IMREAD_GRAYSCALE) > 0
        dices.append(dice(gt, pred))
        ious.append(iou(gt, pred))
        n, labels = cv2.connectedComponents(gt.astype(np.uint8), connectivity=8)
        total += n - 1
        found += len(set(np.unique(labels[pred])) - {0})
    print(f"{pred_dir}: {len(dices)} images, Dice {np.mean(dices):.4f} +- {np.std(dices):.3f}, "
          f"IoU {np.mean(ious):.4f}, lesion recall {found}/{total} = {found / max(total, 1):.3f}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
