"""The 2-D image planner: `make_image_plan`, which `make_plan` runs on a folder of PNG/JPG images.

Its own steps: the fingerprint (`fingerprint`, streaming: headers, a seeded sample of decoded images, every
train/val mask), the size ladder and size rule (`size_ladder`, `MIN_STRUCTURE_PIXELS`), a ladder size as a
candidate (`candidate`, `pick_batch_size`), the measured steps and the learning probe of a candidate U-Net
(`measure_steps`, `probe_learning`), the settings and reasons from the fingerprint (`base_settings`,
`plan_reasons`, `PLANNED`) and the warnings (`plan_warnings`); the steps it shares with the volume planner are
in `core.py`.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ..config import Config, resolve
from ..errors import DsalError
from .core import (
    INITIAL_STEPS,
    MEMORY_SHARE,
    PROBE_STEPS,
    ROUND_STEPS,
    SPECK_FRACTION,
    SPLITS,
    Planning,
    _probe_fit,
    _timed,
    activation_bytes,
    as_protocol,
    decide,
    memory_bytes,
    pool_counts,
    preference,
    protocol_reasons,
    schedule,
    training_settings,
)

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
MIN_STRUCTURE_PIXELS = 16  # the 5th-percentile structure keeps at least a 4x4 patch after resizing
MIN_SIDE = 64  # smallest input side considered (below it the U-Net's deepest block is 4 pixels)
INTENSITY_SAMPLE = 64  # training images decoded for intensity statistics
BATCH_SIZES = (16, 8, 4, 2)  # largest whose estimated activations use <= MEMORY_SHARE of memory
PROBE_IMAGES, PROBE_EVAL = 256, 64  # pool images the probe trains on (seeded sample); of them, the ones it scores


# ------------------------------------------------------------------------------------ fingerprint
def _split_files(root: Path, split: str) -> list[tuple[Path, Path | None]]:
    """(image, mask or None) of a split, sorted; a missing folder is an empty split."""
    img_dir, gt_dir = root / f"{split}Img", root / f"{split}GT"
    if not img_dir.is_dir():
        return []
    out = []
    for img in sorted(p for p in img_dir.iterdir() if p.suffix.lower() in IMAGE_EXTS and not p.name.startswith(".")):
        cands = [gt_dir / f"{img.stem}_segmentation.png", gt_dir / img.name, gt_dir / f"{img.stem}.png"]
        out.append((img, next((c for c in cands if c.is_file()), None)))
    return out


def _header(path: Path) -> tuple[int, int, str]:
    """(rows, cols, mode) from the file header only (PIL reads no pixel data until asked)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.size[1], im.size[0], im.mode
    except (UnidentifiedImageError, OSError):
        raise DsalError(f"cannot read the header of {path} (corrupt or not an image); replace or remove it") from None


def component_areas(mask: np.ndarray) -> np.ndarray:
    """Pixel counts of the 8-connected foreground components of a 2-D mask (foreground = > 0)."""
    n, _, stats, _ = cv2.connectedComponentsWithStats((mask > 0).astype(np.uint8), connectivity=8)
    return stats[1:n, cv2.CC_STAT_AREA].astype(np.int64)


def _looks_like_ct(dtype: np.dtype, lo: float, hi: float, p1: float) -> bool:
    """16-bit values spanning > 1500 levels with air at about -1000 HU (signed) or near 0 (HU + 1024)."""
    if np.dtype(dtype).itemsize < 2 or hi - lo < 1500:
        return False
    return lo <= -500 or (lo >= 0 and p1 <= 100)


