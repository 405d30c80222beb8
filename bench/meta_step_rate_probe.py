"""Is SGD at MW-Net's rate a fair real step for the U-Net? (issue 27.6, docs/methods.md#mw-net)

`META_STEP = "sgd"` (the MW-Net authors' real step: momentum 0.9 at `META_STEP_LR` = 0.1) replaces the
Adam step every other trainer takes at `LEARNING_RATE`. If SGD at 0.1 learned much more slowly than Adam,
MW-Net and MCPM would lose to the `noisy` row for their optimizer alone. This probe trains the preset's
U-Net with plain fits (the preset's loss and deep supervision, no weighting) from the same initial weights
and the same batches, one optimizer per row, and reports the main head's Dice on a fixed set of 256 pool
images (train) and on the validation split after `--steps` steps.

Run: `python bench/meta_step_rate_probe.py --data ../shared/data/isic2017` (about 4 min on 2 cores; writes
`bench/results/meta_step_rate.md`).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

RESULTS = Path(os.environ.get("RESULTS_DIR") or Path(__file__).resolve().parent / "results")
# (row, optimizer, rate): the authors' step, two smaller SGD rates, and the Adam step of the other trainers
ROWS = (("SGD 0.1, momentum 0.9 (META_STEP = sgd)", "sgd", 0.1), ("SGD 0.01, momentum 0.9", "sgd", 0.01),
        ("SGD 0.001, momentum 0.9", "sgd", 0.001), ("Adam at LEARNING_RATE (META_STEP = adam)", "adam", None))


def optimizer(kind: str, rate: float | None, cfg):
    import keras

    from dsal_tf.trainers.meta import SGD_MOMENTUM

    if kind == "adam":
        return keras.optimizers.Adam(cfg.learning_rate)
    return keras.optimizers.SGD(rate, momentum=SGD_MOMENTUM)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/isic2017")
    ap.add_argument("--preset", default="isic2017-cpu")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--seeds", default="0,1,2")
    args = ap.parse_args(argv)

    import keras

    from dsal_tf import train
    from dsal_tf.config import load_config
    from dsal_tf.data import Normalizer, load_split
    from dsal_tf.losses import deep_supervision, dice
    from dsal_tf.model import HEADS
    from dsal_tf.space import space_for

    cfg = load_config(None, {"preset": args.preset, "data_path": args.data, "progress": False,
                             "exp_dir": "/tmp/meta_step_rate_probe"})
    precision = train.set_precision(cfg)
    pool, val = load_split(cfg, "train"), load_split(cfg, "val")
    normalizer = Normalizer.fit(pool.images, cfg.normalization)
    space = space_for(cfg)
    fixed = np.arange(min(256, len(pool.images)))
    losses, weights = deep_supervision(cfg.loss, cfg.ds_weights, batch_dice=cfg.batch_dice)

    def main_dice(model, images, masks) -> float:
        out = model.predict(space.eval_stream(images, masks, normalizer), verbose=0)["main"]
        return float(np.mean(dice(np.asarray(masks, np.float32), out)))

    seeds = [int(s) for s in args.seeds.split(",")]
    found = {row: [] for row, _, _ in ROWS}
    for seed in seeds:
        start = train.new_model(cfg, seed).get_weights()
        for row, kind, rate in ROWS:
            model = train.new_model(cfg, seed)
            model.set_weights(start)
            model.compile(optimizer=optimizer(kind, rate, cfg), loss=losses, loss_weights=weights)
            keras.utils.set_random_seed(seed)
            stream = space.train_stream(pool.images, pool.masks, normalizer, seed, heads=HEADS).repeat()
            model.fit(stream, steps_per_epoch=args.steps, epochs=1, verbose=0)
            found[row].append((main_dice(model, pool.images[fixed], pool.masks[fixed]),
                               main_dice(model, val.images, val.masks)))
            print(f"seed {seed} {row}: train Dice {found[row][-1][0]:.3f}, val Dice {found[row][-1][1]:.3f}",
                  flush=True)

    lines = [f"# SGD at MW-Net's rate against Adam, plain fits ({args.preset}, {args.steps} steps, seeds {args.seeds})",
             "", f"`python bench/meta_step_rate_probe.py --data <isic2017> --steps {args.steps} --seeds {args.seeds}`."
             f" The preset's U-Net and loss (`{cfg.loss}`, deep supervision), batch {cfg.batch_size}, precision "
             f"{precision}; per seed every row starts from the same weights and draws the same batches. Dice of the"
             f" main head, thresholded at 0.5, mean over images: `train` on the first 256 pool images, `val` on the"
             f" validation split ({len(val.images)} images). Mean ± std over seeds.", "",
             "| real step | train Dice | val Dice |", "|---|---:|---:|"]
    for row, _, _ in ROWS:
        v = np.array(found[row])
        lines.append(f"| {row} | {v[:, 0].mean():.3f} ± {v[:, 0].std():.3f} | {v[:, 1].mean():.3f} ± "
                     f"{v[:, 1].std():.3f} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "meta_step_rate.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
