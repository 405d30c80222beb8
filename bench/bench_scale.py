"""Pools larger than memory: peak anonymous memory and scoring speed against pool size.

Not a test: numbers only. For each pool size, a generated orgData folder at 192x240 (JPEG images,
PNG masks) is loaded by a fresh process (decode into the memory-mapped cache, streaming z-score
statistics), then scored once by DSAL (one batched pass, a demo-size U-Net with 8 base filters)
and once by a bare `model.predict` over the same memory-mapped pool; CEAL (T = 20 dropout passes)
is timed on a subset. Peak RssAnon (anonymous resident memory: pages of a memory-mapped file do
not count, the kernel can drop them) is polled from /proc/self/status every 50 ms.

    python bench/bench_scale.py --sizes 2000,10000,30000 --out bench/results/scale.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ROWS, COLS = 192, 240


def make_pool(root: Path, n: int) -> None:
    import cv2
    import numpy as np

    done = root / f".made{n}"
    if done.is_file():
        return
    rng = np.random.default_rng(0)
    base = rng.integers(60, 200, (ROWS, COLS, 3), dtype=np.uint8)
    for split, count in (("train", n), ("val", 32)):
        (root / f"{split}Img").mkdir(parents=True, exist_ok=True)
        (root / f"{split}GT").mkdir(parents=True, exist_ok=True)
        for i in range(count):
            img = np.roll(base, (i * 13) % COLS, axis=1).copy()
            mask = np.zeros((ROWS, COLS), np.uint8)
            cv2.circle(mask, (int(40 + i * 7 % 160), int(50 + i * 3 % 90)), int(20 + i % 30), 255, -1)
            img[mask > 0] = (img[mask > 0] * 0.4).astype(np.uint8)
            cv2.imwrite(str(root / f"{split}Img" / f"im_{i:06d}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 90])
            cv2.imwrite(str(root / f"{split}GT" / f"im_{i:06d}_segmentation.png"), mask)
    done.write_text("ok")


class PeakAnon:
    """Polls RssAnon of this process (kB in /proc/self/status) on a thread."""

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def now() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
        return 0

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            time.sleep(0.05)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return max(self.peak, self.now()) / 1024.0  # MiB


def child(data: Path, cache: Path, ceal_subset: int) -> dict:
    """One pool size in a fresh process: load, DSAL scoring pass, bare predict, CEAL on a subset."""
    import numpy as np

    meter = PeakAnon()
    from dsal_tf.config import resolve
    from dsal_tf.data import Normalizer, Rows, load_split, make_dataset
    from dsal_tf.strategies import QUERY_STRATEGIES
    from dsal_tf.train import new_model

    cfg = resolve(dict(data_path=str(data), cache_dir=str(cache), img_rows=ROWS, img_cols=COLS, base_filters=8,
                       batch_size=32, mc_passes=20, progress=False))
    t = time.perf_counter()
    pool = load_split(cfg, "train")
    norm = Normalizer.fit(pool.images, "zscore")
    load_s = time.perf_counter() - t
    model = new_model(cfg, 0)
    everything = np.arange(len(pool))
    dsal = QUERY_STRATEGIES["dsal"](cfg)
    dsal.score_pool(model, Rows(pool.images, everything[:64]), Rows(pool.masks, everything[:64]), norm, 32)  # trace
    t = time.perf_counter()
    scores = dsal.score_pool(model, Rows(pool.images, everything), Rows(pool.masks, everything), norm, 32)
    dsal_s = time.perf_counter() - t
    assert len(scores["uncertainty"]) == len(pool)
    del scores
    sub = everything[:ceal_subset]
    ceal = QUERY_STRATEGIES["ceal"](cfg)
    ceal.score_pool(model, Rows(pool.images, sub[:32]), Rows(pool.masks, sub[:32]), norm, 32)  # trace
    t = time.perf_counter()
    ceal.score_pool(model, Rows(pool.images, sub), Rows(pool.masks, sub), norm, 32)
    ceal_s = time.perf_counter() - t
    peak = meter.stop()  # the product's path: load, statistics, DSAL and CEAL scoring
    # the baseline: the same batches through a compiled forward pass, outputs discarded (model.predict
    # would keep every head of the whole pool in memory)
    import tensorflow as tf

    forward = tf.function(lambda x: model(x, training=False)["main"])
    images_only = make_dataset(Rows(pool.images, everything), Rows(pool.masks, everything), norm, 32).map(
        lambda x, y: x)
    for x in images_only.take(1):
        forward(x)
    t = time.perf_counter()
    for x in images_only:
        forward(x)
    predict_s = time.perf_counter() - t
    t = time.perf_counter()
    dsal.score_pool(model, Rows(pool.images, sub), Rows(pool.masks, sub), norm, 32)
    dsal_sub_s = time.perf_counter() - t
    return dict(n=len(pool), load_s=load_s, dsal_s=dsal_s, predict_s=predict_s, ceal_ratio=ceal_s / dsal_sub_s,
                peak_anon_mib=peak, cache_mib=sum(f.stat().st_size for f in cache.rglob("*.npy")) / 2**20)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="2000,10000,30000")
    ap.add_argument("--work", default="exp/bench-scale", help="generated pools and caches (git-ignored)")
    ap.add_argument("--ceal-subset", type=int, default=256)
    ap.add_argument("--out", default="bench/results/scale.md")
    ap.add_argument("--child", nargs=2, metavar=("DATA", "CACHE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(Path(args.child[0]), Path(args.child[1]), args.ceal_subset)))
        return
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        data, cache = Path(args.work) / f"pool{n}", Path(args.work) / f"cache{n}"
        make_pool(data, n)
        out = subprocess.run([sys.executable, __file__, "--child", str(data), str(cache), "--ceal-subset",
                              str(args.ceal_subset)], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(r)
        print(r, flush=True)
        lines = [
            "# Pools larger than memory", "",
            f"`python bench/bench_scale.py --sizes {args.sizes}` ({os.cpu_count()} CPU cores, no GPU, other "
            "processes sharing the cores: speeds are lower bounds). Generated pools at 192x240 RGB; demo-size "
            "U-Net (8 base filters), batch 32. Each size runs in a fresh process. Peak RssAnon is anonymous "
            "resident memory (memory-mapped cache pages excluded: the kernel can drop them) over loading, the "
            "statistics, DSAL scoring of the whole pool and CEAL scoring of the subset; it includes TensorFlow's "
            "own runtime. The bare forward pass is the same batches through a compiled call, outputs discarded.", "",
            "| pool | load (decode + cache + stats) s | peak RssAnon MiB | cache on disk MiB | DSAL scoring img/s "
            "| DSAL / bare predict | CEAL (T=20) / DSAL |",
            "|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            lines.append(f"| {r['n']} | {r['load_s']:.0f} | {r['peak_anon_mib']:.0f} | {r['cache_mib']:.0f} | "
                         f"{r['n'] / r['dsal_s']:.1f} | {r['dsal_s'] / r['predict_s']:.2f} | {r['ceal_ratio']:.1f} |")
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
