"""Do the robust trainers' weighting signals survive bf16? A probe before the robust tables run at bf16.

At one trained state theta (a U-Net trained `--steps` plain steps in float32 on ISIC's pool), on the
same noisy and clean batches (noisy = masks dilated as `dsal corrupt` does), compute in float32 and
in bf16 (the same float32 weights, `keras.mixed_precision` policy `mixed_bfloat16`):

- the plain gradient `grad_theta mean L` (the reference: bf16's error in what every trainer uses);
- RGS's trust scores `e_i = grad L_i . grad L_clean` (per noisy sample);
- MW-Net's and MCPM's meta-gradient `dM/dphi` through the virtual step (nested tapes);

and report their agreement: cosine similarity (gradients) and Pearson / Spearman (scores), over
`--batches` batch pairs. If the weighting signals agree about as well as the plain gradient does,
bf16 changes these trainers no more than it changes plain training (whose final Dice it leaves
alone: docs/gpus.md).

Run: `python bench/meta_precision_probe.py --data ../shared/data/isic2017` (about 2 min on 2 cores).
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


def cosine(a, b) -> float:
    a, b = np.concatenate([np.ravel(v) for v in a]), np.concatenate([np.ravel(v) for v in b])
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def signals(precision: str, weights: list, cfg, batches: list) -> list[dict]:
    """Every signal on every batch pair, under `precision`, from the float32 `weights`."""
    import keras
    import tensorflow as tf

    from dsal_tf import train
    from dsal_tf.trainers import get_trainer
    from dsal_tf.trainers.base import per_sample_loss, resolve_loss
    from dsal_tf.trainers.reweight import trust_scores

    rcfg = cfg.replace(mixed_precision=precision)
    train.set_precision(rcfg)
    model = train.new_model(rcfg, 0)
    model.set_weights(weights)
    loss_fn = resolve_loss(rcfg.loss)
    meta = {}
    for name in ("mwnet", "mcpm"):
        keras.utils.set_random_seed(0)  # the same meta-net initialisation under both policies
        trainer_cls = get_trainer(name)
        meta[name] = trainer_cls.for_run(model, rcfg.replace(trainer=name), 100)
        meta[name].compile(optimizer=trainer_cls.optimizer_for(rcfg.replace(trainer=name)))  # alpha = its rate
    out = []
    for (xn, yn), (xc, yc) in batches:
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(per_sample_loss(model(xn, training=False), yn, loss_fn, rcfg.ds_weights))
        grad = tape.gradient(loss, model.trainable_variables)
        row = {"grad": [g.numpy() for g in grad],
               "trust": trust_scores(model, xn, yn, xc, yc, loss_fn, rcfg.ds_weights).numpy()}
        for name, trainer in meta.items():
            _, meta_grads, tape, *_ = trainer.meta_gradient(xn, yn, xc, yc, training=False)
            del tape
            row[name] = [g.numpy() for g in meta_grads]
        out.append(row)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/isic2017")
    parser.add_argument("--preset", default="isic2017-cpu")
    parser.add_argument("--steps", type=int, default=150, help="plain float32 steps before the probe")
    parser.add_argument("--batches", type=int, default=4)
    args = parser.parse_args(argv)

    import keras

    from dsal_tf import train
    from dsal_tf.compare import _spearman as spearman
    from dsal_tf.config import load_config
    from dsal_tf.corrupt import corrupt_mask
    from dsal_tf.data import Normalizer, load_split
    from dsal_tf.model import HEADS

    cfg = load_config(None, {"preset": args.preset, "data_path": args.data, "progress": False,
                             "mixed_precision": "off"})
    train.set_precision(cfg)
    pool = load_split(cfg, "train")
    normalizer = Normalizer.fit(pool.images, cfg.normalization)
    x = np.asarray(normalizer(pool.images), "float32")
    y = (pool.masks > 0).astype("float32")
    rng = np.random.default_rng(0)
    model = train.compile_model(train.new_model(cfg, 0), cfg)
    idx = rng.permutation(len(x))
    b = cfg.batch_size
    for step in range(args.steps):  # plain float32 training to a useful theta
        sel = idx[(step * b) % len(x):][:b]
        model.train_on_batch(x[sel], {h: y[sel] for h in HEADS})
    weights = model.get_weights()
    batches = []
    for _ in range(args.batches):
        sel = rng.choice(len(x), 2 * b, replace=False)
        noisy, clean = sel[:b], sel[b:]
        y_noisy = np.stack([corrupt_mask(m[..., 0], "dilate", rng)[0][..., None] for m in pool.masks[noisy]])
        batches.append(((x[noisy], (y_noisy > 0).astype("float32")), (x[clean], y[clean])))
    keras.backend.clear_session()
    fp32 = signals("off", weights, cfg, batches)
    bf16 = signals("bfloat16", weights, cfg, batches)
    rows = []
    for k, (a, c) in enumerate(zip(fp32, bf16)):
        rows.append({"batch": k, "plain gradient (cos)": cosine(a["grad"], c["grad"]),
                     "RGS trust (Pearson)": float(np.corrcoef(a["trust"], c["trust"])[0, 1]),
                     "RGS trust (Spearman)": spearman(a["trust"], c["trust"]),
                     "MW-Net dM/dphi (cos)": cosine(a["mwnet"], c["mwnet"]),
                     "MCPM dM/dphi (cos)": cosine(a["mcpm"], c["mcpm"])})
    cols = list(rows[0])[1:]
    lines = ["# Robust trainers' weighting signals: bf16 against float32", "",
             f"ISIC 2017, `{args.preset}`, a U-Net after {args.steps} plain float32 steps; batches of "
             f"{cfg.batch_size} noisy (dilated masks) and {cfg.batch_size} clean pool images; the same float32 "
             "weights under each policy. 1 = identical.", "",
             "| batch | " + " | ".join(cols) + " |", "|---:|" + "---:|" * len(cols)]
    lines += [f"| {r['batch']} | " + " | ".join(f"{r[c]:.4f}" for c in cols) + " |" for r in rows]
    lines += ["| mean | " + " | ".join(f"{np.mean([r[c] for r in rows]):.4f}" for c in cols) + " |", "",
              f"Command: `python bench/meta_precision_probe.py --data <isic2017> --steps {args.steps} "
              f"--batches {args.batches}`.", ""]
    (RESULTS / "meta_precision.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
