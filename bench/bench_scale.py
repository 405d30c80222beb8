"""Pools larger than memory: peak anonymous memory per phase of one round, and scoring speed, against pool size.

Not a test: numbers only. For each pool size, a generated orgData folder at 192x240 (JPEG images,
PNG masks; 32 val and 32 test images) goes through one active-learning round in a fresh process,
through the product's own functions, phase by phase:

  decode      `load_split` of train/val/test: decoding into the memory-mapped cache (`--fresh-cache`
              deletes it first, so the decode is measured; without it a cache from an earlier run is mapped)
  normalizer  `Normalizer.fit` on the pool (streaming z-score statistics)
  training    `train.fit` of a demo-size U-Net (8 base filters) on NB_LABELED images, `--epochs` epochs
  scoring     `active.score_round`: DSAL over the whole unlabelled pool (after a 64-image trace)
  selection   `active.choose_labels`: oracle picks, pseudo labels from the disk-backed `pred` store,
              pseudo PNGs, scores.csv, the saved pool; then the next round's training set
  evaluation  `evaluate.evaluate_model` on the test split

then, outside the round, a bare compiled forward pass over the same pool (the DSAL / bare ratio) and
CEAL (T = 20 dropout passes) on a subset. RssAnon (anonymous resident memory: pages of a memory-mapped
file do not count, the kernel can drop them) is read from /proc/self/status at the end of every phase
and polled every 50 ms for each phase's peak; VmRSS is recorded alongside.

    python bench/bench_scale.py --sizes 500,4000 --fresh-cache --out bench/results/scale.md
    python bench/bench_scale.py --sizes 500,4000,10000,30000 --fresh-cache --out bench/results/scale.md
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ROWS, COLS = 192, 240
EVAL_IMAGES = 32  # val and test split sizes
PHASES = ("decode", "normalizer", "training", "scoring", "selection", "evaluation")


def make_pool(root: Path, n: int) -> None:
    """train (n images), val and test (32 each); each split made once (a marker file per split)."""
    import cv2
    import numpy as np

    rng = np.random.default_rng(0)
    base = rng.integers(60, 200, (ROWS, COLS, 3), dtype=np.uint8)
    old = (root / f".made{n}").is_file()  # the marker of pools made before the test split existed
    for split, count in (("train", n), ("val", EVAL_IMAGES), ("test", EVAL_IMAGES)):
        done = root / f".made-{split}{count}"
        if done.is_file() or (old and split != "test"):
            continue
        (root / f"{split}Img").mkdir(parents=True, exist_ok=True)
        (root / f"{split}GT").mkdir(parents=True, exist_ok=True)
        shift = 7 if split == "test" else 0  # test images differ from the val ones
        for i in range(count):
            img = np.roll(base, ((i + shift) * 13) % COLS, axis=1).copy()
            mask = np.zeros((ROWS, COLS), np.uint8)
            cv2.circle(mask, (int(40 + i * 7 % 160), int(50 + (i + shift) * 3 % 90)), int(20 + i % 30), 255, -1)
            img[mask > 0] = (img[mask > 0] * 0.4).astype(np.uint8)
            cv2.imwrite(str(root / f"{split}Img" / f"im_{i:06d}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 90])
            cv2.imwrite(str(root / f"{split}GT" / f"im_{i:06d}_segmentation.png"), mask)
        done.write_text("ok")


def proc_status(field: str) -> int:
    """A kB field of /proc/self/status (RssAnon, VmRSS, ...); 0 where the kernel has none."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class PhaseMeter:
    """Polls RssAnon on a thread; `mark(phase)` closes a phase: its seconds, its peak RssAnon (polled
    every 50 ms, and read at the mark) and RssAnon/VmRSS at its end, in MiB."""

    def __init__(self):
        self.phases: list[dict] = []
        self._peak = proc_status("RssAnon")
        self._t = time.perf_counter()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            now = proc_status("RssAnon")
            with self._lock:
                self._peak = max(self._peak, now)
            time.sleep(0.05)

    def mark(self, phase: str) -> dict:
        now = proc_status("RssAnon")
        with self._lock:
            peak, self._peak = max(self._peak, now), now
        t = time.perf_counter()
        row = dict(phase=phase, s=round(t - self._t, 2), peak_anon_mib=round(peak / 1024, 1),
                   anon_mib=round(now / 1024, 1), rss_mib=round(proc_status("VmRSS") / 1024, 1))
        self._t = t
        self.phases.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)  # progress, and what is known if a phase fails
        return row

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def child(data: Path, cache: Path, work: Path, ceal_subset: int, epochs: int, precision: str) -> dict:
    """One pool size in a fresh process: one round phase by phase, then bare predict and CEAL."""
    meter = PhaseMeter()
    import numpy as np

    from dsal_tf import determinism, train
    from dsal_tf.active import RoundContext, choose_labels, score_round
    from dsal_tf.components import build, resolved
    from dsal_tf.config import resolve
    from dsal_tf.data import Normalizer, Rows, load_split, make_dataset
    from dsal_tf.evaluate import evaluate_model
    from dsal_tf.pool import Pool
    from dsal_tf.run import Run
    from dsal_tf.space import space_for
    from dsal_tf.strategies import QUERY_STRATEGIES

    cfg = resolve(dict(data_path=str(data), cache_dir=str(cache), exp_dir=str(work), img_rows=ROWS, img_cols=COLS,
                       base_filters=8, batch_size=32, mc_passes=20, progress=False, nb_initial_epochs=epochs,
                       pseudo_epoch=1, mixed_precision=precision))  # pseudo labels in round 1: the pred store is read
    cfg = resolved(cfg.replace(mixed_precision=train.resolve_precision(cfg)))
    shutil.rmtree(work, ignore_errors=True)
    meter.mark("import")
    pool_data, val, test = (load_split(cfg, s) for s in ("train", "val", "test"))
    meter.mark("decode")
    norm = Normalizer.fit(pool_data.images, cfg.normalization)
    meter.mark("normalizer")
    determinism.apply(cfg)
    train.set_precision(cfg)
    pool = Pool.initial(len(pool_data), cfg.nb_labeled, cfg.seed)
    x, y, is_pseudo = pool.training_set(pool_data.images, pool_data.masks)
    model = train.new_model(cfg, cfg.seed)
    train.fit(train.FitJob(model, cfg, x, y, is_pseudo, val, norm, work / "round_00", epochs, seed=cfg.seed * 1000))
    del x, y, is_pseudo
    meter.mark("training")
    parts = build(cfg)
    query, space = parts.query, parts.space
    ctx = RoundContext(cfg, Run(work), parts, pool_data, val, norm, round=1, pool=pool, model=model)
    unl = pool.unlabelled
    score_round(ctx, unl[:64])  # trace
    t = time.perf_counter()
    scores = score_round(ctx, unl)
    dsal_s = time.perf_counter() - t
    assert len(scores["uncertainty"]) == len(unl)
    meter.mark("scoring")
    scores["true_dice"] = np.where(pool_data.has_mask[unl], scores["true_dice"], np.nan)
    oracle_idx, pseudo_idx = choose_labels(ctx, unl, scores)
    x, y, is_pseudo = pool.training_set(pool_data.images, pool_data.masks)  # the next round's training set
    del scores, x, y, is_pseudo
    meter.mark("selection")
    per_image, _ = evaluate_model(model, test, norm, cfg.batch_size)
    meter.mark("evaluation")
    # outside the round: the same batches through a compiled forward pass, outputs discarded
    # (model.predict would keep every head of the whole pool in memory), and CEAL on a subset
    import tensorflow as tf

    forward = tf.function(lambda x: model(x, training=False)["main"])
    images_only = make_dataset(Rows(pool_data.images, unl), Rows(pool_data.masks, unl), norm, 32).map(lambda x, y: x)
    for x in images_only.take(1):
        forward(x)
    t = time.perf_counter()
    for x in images_only:
        forward(x)
    predict_s = time.perf_counter() - t
    sub = unl[:ceal_subset]
    ceal, space = QUERY_STRATEGIES["ceal"].from_config(cfg), space_for(cfg.replace(batch_size=32))
    space.score_pool(ceal, model, Rows(pool_data.images, sub[:32]), Rows(pool_data.masks, sub[:32]), norm)  # trace
    t = time.perf_counter()
    space.score_pool(ceal, model, Rows(pool_data.images, sub), Rows(pool_data.masks, sub), norm)
    ceal_s = time.perf_counter() - t
    t = time.perf_counter()
    space.score_pool(query, model, Rows(pool_data.images, sub), Rows(pool_data.masks, sub), norm)
    dsal_sub_s = time.perf_counter() - t
    meter.mark("extras")
    meter.stop()
    round_phases = [p for p in meter.phases if p["phase"] in PHASES]
    return dict(n=len(pool_data), n_scored=len(unl), precision=cfg.mixed_precision, epochs=epochs,
                n_oracle=len(oracle_idx), n_pseudo=len(pseudo_idx), test_dice=round(float(per_image["dice"].mean()), 4),
                load_s=sum(p["s"] for p in meter.phases if p["phase"] in ("decode", "normalizer")),
                dsal_s=dsal_s, predict_s=predict_s, ceal_ratio=ceal_s / dsal_sub_s,
                peak_anon_mib=max(p["peak_anon_mib"] for p in round_phases),
                pool_mib=pool_data.images.nbytes / 2**20,
                cache_mib=sum(f.stat().st_size for f in cache.rglob("*.npy")) / 2**20, phases=meter.phases)


