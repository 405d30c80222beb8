"""Time one training step: plain `fit` vs. every paired trainer (uniform, RGS, RGM, RGS&M, +AL, MW-Net,
MCPM, PNT, INT, PINT).

Run: `TF_CPP_MIN_LOG_LEVEL=2 python bench/bench_trainers.py [--steps 10] [--warmup 3]`.
Writes `bench/results/trainers.md`. Each variant gets a fresh U-Net and one `fit` step to trace
and build; then `--warmup` untimed and `--steps` timed rounds call each variant's compiled train
function once on its fixed batch. The table gives the median.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import keras
import numpy as np
import tensorflow as tf

from dsal_tf import losses, trainers
from dsal_tf.model import HEADS, build_unet

SHAPE = (96, 96, 3)
BASE_FILTERS = 16
BATCH = 16
LOSS = "bce_dice"
OUT = Path(__file__).resolve().parent / "results" / "trainers.md"


def _batch(n: int, seed: int) -> tuple[tf.Tensor, tf.Tensor]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, *SHAPE)).astype("float32")
    y = (rng.random((n, *SHAPE[:2], 1)) > 0.7).astype("float32")
    return tf.constant(x), tf.constant(y)


def _compiled_step(model: keras.Model, data):
    """The compiled train function `fit` calls per batch, traced and built by one `fit` step."""
    model.fit(tf.data.Dataset.from_tensors(data), epochs=1, verbose=0)
    fn = model.train_function

    def step() -> tuple[float, float]:
        """(wall s, CPU s of this process): on a shared machine CPU time is what the step costs."""
        start, cpu = time.perf_counter(), time.process_time()
        float(fn([data])["loss"])  # reading the loss waits for the step to finish
        return time.perf_counter() - start, time.process_time() - cpu

    return step


def _plain(batch: int, seed: int):
    keras.utils.set_random_seed(seed)
    model = build_unet(SHAPE, BASE_FILTERS)
    loss, weights = losses.deep_supervision(LOSS)
    model.compile(keras.optimizers.Adam(1e-3), loss=loss, loss_weights=weights)
    x, y = _batch(batch, seed)
    return _compiled_step(model, (x, {h: y for h in HEADS}))


def _paired(name: str, seed: int, **kwargs):
    keras.utils.set_random_seed(seed)
    trainer = trainers.make_trainer(name, build_unet(SHAPE, BASE_FILTERS), loss=LOSS, **kwargs)
    trainer.compile(keras.optimizers.Adam(1e-3))
    return _compiled_step(trainer, (_batch(BATCH, seed), _batch(BATCH, seed + 1)))


def time_variants(variants: dict, steps: int, warmup: int) -> dict[str, tuple[float, float]]:
    """Median (wall ms, CPU ms) per variant. Rounds interleave the variants, so load from other
    processes hits them all alike; CPU time (all threads of this process) barely sees that load."""
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    for i in range(warmup + steps):
        for name, step in variants.items():
            elapsed = step()
            if i >= warmup:
                times[name].append(elapsed)
    return {name: (1000.0 * statistics.median(w for w, _ in t), 1000.0 * statistics.median(c for _, c in t))
            for name, t in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)

    variants = {
        f"plain fit, batch {BATCH}": _plain(BATCH, 0),
        f"plain fit, batch {2 * BATCH} (noisy + clean)": _plain(2 * BATCH, 0),
        "uniform (the control)": _paired("uniform", 0),
        "RGS": _paired("rgs", 0),
        "RGS+AL": _paired("rgs", 0, query=True),
        "RGM": _paired("rgm", 0),
        "RGS&M+AL": _paired("rgsm", 0, query=True),
        "MW-Net": _paired("mwnet", 0),
        "MCPM": _paired("mcpm", 0),
        "PNT (T=8)": _paired("pnt", 0),
        "INT (T=8)": _paired("int", 0),
        "PINT (T=8)": _paired("pint", 0),
    }
    rows = list(time_variants(variants, args.steps, args.warmup).items())
    load = os.getloadavg()[1]  # 5-minute load average: other processes sharing the cores
    (_, plain), (_, plain2) = rows[0][1], rows[1][1]
    lines = [
        "# Training-step time: plain fit vs. the paired trainers",
        "",
        (
            f"U-Net {SHAPE}, base_filters {BASE_FILTERS}, depth 4, dropout 0.5, loss `{LOSS}` with deep "
            f"supervision; paired trainers take {BATCH} noisy + {BATCH} clean images per step. "
            f"Median of {args.steps} interleaved steps after {args.warmup} warm-up rounds."
        ),
        (
            f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
            f"TensorFlow {tf.__version__}, Keras {keras.__version__}, no GPU, no XLA; "
            f"5-minute load average {load:.1f} at the end (above the core count = shared machine)."
        ),
        "",
        "Ratios use CPU time (all threads of the process), which the other processes on a shared machine "
        "barely move; wall time is given for reference.",
        "",
        f"| trainer | wall ms / step | CPU ms / step | x plain (batch {BATCH}), CPU | "
        f"x plain on the same {2 * BATCH} images, CPU |",
        "|---|---:|---:|---:|---:|",
        *(f"| {name} | {wall:.0f} | {cpu:.0f} | {cpu / plain:.2f} | {cpu / plain2:.2f} |"
          for name, (wall, cpu) in rows),
        "",
        "Command: `TF_CPP_MIN_LOG_LEVEL=2 python bench/bench_trainers.py`",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
