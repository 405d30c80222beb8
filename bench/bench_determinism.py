"""Speed cost of DETERMINISTIC (seeds + tf op determinism) on the isic2017-cpu model.

Each measurement runs in a fresh process, since op determinism cannot be switched off once on;
off and on alternate so that load changes on a shared machine hit both alike. Measures one
training epoch (`model.fit` on augmented, shuffled tf.data batches, the loop's own `make_dataset`)
and one scoring pass (DSAL, one forward pass per image) on random 64x64 images. Both wall time
and CPU time (`time.process_time`, all threads of the process) are recorded: on a shared machine
the wall time mostly measures the other jobs, the CPU time the work done.

Usage: python bench/bench_determinism.py [--images 320] [--repeats 3]  (writes bench/results/determinism.md)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "determinism.md"


def measure(deterministic: bool, n_images: int) -> dict:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import numpy as np

    from dsal_tf import determinism, train
    from dsal_tf.config import resolve
    from dsal_tf.data import Normalizer, make_dataset
    from dsal_tf.model import HEADS
    from dsal_tf.space import space_for
    from dsal_tf.strategies import QUERY_STRATEGIES

    cfg = resolve({"preset": "isic2017-cpu", "deterministic": deterministic, "progress": False})
    determinism.apply(cfg)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (n_images, cfg.img_rows, cfg.img_cols, 3), dtype=np.uint8)
    masks = (images[..., :1] > 127).astype(np.uint8)
    norm = Normalizer.fit(images, "zscore")
    model = train.new_model(cfg, 0)
    ds = make_dataset(images, masks, norm, cfg.batch_size, shuffle=True, augment=True, seed=1, heads=HEADS)
    model.fit(ds.take(2), epochs=1, verbose=0)  # trace and warm up
    t, c = time.perf_counter(), time.process_time()
    model.fit(ds, epochs=1, verbose=0)
    fit_s, fit_cpu = time.perf_counter() - t, time.process_time() - c
    query, space = QUERY_STRATEGIES["dsal"].from_config(cfg), space_for(cfg)
    space.score_pool(query, model, images[:32], masks[:32], norm)  # trace
    t, c = time.perf_counter(), time.process_time()
    space.score_pool(query, model, images, masks, norm)
    score_s, score_cpu = time.perf_counter() - t, time.process_time() - c
    return {"deterministic": deterministic, "fit_epoch_s": fit_s, "score_s": score_s,
            "fit_epoch_cpu_s": fit_cpu, "score_cpu_s": score_cpu, "steps": -(-n_images // cfg.batch_size)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=320)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", choices=["on", "off"])
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.child == "on", args.images)))
        return
    rows = []
    for _ in range(args.repeats):
        for mode in ("off", "on"):
            out = subprocess.run([sys.executable, __file__, "--child", mode, "--images", str(args.images)],
                                 capture_output=True, text=True, check=True, cwd=ROOT)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(rows[-1], file=sys.stderr)
    import pandas as pd

    df = pd.DataFrame(rows)
    med = df.groupby("deterministic")[["fit_epoch_s", "score_s", "fit_epoch_cpu_s", "score_cpu_s"]].median()
    ratio = med.loc[True] / med.loc[False]
    load = os.getloadavg()[0]
    lines = [
        "# Cost of DETERMINISTIC (seeds + `tf.config.experimental.enable_op_determinism()`)\n",
        f"Command: `python bench/bench_determinism.py --images {args.images} --repeats {args.repeats}`; "
        f"isic2017-cpu model (64x64 RGB, 16 base filters, batch 16), random images; one training epoch "
        f"({rows[0]['steps']} steps, augmented and shuffled) and one DSAL scoring pass over {args.images} "
        f"images; each measurement in a fresh process, off and on alternating; medians of {args.repeats}.",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, shared with other "
        f"jobs (1-minute load average at the end: {load:.1f}): wall times are noisy; CPU seconds "
        "(all threads of the process) measure the work.\n",
        "| DETERMINISTIC | fit epoch, CPU s | scoring pass, CPU s | fit epoch, wall s | scoring pass, wall s |",
        "|---|---|---|---|---|",
        *[f"| {d} | {med.loc[d, 'fit_epoch_cpu_s']:.2f} | {med.loc[d, 'score_cpu_s']:.2f} | "
          f"{med.loc[d, 'fit_epoch_s']:.2f} | {med.loc[d, 'score_s']:.2f} |" for d in (False, True)],
        f"| ratio True/False | {ratio['fit_epoch_cpu_s']:.2f}x | {ratio['score_cpu_s']:.2f}x | "
        f"{ratio['fit_epoch_s']:.2f}x | {ratio['score_s']:.2f}x |",
        "",
        "All measurements (s):\n",
        "| DETERMINISTIC | fit epoch CPU | scoring CPU | fit epoch wall | scoring wall |",
        "|---|---|---|---|---|",
        *[f"| {r['deterministic']} | {r['fit_epoch_cpu_s']:.2f} | {r['score_cpu_s']:.2f} | {r['fit_epoch_s']:.2f} | "
          f"{r['score_s']:.2f} |" for r in rows],
    ]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n".join(lines) + "\n")
    print(f"wrote {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