def report(rows: list[dict], args) -> list[str]:
    cmd = f"python bench/bench_scale.py --sizes {args.sizes}" + (" --fresh-cache" if args.fresh_cache else "")
    lines = [
        "# Pools larger than memory", "",
        f"`{cmd}` ({os.cpu_count()} CPU cores, no GPU; precision {rows[0]['precision']}). Generated pools at "
        f"192x240 RGB; demo-size U-Net (8 base filters), batch 32, {rows[0]['epochs']} training epoch(s) on "
        "NB_LABELED images. Each size runs one round in a fresh process through the product's functions "
        "(bench/bench_scale.py docstring). Peak RssAnon is anonymous resident memory (memory-mapped cache "
        "pages excluded: the kernel can drop them) over the round's phases; it includes TensorFlow's own "
        "runtime. The bare forward pass is the same batches through a compiled call, outputs discarded.", "",
        "| pool | pool uint8 MiB | load (decode + stats) s | peak RssAnon MiB | cache on disk MiB | DSAL scoring img/s "
        "| DSAL / bare predict | CEAL (T=20) / DSAL |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['n']} | {r['pool_mib']:.0f} | {r['load_s']:.0f} | {r['peak_anon_mib']:.0f} | "
                     f"{r['cache_mib']:.0f} | {r['n_scored'] / r['dsal_s']:.1f} | {r['dsal_s'] / r['predict_s']:.2f} | "
                     f"{r['ceal_ratio']:.1f} |")
    lines += ["", "RssAnon per phase, MiB: peak during the phase / at its end (seconds in the phase).", "",
              "| pool | " + " | ".join(PHASES) + " |", "|---:|" + "---:|" * len(PHASES)]
    for r in rows:
        by = {p["phase"]: p for p in r["phases"]}
        cells = [f"{by[k]['peak_anon_mib']:.0f} / {by[k]['anon_mib']:.0f} ({by[k]['s']:.0f} s)" if k in by else ""
                 for k in PHASES]
        lines.append(f"| {r['n']} | " + " | ".join(cells) + " |")
    if len(rows) > 1:
        lo = min(rows, key=lambda r: r["n"])
        lines += ["", "Peak RssAnon above the smallest pool, against the extra pool bytes (aim: at most 25%):", ""]
        for r in rows:
            if r is lo:
                continue
            extra = r["pool_mib"] - lo["pool_mib"]
            more = r["peak_anon_mib"] - lo["peak_anon_mib"]
            lines.append(f"- {r['n']} vs {lo['n']} images: {more:+.0f} MiB for {extra:+.0f} MiB of pool "
                         f"({more / extra:.0%})")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="500,4000,10000,30000")
    ap.add_argument("--work", default="exp/bench-scale", help="generated pools and caches (git-ignored)")
    ap.add_argument("--ceal-subset", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=1, help="training epochs of the round (on NB_LABELED images)")
    ap.add_argument("--precision", default="off", help="MIXED_PRECISION of the round (off, auto, bfloat16, ...)")
    ap.add_argument("--fresh-cache", action="store_true", help="delete each pool's decoded cache first")
    ap.add_argument("--out", default=str(Path(os.environ.get("RESULTS_DIR") or "bench/results") / "scale.md"))
    ap.add_argument("--exp-dir", default=None, help="if given, --work is <exp-dir>/bench-scale")
    ap.add_argument("--child", nargs=3, metavar=("DATA", "CACHE", "WORK"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.exp_dir:
        args.work = str(Path(args.exp_dir) / "bench-scale")
    if args.child:
        data, cache, work = (Path(a) for a in args.child)
        print(json.dumps(child(data, cache, work, args.ceal_subset, args.epochs, args.precision)))
        return
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        data, cache, work = (Path(args.work) / f"{kind}{n}" for kind in ("pool", "cache", "round"))
        make_pool(data, n)
        if args.fresh_cache:
            shutil.rmtree(cache, ignore_errors=True)
        out = subprocess.run([sys.executable, __file__, "--child", str(data), str(cache), str(work),
                              "--ceal-subset", str(args.ceal_subset), "--epochs", str(args.epochs),
                              "--precision", args.precision], stdout=subprocess.PIPE, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "phases"}), flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("\n".join(report(rows, args)) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