def fingerprint(data_path: str | Path, sample: int = INTENSITY_SAMPLE, seed: int = 0,
                log: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """The dataset fingerprint (see the module docstring); never holds more than one image decoded.

    Three streaming steps: `_size_stats` (every file's header), `_intensity_stats` (a seeded sample of
    training images) and `_mask_stats` (every train and val mask)."""
    root = Path(data_path)
    files = {s: _split_files(root, s) for s in SPLITS}
    if not files["train"]:
        raise DsalError(f"no training images in {root / 'trainImg'}; put the pool there (see README, Data)")
    headers = [_header(img) for s in SPLITS for img, _ in files[s]]
    color, intensity, decode_s = _intensity_stats(files["train"], sample, seed)
    masks = _mask_stats([mask for split in ("train", "val") for _img, mask in files[split]])
    log(f"fingerprint: {len(headers)} image headers, {intensity['sampled_images']} sampled images, "
        f"{masks['masks_read']} masks")
    return {
        "data_path": str(root),
        "counts": {s: len(files[s]) for s in SPLITS},
        "image_size": _size_stats(headers),
        "color": color,
        "intensity": intensity,
        "decode_s_per_image": decode_s,
        "masks": masks,
    }


def _size_stats(headers: list[tuple[int, int, str]]) -> dict[str, Any]:
    """Sizes, aspects and colour modes from the (rows, cols, mode) of every image header."""
    rows = np.array([h[0] for h in headers], float)
    cols = np.array([h[1] for h in headers], float)
    aspect = cols / rows
    return {
        "median_rows": float(np.median(rows)), "median_cols": float(np.median(cols)),
        "rows_range": [int(rows.min()), int(rows.max())], "cols_range": [int(cols.min()), int(cols.max())],
        "median_aspect": round(float(np.median(aspect)), 4),
        "aspect_range": [round(float(aspect.min()), 4), round(float(aspect.max()), 4)],
        "distinct_sizes": len({(h[0], h[1]) for h in headers}), "modes": sorted({h[2] for h in headers}),
    }


def _decode_sample(paths: list[Path]) -> dict[str, Any]:
    """Decode `paths` one at a time (timed, with the loader's resize) and accumulate per-channel sums and
    squares, the pixel count, the extremes, each image's 1st percentile and whether grey is stored as RGB."""
    acc: dict[str, Any] = dict(sums=0.0, sq=0.0, n_px=0, lo=np.inf, hi=-np.inf, p1s=[], grey_as_rgb=True,
                               decode_s=[], dtype=np.dtype(np.uint8))
    for path in paths:
        t = time.perf_counter()
        img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if img is None:
            raise DsalError(f"cannot decode image {path} (corrupt or not an image); replace or remove it")
        cv2.resize(img, (64, 64), interpolation=cv2.INTER_AREA)  # the loader's work, for the load-time estimate
        acc["decode_s"].append(time.perf_counter() - t)
        acc["dtype"] = img.dtype
        x = img.reshape(img.shape[0], img.shape[1], -1).astype(np.float64)
        if x.shape[-1] >= 3:
            acc["grey_as_rgb"] &= bool(np.array_equal(x[..., 0], x[..., 1]) and np.array_equal(x[..., 1], x[..., 2]))
            x = x[..., :3]
        acc["sums"] = acc["sums"] + x.reshape(-1, x.shape[-1]).sum(0)
        acc["sq"] = acc["sq"] + (x.reshape(-1, x.shape[-1]) ** 2).sum(0)
        acc["n_px"] += x.shape[0] * x.shape[1]
        acc["lo"], acc["hi"] = min(acc["lo"], float(x.min())), max(acc["hi"], float(x.max()))
        acc["p1s"].append(float(np.percentile(x, 1)))
    return acc


def _intensity_stats(train: list[tuple[Path, Path | None]], sample: int, seed: int) -> tuple[str, dict, float]:
    """(colour mode, intensity statistics, median decode seconds per image) from a seeded sample of
    `sample` training images."""
    rng = np.random.default_rng(seed)
    picks = np.sort(rng.choice(len(train), size=min(sample, len(train)), replace=False))
    acc = _decode_sample([train[i][0] for i in picks])
    mean = acc["sums"] / acc["n_px"]
    std = np.sqrt(np.maximum(acc["sq"] / acc["n_px"] - mean**2, 0.0))
    channels = len(np.atleast_1d(mean))
    grey_as_rgb, dtype, lo, hi = acc["grey_as_rgb"], acc["dtype"], acc["lo"], acc["hi"]
    color = "rgb" if channels >= 3 and not grey_as_rgb else "gray"
    intensity = {
        "sampled_images": int(len(picks)), "sample_seed": seed, "dtype": str(dtype),
        "min": lo, "max": hi, "mean": [round(float(v), 3) for v in np.atleast_1d(mean)],
        "std": [round(float(v), 3) for v in np.atleast_1d(std)],
        "grey_stored_as_rgb": bool(channels >= 3 and grey_as_rgb),
        "looks_like_ct_hu": _looks_like_ct(dtype, lo, hi, float(np.median(acc["p1s"]))),
        "note": f"statistics from a seeded sample of {len(picks)} training images (seed {seed}), "
                "decoded one at a time; sizes and modes from every file's header",
    }
    return color, intensity, round(float(np.median(acc["decode_s"])), 5)


def _mask_stats(mask_paths: list[Path | None]) -> dict[str, Any]:
    """Foreground fractions and connected components (8-connectivity, original size) of every mask, decoded
    one at a time; None is an image without a mask."""
    fractions, areas, raw, n_empty, n_masks, missing = [], [], [], 0, 0, 0
    for mask_path in mask_paths:
        if mask_path is None:
            missing += 1
            continue
        mask = cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE)
        if mask is None:
            raise DsalError(f"cannot decode mask {mask_path} (corrupt or not an image); replace or remove it")
        n_masks += 1
        fractions.append(float((mask > 0).mean()))
        a = component_areas(mask)
        n_empty += int(len(a) == 0)
        raw.extend(a.tolist())
        if len(a):
            areas.extend(a[a >= SPECK_FRACTION * a.max()].tolist())
    areas_arr, raw_arr = np.array(areas, np.int64), np.array(raw, np.int64)
    return {
        "splits": ["train", "val"], "masks_read": n_masks, "images_without_mask": missing,
        "empty_masks": n_empty,
        "foreground_fraction_mean": round(float(np.mean(fractions)), 5) if fractions else None,
        "foreground_fraction_median": round(float(np.median(fractions)), 5) if fractions else None,
        "components": int(len(areas_arr)),
        "component_pixels_min": int(areas_arr.min()) if len(areas_arr) else None,
        "component_pixels_p5": round(float(np.percentile(areas_arr, 5)), 2) if len(areas_arr) else None,
        "component_pixels_median": float(np.median(areas_arr)) if len(areas_arr) else None,
        "specks_ignored": int(len(raw_arr) - len(areas_arr)),
        "all_components_min": int(raw_arr.min()) if len(raw_arr) else None,
        "all_components_p5": round(float(np.percentile(raw_arr, 5)), 2) if len(raw_arr) else None,
        "note": "8-connected components in pixels at the original size; structures exclude specks under "
                f"{SPECK_FRACTION:.0%} of their mask's largest component (all_components_* include them); "
                "the test split is not read",
    }


