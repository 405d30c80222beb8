"""How much of the labelled structure does BCP's pasted box hold, and how often does it cut it mid-shape?

For a finished `bcp` run (its config.json and round-0 labelled set): the training items the run's
labelled stream sees (2D: the labelled images; 3D: `--items` patches drawn as the run's patch sampler
draws them), one `semisup.box_mask` each (the run's `BCP_BOX`), and per item the share of its foreground
inside the box. Reports the box's share of the item, the mean share of foreground inside it, and the
share of items whose structure the box cuts mid-way (20-80% of it inside).

    python bench/bcp_box_probe.py EXP/semisup-hippocampus/bcp-n10-s0
    python bench/bcp_box_probe.py EXP/semisup-isic2017/bcp-n80-s0

Reads the data through the run's cache (its EXP_DIR); no training. Seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a bcp run folder (config.json, round_00/pool.npz)")
    parser.add_argument("--items", type=int, default=200, help="patches to draw (volumes)")
    args = parser.parse_args(argv)

    import tensorflow as tf

    from dsal_tf.components import resolved
    from dsal_tf.config import resolve
    from dsal_tf.data import Rows
    from dsal_tf.space import space_for
    from dsal_tf.trainers.bcp import BCP
    from dsal_tf.trainers.semisup import box_mask
    from dsal_tf.volume_space import PatchDraw

    run = Path(args.run)
    cfg = resolved(resolve(json.loads((run / "config.json").read_text())))
    labelled = np.flatnonzero(np.load(run / "round_00" / "pool.npz")["labelled_map"])
    space = space_for(cfg)
    pool = space.load_splits(("train",))["train"]
    if pool.images.ndim == 5:  # volumes: patches as the run's labelled stream draws them
        draw = PatchDraw(Rows(pool.images, labelled), Rows(pool.masks, labelled), space.patch_size, seed=cfg.seed,
                         augment=False)
        masks = np.stack([draw.draw(r, False)[1] for r in range(args.items)])
    else:
        masks = np.asarray(pool.masks[labelled])
    y = (masks > 0).astype("float32")
    y = y[y.reshape(len(y), -1).sum(1) > 0]
    m = box_mask(tf.constant(y), BCP.Settings.from_config(cfg).bcp_box, tf.constant([cfg.seed, 1])).numpy()
    axes = tuple(range(1, y.ndim))
    inside = (y * m).sum(axis=axes) / y.sum(axis=axes)
    print(f"{run}: {len(y)} items with foreground of shape {y.shape[1:-1]}; box = {m.mean():.1%} of an item; "
          f"foreground inside the box: {inside.mean():.1%} on average; cut mid-way (20-80% inside): "
          f"{np.mean((inside > 0.2) & (inside < 0.8)):.0%} of items")


if __name__ == "__main__":
    main()
