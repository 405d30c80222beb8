"""bf16 against fp32 on this machine: speed, the images scoring picks, and final test Dice.

    python bench/bench_precision.py speed [--data ../shared/data/isic2017]     # img/s and share of peak
    python bench/bench_precision.py picks --model exp/compare-isic2017-cpu-v2/init-s0/round_00
    python bench/bench_precision.py dice --exp-dir exp     # collect the bf16 runs the queue made

`speed`: the matmul peak (2048^2, fp32 and bf16) and the `isic2017-cpu` U-Net's compiled training
step (batch 16, 64x64 RGB), FLOPs counted from the model's layers. `picks`: one trained fp32 model,
its pool scored by DSAL (one pass) and CEAL (T MC-dropout passes) under each policy; the overlap of
the NB_NEXT_SAMPLE images each would send to the oracle. `dice`: the paired per-image difference of
final test Dice between `compare-<preset>-bf16` and the fp32 comparison, bootstrap 95% interval.
Each part writes its section to `<exp-dir>/precision/<part>.md`; bench/results/precision.md joins them.
Not a test: it only measures.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import click
import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
RESULTS = Path(os.environ.get("RESULTS_DIR") or Path(__file__).resolve().parent / "results")
PARTS = ("speed", "picks", "dice")


def write_part(exp_dir: Path, part: str, text: str) -> None:
    folder = exp_dir / "precision"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{part}.md").write_text(text)
    sections = [(folder / f"{p}.md").read_text() for p in PARTS if (folder / f"{p}.md").is_file()]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "precision.md").write_text(
        "# bf16 against fp32 (`MIXED_PRECISION`)\n\n" + "\n".join(sections)
        + "".join(f"\n## {p}\n\npending\n" for p in PARTS if not (folder / f"{p}.md").is_file()))
    click.echo(text)


def conv_flops(model) -> float:
    """Forward multiply-adds x 2 of every conv layer for one image (the rest is negligible)."""
    total = 0.0
    for layer in model.layers:
        kind = type(layer).__name__
        if kind not in ("Conv2D", "Conv2DTranspose"):
            continue
        k = np.prod(layer.kernel.shape)  # kh * kw * in * out
        h, w = (layer.input.shape[1:3] if kind == "Conv2DTranspose" else layer.output.shape[1:3])
        total += 2.0 * h * w * k
    return total


def timed(fn, repeats: int) -> float:
    fn()  # trace / warm up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


@click.group()
def cli() -> None:
    """bf16 vs. fp32 measurements."""


@cli.command()
@click.option("--exp-dir", type=Path, default=Path("exp"))
@click.option("--steps", default=20, show_default=True)
def speed(exp_dir: Path, steps: int) -> None:
    import keras
    import tensorflow as tf

    from dsal_tf import train
    from dsal_tf.config import resolve

    rows = []
    for choice in ("off", "bfloat16"):
        dtype = tf.float32 if choice == "off" else tf.bfloat16
        a = tf.random.normal((2048, 2048), dtype=tf.float32)
        a = tf.cast(a, dtype)
        matmul = tf.function(lambda: tf.reduce_sum(tf.cast(tf.matmul(a, a), tf.float32)))
        t = timed(lambda: [matmul() for _ in range(10)][-1].numpy(), 3) / 10
        peak = 2 * 2048 ** 3 / t / 1e9
        cfg = resolve({"preset": "isic2017-cpu", "mixed_precision": choice})
        train.set_precision(cfg)
        model = train.new_model(cfg, 0)
        flops = conv_flops(model) * 3  # forward + backward (input and weight gradients)
        x = np.random.default_rng(0).normal(size=(cfg.batch_size, 64, 64, 3)).astype(np.float32)
        y = (np.random.default_rng(1).random((cfg.batch_size, 64, 64, 1)) > 0.7).astype(np.float32)
        ds = tf.data.Dataset.from_tensors((x, {"main": y, "side_1": y, "side_2": y})).repeat(steps)
        t = timed(lambda: model.fit(ds, epochs=1, verbose=0), 3) / steps
        img_s = cfg.batch_size / t
        rows.append((choice, peak, img_s, flops, img_s * flops / 1e9))
        keras.mixed_precision.set_global_policy("float32")
    base = rows[0][2]
    lines = ["## speed\n",
             f"Command: `python bench/bench_precision.py speed` (alone on the machine; {os.cpu_count()} cores). "
             f"The `isic2017-cpu` U-Net (64x64 RGB, 16 filters), batch 16, compiled `fit` step without XLA; "
             f"{rows[0][3] / 1e9:.2f} GFLOP per training image (convs, forward + backward).\n",
             "| precision | matmul peak GFLOP/s | train img/s | train GFLOP/s | share of its peak | x fp32 |",
             "|---|---:|---:|---:|---:|---:|"]
    for choice, peak, img_s, _, gf in rows:
        lines.append(f"| {choice} | {peak:.0f} | {img_s:.0f} | {gf:.0f} | {gf / peak:.0%} | {img_s / base:.2f} |")
    write_part(exp_dir, "speed", "\n".join(lines) + "\n")


@cli.command()
@click.option("--model", "model_dir", type=Path, required=True,
              help="A finished round folder (best.keras); relative paths are under --exp-dir.")
@click.option("--data", default="../shared/data/isic2017", show_default=True)
@click.option("--exp-dir", type=Path, default=Path("exp"))
@click.option("--pool", "pool_n", default=1000, show_default=True)
def picks(model_dir: Path, data: str, exp_dir: Path, pool_n: int) -> None:
    import keras

    from dsal_tf import train
    from dsal_tf.config import resolve
    from dsal_tf.data import Normalizer, load_split

    model_dir = model_dir if model_dir.is_absolute() else exp_dir / model_dir
    from dsal_tf.determinism import reset_seed_generators
    from dsal_tf.space import space_for
    from dsal_tf.strategies import QUERY_STRATEGIES

    base = resolve({"preset": "isic2017-cpu", "data_path": data})
    split = load_split(base, "train")
    images, masks = split.images[-pool_n:], split.masks[-pool_n:]
    norm = Normalizer.load(model_dir.parent / "normalizer.json")
    scores = {}
    for choice in ("off", "bfloat16"):
        cfg = base.replace(mixed_precision=choice)
        train.set_precision(cfg)
        model = train.new_model(cfg, 0)  # built under the policy, the fp32 weights loaded into it
        model.load_weights(model_dir / train.CHECKPOINT)
        for name in ("dsal", "ceal"):
            reset_seed_generators(model, 1)
            t = time.perf_counter()
            s = space_for(cfg).score_pool(QUERY_STRATEGIES[name].from_config(cfg), model, images, masks, norm)
            scores[(choice, name)] = (s, time.perf_counter() - t)
        keras.mixed_precision.set_global_policy("float32")
    n = base.nb_next_sample
    lines = ["## picks\n",
             f"Command: `python bench/bench_precision.py picks --model {model_dir}`. One fp32-trained model, "
             f"{len(images)} ISIC pool images scored under fp32 and under bf16; overlap of the {n} images "
             "each sends to the oracle (top-n of the score; CEAL's histogram draw with the same seed too).\n",
             "| strategy | top-n overlap | histogram-pick overlap | Spearman of scores | fp32 s | bf16 s |",
             "|---|---:|---:|---:|---:|---:|"]
    from scipy.stats import spearmanr

    for name in ("dsal", "ceal"):
        (a, ta), (b, tb) = scores[("off", name)], scores[("bfloat16", name)]
        q = QUERY_STRATEGIES[name].from_config(base)
        top = len(set(q.pick(a, n, np.random.default_rng(0))) & set(q.pick(b, n, np.random.default_rng(0)))) / n
        from dsal_tf.strategies import histogram_select

        hist = len(set(histogram_select(a["uncertainty"], n, np.random.default_rng(0)))
                   & set(histogram_select(b["uncertainty"], n, np.random.default_rng(0)))) / n
        rho = spearmanr(a["uncertainty"], b["uncertainty"]).statistic
        lines.append(f"| {name} | {top:.0%} | {hist:.0%} | {rho:.3f} | {ta:.1f} | {tb:.1f} |")
    write_part(exp_dir, "picks", "\n".join(lines) + "\n")


@cli.command()
@click.option("--exp-dir", type=Path, default=Path("exp"))
def dice(exp_dir: Path) -> None:
    import pandas as pd

    from dsal_tf.compare import finished_runs, paired_differences, per_image_dice

    lines = ["## dice\n",
             "Final test Dice, bf16 run minus the fp32 run of the same seed and settings (paired per test "
             "image; bootstrap 95% interval over seeds and images). Runs: `dsal compare --set "
             "MIXED_PRECISION=bfloat16 --name compare-<preset>-bf16` beside the fp32 comparison "
             "(`bench/results_queue.py`, jobs `precision/*`).\n",
             "| data | strategy | seeds | fp32 Dice | bf16 Dice | bf16 - fp32 | 95% interval | inside noise |",
             "|---|---|---|---:|---:|---:|---|---|"]
    for label, fp32, bf16 in (("ISIC isic2017-cpu", "compare-isic2017-cpu-v2", "compare-isic2017-cpu-bf16"),
                              ("synthetic demo", "compare-demo-fp32", "compare-demo-bf16")):
        if not (exp_dir / bf16).is_dir() or not (exp_dir / fp32).is_dir():
            continue
        curves, finals = {}, {}
        for tag, folder in (("fp32", fp32), ("bf16", bf16)):
            runs, _ = finished_runs(exp_dir / folder)
            for strategy, seed, c in runs:
                if strategy == "dsal":
                    curves[(tag, seed)] = per_image_dice(c.run_dir)
                    finals[(tag, seed)] = float(pd.read_csv(c.run_dir / "evaluation.csv")["dice_mean"].iloc[-1])
        pooled = [r for r in paired_differences(curves, "fp32") if r["metric"] == "final_dice"]
        pooled = [r for r in pooled if r["seeds"] == "all"] or pooled
        for r in pooled:
            seeds = sorted(s for t, s in curves if t == "bf16" and ("fp32", s) in curves)
            mean = {t: np.mean([finals[(t, s)] for s in seeds]) for t in ("fp32", "bf16")}
            lines.append(f"| {label} | dsal | {','.join(map(str, seeds))} | {mean['fp32']:.4f} | {mean['bf16']:.4f} "
                         f"| {r['diff']:+.4f} | [{r['ci_low']:+.4f}, {r['ci_high']:+.4f}] | "
                         f"{'no' if r['outside_noise'] else 'yes'} |")
    write_part(exp_dir, "dice", "\n".join(lines) + "\n")


if __name__ == "__main__":
    cli()
