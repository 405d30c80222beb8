"""Throughput of `dsal predict`: images per second from a folder of JPEGs to masks on disk.

Not a test: numbers only. Builds a run whose round 0 is an untrained U-Net (throughput does not
depend on the weights), writes N synthetic JPEGs at a given original size, and times
`predict_folder` end to end (decode, resize, batched forward pass, resize back, threshold, write),
plus a decode-only pass over the same files to show where the time goes.

    python bench/bench_predict.py --n 200 --out bench/results/predict.md
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

MODELS = {  # name: (rows, cols, base filters)
    "demo (64x64, 8 filters)": (64, 64, 8),
    "isic2017-cpu (64x64, 16 filters)": (64, 64, 16),
    "isic2017 (192x240, 32 filters)": (192, 240, 32),
}


def make_run(root: Path, rows: int, cols: int, filters: int):
    from dsal_tf.active import run_active_learning
    from dsal_tf.config import resolve
    from dsal_tf.synthetic import make_synthetic

    data = root / "data"
    if not data.exists():
        make_synthetic(data, counts=(16, 8, 8), size=128, seed=0)
    cfg = resolve(dict(data_path=str(data), exp_dir=str(root / "exp"), exp_name=f"r{rows}x{cols}f{filters}",
                       img_rows=rows, img_cols=cols, base_filters=filters, nb_labeled=8, nb_iterations=0,
                       nb_initial_epochs=0, progress=False))
    run_active_learning(cfg, log=lambda m: None)
    return cfg


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--size", default="768x1024", help="original image size, ROWSxCOLS")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--out", default="bench/results/predict.md")
    args = ap.parse_args()
    from dsal_tf.data import read_image
    from dsal_tf.predict import predict_folder

    rows, cols = map(int, args.size.split("x"))
    lines = [
        "# `dsal predict` throughput", "",
        f"`python bench/bench_predict.py --n {args.n} --size {args.size} --batch-size {args.batch_size}` "
        f"({os.cpu_count()} CPU cores, no GPU; other processes may have shared the cores). {args.n} JPEGs of "
        f"{cols}x{rows} pixels; end to end = decode, area-resize, batched forward pass with side-head agreement, "
        "bilinear resize of the probabilities back to the original size, threshold, PNG write.", "",
        "| model | end to end (images/s) | decode only (images/s) |", "|---|---:|---:|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = tmp / "images"
        src.mkdir()
        rng = np.random.default_rng(0)
        base = rng.integers(0, 255, (rows, cols, 3), dtype=np.uint8)
        for i in range(args.n):
            img = np.roll(base, i * 7, axis=1)
            cv2.circle(img, (cols // 2, rows // 2), rows // 4, (120, 60, 40), -1)
            cv2.imwrite(str(src / f"img_{i:05d}.jpg"), img)
        t = time.perf_counter()
        for f in sorted(src.iterdir()):
            read_image(f, "rgb")
        decode = args.n / (time.perf_counter() - t)
        for name, (r, c, f) in MODELS.items():
            cfg = make_run(tmp, r, c, f)
            predict_folder(cfg, src, tmp / "warm", "last", batch_size=args.batch_size, progress=False,
                           log=lambda m: None)  # traces the graph once
            t = time.perf_counter()
            predict_folder(cfg, src, tmp / f"out-{r}-{f}", "last", batch_size=args.batch_size, progress=False,
                           log=lambda m: None)
            speed = args.n / (time.perf_counter() - t)
            lines.append(f"| {name} | {speed:.1f} | {decode:.1f} |")
            print(lines[-1], flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
