"""Does a trainer repeat itself from process to process? N fresh interpreters, the same seed, a few steps.

Each process builds the U-Net of the chosen size, trains `--steps` steps of `--trainer` on one fixed
random batch (fp32, op determinism on, the machine's threads) and prints a digest of the weights; the
probe reports how many distinct digests the processes gave (1 = they repeat). Sizes: `hippocampus`
(3D, 16 filters, batch 2 of 32x48x32 patches, as bench/hippocampus.py) and `isic` (2D, 16 filters,
batch 16 of 64x64x3, as `isic2017-cpu`). Pool trainers (`bcp`, `mean_teacher`) pre-train for half the
steps, PINT warms up for half.

    python bench/pool_determinism_probe.py --trainer bcp --size hippocampus --processes 4
    python bench/pool_determinism_probe.py --trainer pint --size isic --processes 4

`DSAL_ROOT=<checkout>` runs another checkout's code (e.g. a worktree before a fix). About 20 s a process.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZES = {"hippocampus": ((None, None, None, 1), (2, 32, 48, 32, 1)), "isic": ((None, None, 3), (16, 64, 64, 3))}

STEPS = textwrap.dedent("""
    import hashlib, sys, keras, numpy as np, tensorflow as tf
    from dsal_tf import trainers
    from dsal_tf.determinism import enable_op_determinism
    from dsal_tf.model import build_unet
    name, steps, input_shape, shape = sys.argv[1], int(sys.argv[2]), eval(sys.argv[3]), eval(sys.argv[4])
    enable_op_determinism()
    keras.utils.set_random_seed(0)
    model = build_unet(input_shape, base_filters=16, depth=4)
    rng = np.random.default_rng(0)
    x, u = rng.normal(size=shape).astype("float32"), rng.normal(size=shape).astype("float32")
    y = (x[..., :1] > 0.5).astype("float32")
    cls = trainers.get_trainer(name)
    if getattr(cls, "uses_pool", False):
        trainer, batch = cls(model, cls.Settings(), seed=0, total_steps=steps), ((x, y), u)
    else:
        trainer = trainers.make_trainer(name, model, loss="dice", warmup_steps=steps // 2, seed=0)
        batch = ((x, y), (u, (u[..., :1] > 0.5).astype("float32")))
    trainer.compile(optimizer=keras.optimizers.Adam(1e-3))
    trainer.fit(tf.data.Dataset.from_tensors(batch).repeat(), steps_per_epoch=steps, epochs=1, verbose=0)
    print(hashlib.sha256(b"".join(w.tobytes() for w in model.get_weights())).hexdigest()[:16])
""")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trainer", default="bcp")
    parser.add_argument("--size", default="hippocampus", choices=sorted(SIZES))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--processes", type=int, default=4)
    args = parser.parse_args(argv)
    code = Path(os.environ.get("DSAL_ROOT") or ROOT)
    input_shape, shape = SIZES[args.size]
    env = {**os.environ, "PYTHONPATH": str(code), "TF_CPP_MIN_LOG_LEVEL": "3"}
    digests = [subprocess.run([sys.executable, "-c", STEPS, args.trainer, str(args.steps), repr(input_shape),
                               repr(shape)], check=True, env=env, cwd=code, capture_output=True,
                              text=True).stdout.split()[-1] for _ in range(args.processes)]
    print(f"{args.trainer} at {args.size} size, {args.steps} steps, code {code}: {len(set(digests))} distinct "
          f"digest(s) over {args.processes} processes: {' '.join(digests)}")


if __name__ == "__main__":
    main()