# ------------------------------------------------------------------------------------ size rule
def size_ladder(fp: dict, depth: int = 4, min_pixels: int = MIN_STRUCTURE_PIXELS) -> list[dict]:
    """Input sizes from `MIN_SIDE` up to the median image size, in steps of 2**DEPTH, keeping the
    median aspect; each says how many pixels the 5th-percentile structure keeps at that size and
    whether that meets `min_pixels`."""
    step = 2**depth
    rows, cols = fp["image_size"]["median_rows"], fp["image_size"]["median_cols"]
    short = min(rows, cols)
    top = max(step, int(short // step) * step)
    sides = sorted({s for s in range(min(MIN_SIDE, top), top + 1, step)} | {top})
    p5 = fp["masks"]["component_pixels_p5"]
    out = []
    for s in sides:
        scale = s / short
        r = max(step, int(round(rows * scale / step)) * step)
        c = max(step, int(round(cols * scale / step)) * step)
        kept = None if p5 is None else p5 * (r / rows) * (c / cols)
        out.append(dict(img_rows=r, img_cols=c, p5_structure_pixels=None if kept is None else round(kept, 2),
                        meets_size_rule=kept is None or kept >= min_pixels))
    return out


# ------------------------------------------------------------------------------------ measured steps
def pick_batch_size(cfg: Config, memory: int) -> int:
    per_image = activation_bytes(cfg)
    return next((b for b in BATCH_SIZES if b * per_image <= MEMORY_SHARE * memory), BATCH_SIZES[-1])


def measure_steps(cfg: Config, steps: int = 3, seed: int = 0) -> dict[str, float]:
    """Seconds per training, validation and DSAL-scoring batch of the real U-Net (`train.new_model`),
    through the real `fit`/`evaluate` input pipeline and the strategy's compiled scoring pass,
    after one warm-up call of each (its extra time is `trace_s`)."""
    import tempfile

    from .. import determinism, train
    from ..data import Normalizer, make_dataset
    from ..model import HEADS
    from ..space import space_for
    from ..strategies import QUERY_STRATEGIES

    b = cfg.batch_size
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(2 * b, cfg.img_rows, cfg.img_cols, cfg.channels), dtype=np.uint8)
    masks = (rng.random((2 * b, cfg.img_rows, cfg.img_cols, 1)) < 0.2).astype(np.uint8)
    norm = Normalizer.fit(images, cfg.normalization)
    determinism.apply(cfg)  # seeds and op determinism as the loop sets them: the same kernels are timed
    train.set_precision(cfg)
    model = train.new_model(cfg, seed)
    ds = make_dataset(images, masks, norm, b, shuffle=True, augment=cfg.augment, seed=seed, heads=HEADS,
                      repeat=True)
    val = make_dataset(images[:b], masks[:b], norm, b, heads=HEADS)
    timed = _timed
    first_fit = timed(lambda: model.fit(ds, steps_per_epoch=1, epochs=1, verbose=0, shuffle=False))
    train_s = timed(lambda: model.fit(ds, steps_per_epoch=steps, epochs=1, verbose=0, shuffle=False)) / steps
    first_eval = timed(lambda: model.evaluate(val, verbose=0))
    eval_s = min(timed(lambda: model.evaluate(val, verbose=0)) for _ in range(steps))
    query, space = QUERY_STRATEGIES[cfg.query_strategy].from_config(cfg), space_for(cfg.replace(batch_size=b))
    first_score = timed(lambda: space.score_pool(query, model, images, masks, norm))
    score_s = min(timed(lambda: space.score_pool(query, model, images, masks, norm)) for _ in range(steps)) / 2
    with tempfile.TemporaryDirectory() as tmp:
        save_s = timed(lambda: model.save(Path(tmp) / "m.keras"))
    trace = max(0.0, first_fit - train_s) + max(0.0, first_eval - eval_s) + max(0.0, first_score - 2 * score_s)
    return dict(train_step_s=round(train_s, 4), eval_step_s=round(eval_s, 4), score_step_s=round(score_s, 4),
                epoch_overhead_s=round(save_s, 4), trace_s=round(trace, 2))


def probe_learning(cfg: Config, steps: int = PROBE_STEPS, seed: int = 0) -> dict[str, Any]:
    """Train the candidate's real U-Net (`train.new_model`: its loss, batch Dice and norm) for `steps`
    steps through the run's sampler and warm-up on a seeded sample of `PROBE_IMAGES` pool images at
    its input size; return the soft Dice of the main head over `PROBE_EVAL` of them (one ratio over
    all their pixels) before and after, and the mean step time after the first 10 steps."""
    from .. import determinism, train
    from ..data import Normalizer, find_pairs, make_dataset, read_pair
    from ..evaluate import predict_main
    from ..model import HEADS

    pairs = find_pairs(cfg.data_path, "train", cfg.mask_naming)
    picks = np.sort(np.random.default_rng(seed).choice(len(pairs), size=min(PROBE_IMAGES, len(pairs)), replace=False))
    decoded = [read_pair(*pairs[i], cfg.img_rows, cfg.img_cols, cfg.color) for i in picks]
    images, masks = np.stack([d[0] for d in decoded]), np.stack([d[1] for d in decoded])
    norm = Normalizer.fit(images, cfg.normalization)
    determinism.apply(cfg)
    train.set_precision(cfg)
    model = train.new_model(cfg, seed)
    ds = make_dataset(images, masks, norm, cfg.batch_size, shuffle=True, augment=cfg.augment, seed=seed, heads=HEADS,
                      repeat=True, foreground_oversample=cfg.foreground_oversample)
    return _probe_fit(cfg, model, ds, steps, masks[:PROBE_EVAL],
                      lambda: predict_main(model, images[:PROBE_EVAL], norm, cfg.batch_size),
                      math.ceil(min(cfg.nb_labeled, len(pairs)) / cfg.batch_size))


# ------------------------------------------------------------------------------------ the plan
PLANNED = ("img_rows", "img_cols", "color", "base_filters", "batch_size", "loss", "batch_dice", "normalization",
           "learning_rate", "nb_labeled", "nb_iterations", "nb_next_sample", "pseudo_epoch",
           "nb_pseudo_initial", "pseudo_rate", "nb_initial_epochs", "nb_active_epochs", "pool_size")


def base_settings(fp: dict) -> dict[str, tuple[Any, str]]:
    """Settings that follow from the fingerprint alone, each with its reason."""
    shared = training_settings(fp["masks"]["foreground_fraction_mean"])
    return {
        "color": (fp["color"], "grey images (or grey stored as RGB)" if fp["color"] == "gray" else "colour images"),
        "loss": shared["loss"],
        "normalization": ("zscore", "z-score with the training pool's per-channel statistics (saved with the run)"),
        **{k: shared[k] for k in ("batch_dice", "learning_rate", "pool_size")},
    }


def planning(data_path: str | Path, fp: dict, fixed: dict[str, Any], budget_minutes: float,
             full_supervision: bool = False, memory: int | None = None, started: float | None = None) -> Planning:
    """The `Planning` of `data_path` from its fingerprint; `memory` defaults to this machine's (`memory_bytes`),
    `started` (when planning began, `time.perf_counter()`) to now."""
    memory = memory_bytes() if memory is None else memory
    n_pool, n_val = pool_counts(data_path, fp, fixed, "images")
    base = {k: v for k, (v, _) in base_settings(fp).items()}
    workers = min(8, os.cpu_count() or 1)
    load_s = fp["decode_s_per_image"] * (n_pool + n_val) / workers
    return Planning(fp, fixed, base, n_pool, n_val, memory, load_s, 60.0 * budget_minutes, full_supervision,
                    make=candidate, started=time.perf_counter() if started is None else started)


def candidate(plan: Planning, size: dict, filters: int) -> tuple[Config, dict]:
    """The settings of a ladder size at `filters` base filters (the user's fixed settings win; batch size and
    schedule follow) and its candidate row: size, filters, batch size and the size rule at that size."""
    fixed = plan.fixed
    cfg = resolve({**plan.base, **size_only(size), "base_filters": filters, **fixed}, source="the plan")
    if "batch_size" not in fixed:
        cfg = cfg.replace(batch_size=pick_batch_size(cfg, plan.memory))
    sched = {k: v for k, v in schedule(plan.n_pool, cfg.batch_size).items() if k not in fixed}
    cfg = cfg.replace(**sched)
    cfg = as_protocol(plan, cfg)
    p5, im = plan.fp["masks"]["component_pixels_p5"], plan.fp["image_size"]
    kept = None if p5 is None else round(p5 * cfg.img_rows / im["median_rows"] * cfg.img_cols / im["median_cols"], 2)
    return cfg, {"img_rows": cfg.img_rows, "img_cols": cfg.img_cols, "base_filters": cfg.base_filters,
                 "batch_size": cfg.batch_size, "p5_structure_pixels": kept,
                 "meets_size_rule": kept is None or kept >= MIN_STRUCTURE_PIXELS}


def plan_reasons(plan: Planning, cfg: Config, best: dict, reason: str, recipe: dict,
                 learned: dict | None) -> dict[str, str]:
    """Why each planned setting has its value: the fingerprint's, the size and budget rules', the probe's, or
    "set by the user"."""
    fp = plan.fp
    reasons = {k: r for k, (_, r) in base_settings(fp).items()}
    reasons.update(
        img_rows=f"size rule: the 5th-percentile structure ({fp['masks']['component_pixels_p5']} px at the original "
                 f"size) keeps {best['p5_structure_pixels']} px (minimum {MIN_STRUCTURE_PIXELS}); aspect "
                 f"{fp['image_size']['median_aspect']} kept; " + reason,
        base_filters=reason,
        batch_size=f"largest of {list(BATCH_SIZES)} whose activations ({activation_bytes(cfg) / 2**20:.0f} MiB "
                   f"per image) use <= {MEMORY_SHARE:.0%} of {plan.memory / 2**30:.0f} GiB",
        nb_initial_epochs=f"about {INITIAL_STEPS} steps for the initial model, {ROUND_STEPS} in round 1 "
                          "(isic2017-cpu: 12 and 5 epochs)",
        nb_labeled="labels and queries scale with the pool like isic2017-cpu (600 + 5 x 70 of 1600)",
    )
    return protocol_reasons(plan, reasons, best, recipe, learned, PLANNED)


def plan_warnings(plan: Planning) -> list[str]:
    """What the user should know about the data (the budget's warnings are `Decision.warnings`)."""
    fp = plan.fp
    warnings = []
    if fp["intensity"]["looks_like_ct_hu"]:
        warnings.append("16-bit values look like CT Hounsfield units, but the loader reads 8 bits: window them "
                        "(e.g. lung -1000..400 HU) into 8-bit PNGs first")
    if fp["intensity"]["grey_stored_as_rgb"]:
        warnings.append("the images are grey stored as RGB: COLOR = gray uses a third of the input")
    if fp["masks"]["masks_read"] == 0:
        warnings.append("no masks found: the size rule could not be applied")
    return warnings


def make_image_plan(data_path: str | Path, budget_minutes: float, fixed: dict[str, Any],
                    measure: Callable[[Config], dict] | None = None, log: Callable[[str], None] = print,
                    sample: int = INTENSITY_SAMPLE, full_supervision: bool = False,
                    probe: Callable[[Config, int], dict] | None = None) -> dict[str, Any]:
    """`make_plan` for a folder of 2-D images (`fixed` already lower-case, with DATA_PATH). The steps, in order:
    `fingerprint`, `planning`, `size_ladder`, then the shared `search_candidates`, `choose_learning` and
    `fit_choice` (`decide`), `plan_reasons`, `plan_warnings`."""
    t0 = time.perf_counter()
    fp = fingerprint(data_path, sample=sample, seed=int(fixed.get("seed", 0)), log=log)
    probe = probe or (probe_learning if measure is None else None)
    measure = measure or measure_steps
    plan = planning(data_path, fp, fixed, budget_minutes, full_supervision,
                    memory=None if measure is measure_steps else 64 * 2**30, started=t0)
    ladder = size_ladder(fp, int(fixed.get("depth", Config.depth)))
    d = decide(plan, ladder, measure, probe, log)
    return {
        "budget_minutes": budget_minutes,
        "fingerprint": fp,
        "min_structure_pixels": MIN_STRUCTURE_PIXELS,
        "size_ladder": ladder,
        "candidates": sorted(d.rows, key=preference),
        "full_supervision": full_supervision,
        "probe": d.probe_summary(probe is not None),
        "choice": {"settings": {k: getattr(d.cfg, k) for k in PLANNED}, "predicted": d.predicted,
                   "reasons": plan_reasons(plan, d.cfg, d.best, d.reason, d.recipe, d.learned)},
        "warnings": plan_warnings(plan) + d.warnings(plan, budget_minutes),
        "plan_s": round(time.perf_counter() - t0, 1),
    }


def size_only(size: dict) -> dict:
    return {"img_rows": size["img_rows"], "img_cols": size["img_cols"]}
