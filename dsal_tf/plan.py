"""`dsal plan`: choose the input size and training settings from the data, within a time budget.

nnU-Net's self-configuration, for this product and for the machine at hand:

1. **Fingerprint** (`fingerprint`), streaming: image sizes and colour mode from file headers (no
   decode), intensity statistics from a seeded sample of training images decoded one at a time,
   and from every train/val mask (decoded one at a time; the test split is never looked at) the
   foreground fraction and the connected components (8-connectivity) in pixels at the original size.
   Structures are the components of at least `SPECK_FRACTION` of their mask's largest one; the
   specks below that (nearest-neighbour resizing leaves a few in ISIC masks) are counted apart.
2. **Candidates** (`size_ladder`): sizes that keep the median aspect and divide by 2**DEPTH, times
   base filters. The size rule: the 5th-percentile structure must keep `MIN_STRUCTURE_PIXELS`
   pixels after resizing.
3. **Measured steps** (`measure_steps`, `search_candidates`): a few real Keras training, validation
   and DSAL scoring steps of each candidate U-Net on this machine, after warm-up.
4. **Budget rule** (`predict_seconds`, `choose`): predicted run time = data loading + initial
   epochs + rounds x (scoring pass + epochs), from the measured per-step times, for the protocol
   that will run (with full supervision: the whole pool, no rounds); the preferred candidate whose
   prediction fits the budget wins.
5. **Learning probe** (`probe_learning`, `probe_verdict`): the would-be choice trains
   `PROBE_STEPS` steps on the pool; if its training soft Dice does not rise, the next recipe
   (`RECIPES`: nnU-Net's Dice + cross-entropy over the batch), then the next candidate, is tried.
   Refusals and their reasons stay in `plan.json`; the probe's step time replaces the 3-step one.

`make_plan` runs all five, as named steps over one `Planning` (see its docstring), and returns a
JSON-able dict; `write_plan` saves `plan.json` and a ready constants file. `PRESET = "auto"` runs the
plan on first use (`plan_for_run`).

A folder of NIfTI volumes (`make_volume_plan`, the one branch on the rank, in `make_plan`) goes through the
same steps with its own fingerprint (`volume_fingerprint`: shapes, spacings, the target spacing and the shapes
resampled to it, CT or MRI, components in voxels and mm^3), nnU-Net's patch rule (`patch_ladder`) and the
volume space's own streams, sliding-window inferer and batch counts (`measure_volume_steps`,
`probe_volume_learning`, `volume_batches`); docs/planning.md describes both.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from .config import Config, read_constants, resolve
from .errors import DsalError
from .volumes import dataset_rank

SPLITS = ("train", "val", "test")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
MIN_STRUCTURE_PIXELS = 16  # the 5th-percentile structure keeps at least a 4x4 patch after resizing
SPECK_FRACTION = 0.01  # a component under 1% of its mask's largest one is a speck (annotation noise), not a structure
MIN_SIDE = 64  # smallest input side considered (below it the U-Net's deepest block is 4 pixels)
FILTERS = (16, 32, 8)  # base-filter ladder; 8 only when no 16-filter candidate fits the budget
SMALL_FOREGROUND = 0.05  # mean foreground fraction below which the foreground counts as small
INTENSITY_SAMPLE = 64  # training images decoded for intensity statistics
BATCH_SIZES = (16, 8, 4, 2)  # largest whose estimated activations use <= MEMORY_SHARE of memory
MEMORY_SHARE = 0.25
# The active-learning schedule, scaled from `isic2017-cpu` (1600 pool: 600 initial, 5 rounds of 70,
# pseudo labels from round 3, 40 + 40(t-3)) by the pool size.
SCHEDULE_REFERENCE = dict(pool=1600, nb_labeled=600, nb_next_sample=70, nb_pseudo_initial=40, pseudo_rate=40)
NB_ITERATIONS, PSEUDO_EPOCH = 5, 3
MIN_INITIAL_STEPS = 150  # cutting epochs to fit a budget stops here
INITIAL_STEPS, ROUND_STEPS = 450, 200  # optimizer steps of the initial model and round 1 (isic2017-cpu: 12, 5 epochs)
PROBE_STEPS = 100  # optimizer steps of the learning probe
PROBE_IMAGES, PROBE_EVAL = 256, 64  # pool images the probe trains on (seeded sample); of them, the ones it scores
PROBE_MIN_RISE = 0.02  # the probe's training soft Dice must rise by this much, or the candidate is refused
MAX_PROBES = 4  # probes per plan; none of them learning is an error
# Tried in order on the would-be choice (a recipe touching a setting the user fixed is skipped); the second is
# nnU-Net's. Probe on covid_ct (issue 20), 128x128, 8 filters, 60 steps: per-image soft Dice 0.023 -> 0.0001
# (all-background), bce_dice + batch Dice 0.023 -> 0.106; on the demo set the first learns.
RECIPES: tuple[dict, ...] = ({}, {"loss": "bce_dice", "batch_dice": True})


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


# ------------------------------------------------------------------------------------ schedule
def schedule(n_pool: int, batch_size: int, epoch_steps: Callable[[int], int] | None = None) -> dict[str, int]:
    """The active-learning schedule and epochs for a pool of `n_pool` images (or volumes).

    Labels scale with the pool like `isic2017-cpu`; epochs give the initial model about
    `INITIAL_STEPS` optimizer steps and round 1 about `ROUND_STEPS` (isic2017-cpu: 12 and 5).
    `epoch_steps(n)`: optimizer steps of an epoch over n labelled items (default ceil(n / batch_size),
    one pass over the images; a volume epoch is `STEPS_PER_EPOCH` patch steps)."""
    ref = SCHEDULE_REFERENCE
    steps = epoch_steps or (lambda n: math.ceil(n / batch_size))

    def scaled(k):
        return max(1, round(n_pool * ref[k] / ref["pool"]))

    nb_labeled = min(n_pool, scaled("nb_labeled"))
    q = scaled("nb_next_sample")
    initial = min(50, max(5, math.ceil(INITIAL_STEPS / steps(nb_labeled))))
    active = min(30, max(2, math.ceil(ROUND_STEPS / steps(nb_labeled + q))))
    return dict(nb_labeled=nb_labeled, nb_iterations=NB_ITERATIONS, nb_next_sample=q, pseudo_epoch=PSEUDO_EPOCH,
                nb_pseudo_initial=scaled("nb_pseudo_initial"), pseudo_rate=scaled("pseudo_rate"),
                nb_initial_epochs=initial, nb_active_epochs=active)


# ------------------------------------------------------------------------------------ budget rule
Batches = Callable[[Config, str, int], int]


def image_batches(cfg: Config, kind: str, n: int) -> int:
    """Batches of a pass over `n` images, whatever its `kind` ("train": an epoch, "val", "score"):
    ceil(n / BATCH_SIZE)."""
    return math.ceil(n / cfg.batch_size)


def predict_seconds(cfg: Config, timing: dict, n_pool: int, n_val: int, load_s: float = 0.0,
                    batches: Batches | None = None) -> dict[str, float]:
    """Predicted run time of `cfg` from measured per-batch times (seconds).

    `timing`: `train_step_s`, `eval_step_s` (a validation batch), `score_step_s` (a pool-scoring
    batch), `epoch_overhead_s` (per epoch: checkpoint, logs), `trace_s` (once per run) and, where
    measured, `round_trace_s` (once per scoring pass: a volume space traces its windows each round).
    `batches(cfg, kind, n)`: batches of a pass of `kind` ("train": one epoch, "val", "score") over
    n items; default `image_batches`. Initial model: epochs x (training + validation batches); each
    round r: one scoring pass over the unlabelled pool, then epochs over the oracle + pseudo labels;
    plus data loading and tracing."""
    count = batches or image_batches
    val_batches = count(cfg, "val", n_val)

    def fit_s(n_train, epochs):
        return epochs * (count(cfg, "train", n_train) * timing["train_step_s"] + val_batches * timing["eval_step_s"]
                         + timing["epoch_overhead_s"])

    n_lab = min(cfg.nb_labeled, n_pool)
    train = fit_s(n_lab, cfg.nb_initial_epochs)
    score = 0.0
    for r in range(1, cfg.nb_iterations + 1):
        unl = n_pool - n_lab
        score += count(cfg, "score", unl) * timing["score_step_s"] + (timing.get("round_trace_s", 0.0) if unl else 0.0)
        n_lab = min(n_pool, n_lab + cfg.nb_next_sample)
        n_pseudo = min(cfg.nb_pseudo(r), max(0, unl - cfg.nb_next_sample))
        train += fit_s(n_lab + n_pseudo, cfg.nb_active_epochs)
    total = load_s + timing["trace_s"] + train + score
    return dict(load_s=round(load_s, 2), trace_s=round(timing["trace_s"], 2), train_s=round(train, 2),
                score_s=round(score, 2), total_s=round(total, 2))


def input_size(c: dict) -> tuple[int, ...]:
    """A candidate's (or ladder size's) input: (rows, cols) of an image, or a volume's patch (D, H, W)."""
    return tuple(int(n) for n in c["patch_size"]) if "patch_size" in c else (c["img_rows"], c["img_cols"])


def preference(c: dict) -> tuple:
    """Larger is preferred: meets the size rule, >= 16 base filters, more pixels (voxels), more filters."""
    return (c["meets_size_rule"], c["base_filters"] >= 16, math.prod(input_size(c)), c["base_filters"])


def choose(candidates: list[dict], budget_s: float) -> tuple[dict, str]:
    """The most preferred measured candidate whose predicted run time fits `budget_s`; if none
    fits, the fastest candidate that meets the size rule (or the fastest of all), with the reason."""
    measured = [c for c in candidates if c.get("predicted_s") is not None]
    if not measured:
        raise DsalError("no candidate could be measured; check that TensorFlow runs on this machine")
    fits = [c for c in measured if c["predicted_s"] <= budget_s]
    if fits:
        best = max(fits, key=preference)
        why = (f"largest candidate whose predicted run time ({best['predicted_s'] / 60:.1f} min) fits the "
               f"{budget_s / 60:.0f}-minute budget (preferring the size rule, >= 16 base filters, then more "
               "pixels, then more filters)")
        if not best["meets_size_rule"]:
            why += "; WARNING: no candidate meeting the size rule fits, structures may vanish"
        return best, why
    pool = [c for c in measured if c["meets_size_rule"]] or measured
    best = min(pool, key=lambda c: c["predicted_s"])
    return best, (f"no candidate fits the {budget_s / 60:.0f}-minute budget; the fastest one"
                  f"{' meeting the size rule' if best['meets_size_rule'] else ''} "
                  f"({best['predicted_s'] / 60:.1f} min) with epochs cut to fit")


def fit_epochs(cfg: Config, timing: dict, n_pool: int, n_val: int, load_s: float, budget_s: float,
               batches: Batches | None = None) -> Config:
    """Scale both epoch counts down until the prediction fits, but never below `MIN_INITIAL_STEPS`
    optimizer steps for the initial model and 1 epoch per round: fewer and it learns nothing
    (measured: 3 epochs at 144x144 on the small-lesion set left val Dice at 0.01)."""
    count = batches or image_batches
    floor = min(cfg.nb_initial_epochs, math.ceil(MIN_INITIAL_STEPS / count(cfg, "train", min(cfg.nb_labeled, n_pool))))
    for f in np.linspace(1.0, 0.05, 40):
        c = cfg.replace(nb_initial_epochs=max(floor, int(cfg.nb_initial_epochs * f)),
                        nb_active_epochs=max(1, int(cfg.nb_active_epochs * f)))
        if predict_seconds(c, timing, n_pool, n_val, load_s, batches)["total_s"] <= budget_s:
            return c
    return c


# ------------------------------------------------------------------------------------ measured steps
def activation_bytes(cfg: Config, input_shape: tuple | None = None) -> int:
    """Bytes of float32 activations one image (or one `input_shape` patch) keeps for backprop (outputs
    of every layer, x2 for their gradients); the basis of the batch-size rule."""
    from .model import unet_for

    m = unet_for(cfg, input_shape)
    elems = sum(int(np.prod(layer.output.shape[1:])) for layer in m.layers)
    return 2 * 4 * elems


def memory_bytes() -> int:
    """Memory the planner may plan against: the GPU's (nvidia-smi) if one is visible, else RAM."""
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        import subprocess

        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=10).stdout
            return int(min(int(v) for v in out.split())) * 2**20
        except (OSError, ValueError, subprocess.SubprocessError):
            return 16 * 2**30
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def pick_batch_size(cfg: Config, memory: int) -> int:
    per_image = activation_bytes(cfg)
    return next((b for b in BATCH_SIZES if b * per_image <= MEMORY_SHARE * memory), BATCH_SIZES[-1])


def measure_steps(cfg: Config, steps: int = 3, seed: int = 0) -> dict[str, float]:
    """Seconds per training, validation and DSAL-scoring batch of the real U-Net (`train.new_model`),
    through the real `fit`/`evaluate` input pipeline and the strategy's compiled scoring pass,
    after one warm-up call of each (its extra time is `trace_s`)."""
    import tempfile

    from . import determinism, train
    from .data import Normalizer, make_dataset
    from .model import HEADS
    from .space import space_for
    from .strategies import QUERY_STRATEGIES

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


def _timed(fn: Callable[[], Any]) -> float:
    """Seconds `fn()` takes."""
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def probe_verdict(before: float, after: float, steps: int, min_rise: float = PROBE_MIN_RISE) -> tuple[bool, str]:
    """Whether a probe learned (its training soft Dice rose by at least `min_rise`), and why."""
    if not (math.isfinite(before) and math.isfinite(after)):
        return False, f"the training soft Dice became {after} within {steps} steps"
    change = f"training soft Dice {before:.3f} -> {after:.3f} in {steps} steps"
    if after - before >= min_rise:
        return True, change
    what = "fell towards all-background" if after < before else "did not rise"
    return False, f"{change}: it {what} (a rise of {min_rise:g} is needed)"


def probe_learning(cfg: Config, steps: int = PROBE_STEPS, seed: int = 0) -> dict[str, Any]:
    """Train the candidate's real U-Net (`train.new_model`: its loss, batch Dice and norm) for `steps`
    steps through the run's sampler and warm-up on a seeded sample of `PROBE_IMAGES` pool images at
    its input size; return the soft Dice of the main head over `PROBE_EVAL` of them (one ratio over
    all their pixels) before and after, and the mean step time after the first 10 steps."""
    from . import determinism, train
    from .data import Normalizer, find_pairs, make_dataset, read_pair
    from .evaluate import predict_main
    from .model import HEADS

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


def _probe_fit(cfg: Config, model, ds, steps: int, y_eval: np.ndarray, predict: Callable[[], np.ndarray],
               warmup_epoch_steps: int) -> dict[str, Any]:
    """The probe's core, for images and volumes: the soft Dice of `predict()` (the main head's probabilities of
    the items whose masks are `y_eval`, one ratio over all their pixels) before and after `steps` steps of
    `model.fit` on `ds` (with the run's warm-up, `warmup_epoch_steps` steps an epoch), and the mean step time
    after the first 10 steps."""
    import keras

    from . import train
    from .losses import SMOOTH

    y = np.asarray(y_eval, np.float64)

    def soft_dice() -> float:
        p = np.asarray(predict(), np.float64).reshape(y.shape)
        return float((2 * (y * p).sum() + SMOOTH) / (y.sum() + p.sum() + SMOOTH))

    ends: list[float] = []
    clock = keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: ends.append(time.perf_counter()))
    callbacks = [clock]
    if cfg.lr_warmup_epochs:
        callbacks.insert(0, train.WarmUp(cfg.learning_rate, cfg.lr_warmup_epochs, steps_per_epoch=warmup_epoch_steps))
    t = time.perf_counter()
    before = soft_dice()
    model.fit(ds, steps_per_epoch=steps, epochs=1, verbose=0, shuffle=False, callbacks=callbacks)
    after = soft_dice()
    step_s = float(np.mean(np.diff(ends[10:]))) if len(ends) > 11 else None
    return dict(steps=steps, soft_dice_before=round(before, 4), soft_dice_after=round(after, 4),
                train_step_s=None if step_s is None else round(step_s, 4), probe_s=round(time.perf_counter() - t, 1))


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


def training_settings(fg: float | None) -> dict[str, tuple[Any, str]]:
    """The loss and optimizer settings images and volumes share, from the mean foreground fraction `fg`."""
    small = fg is not None and fg < SMALL_FOREGROUND
    return {
        # Measured on the small-lesion set (0.5% foreground): Dice + BCE drove every head to all-background
        # within 2 epochs (loss frozen at 1.075, val Dice 0.01, at 128x128 and 144x144); soft Dice learns.
        # That BCE clipped at 1e-7 (no gradient once saturated; issue 20 replaced it). The learning probe
        # checks the choice on every plan and falls back to RECIPES.
        "loss": ("dice", f"mean foreground fraction {fg}"
                 + (f" < {SMALL_FOREGROUND} (small foreground): soft Dice, which the class imbalance does not swamp; "
                    "Dice + BCE collapsed to all-background here" if small else ": soft Dice")),
        "batch_dice": (False, "soft Dice per image, as the reference"),
        "learning_rate": (1e-3, "Adam 1e-3, as isic2017-cpu (1e-5 of the paper is for 15 epochs of 32-filter nets)"),
        "pool_size": (0, "the whole pool"),
    }


@dataclass(frozen=True)
class Planning:
    """What the steps of `make_plan` share: the fingerprint, the settings the user fixed (lower-case keys),
    the settings from the fingerprint alone, the pool and validation sizes, the memory planned against,
    the predicted data-loading seconds, the budget in seconds, whether the run is full supervision, how many
    batches each pass has (`predict_seconds`; None: images) and how a ladder size becomes a candidate
    (`candidate`, or `volume_candidate`)."""

    fp: dict
    fixed: dict[str, Any]
    base: dict[str, Any]
    n_pool: int
    n_val: int
    memory: int
    load_s: float
    budget_s: float
    full_supervision: bool = False
    batches: Batches | None = None
    make: Callable[..., tuple[Config, dict]] | None = None


def planning(data_path: str | Path, fp: dict, fixed: dict[str, Any], budget_minutes: float,
             full_supervision: bool = False, memory: int | None = None) -> Planning:
    """The `Planning` of `data_path` from its fingerprint; `memory` defaults to this machine's (`memory_bytes`)."""
    memory = memory_bytes() if memory is None else memory
    n_pool, n_val = pool_counts(data_path, fp, fixed, "images")
    base = {k: v for k, (v, _) in base_settings(fp).items()}
    workers = min(8, os.cpu_count() or 1)
    load_s = fp["decode_s_per_image"] * (n_pool + n_val) / workers
    return Planning(fp, fixed, base, n_pool, n_val, memory, load_s, 60.0 * budget_minutes, full_supervision)


def pool_counts(data_path: str | Path, fp: dict, fixed: dict[str, Any], items: str) -> tuple[int, int]:
    """(pool, validation) sizes from the fingerprint, POOL_SIZE capping the pool; no validation `items` is an error."""
    n_pool, n_val = fp["counts"]["train"], fp["counts"]["val"]
    if fixed.get("pool_size"):
        n_pool = min(n_pool, int(fixed["pool_size"]))
    if n_val == 0:
        raise DsalError(f"no validation {items} in {Path(data_path) / 'valImg'}; add some (checkpoints use them)")
    return n_pool, n_val


def candidate_key(c: dict) -> tuple:
    """A candidate's identity: (img_rows, img_cols, base_filters, batch_size), or (*patch_size, ...) of a volume."""
    return (*input_size(c), c["base_filters"], c["batch_size"])


def key_label(key: tuple) -> str:
    """`128x128 f16` or `32x48x32 f16`: a candidate key as logs and refusals name it."""
    return "x".join(str(n) for n in key[:-2]) + f" f{key[-2]}"


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


def as_protocol(plan: Planning, cfg: Config) -> Config:
    """`cfg` as the protocol that will run: with full supervision what `dsal run --full-supervision` trains
    (the whole pool, the same total epochs)."""
    if not plan.full_supervision:
        return cfg
    from .compare import full_supervision_config

    return full_supervision_config(cfg).replace(exp_name=plan.fixed.get("exp_name", ""))


def measure_candidate(plan: Planning, cfg: Config, row: dict, measure: Callable[[Config], dict],
                      log: Callable[[str], None] = print) -> dict:
    """`row` with the measured per-step times of `cfg` and its predicted run time."""
    t = time.perf_counter()
    timing = measure(cfg)
    row.update(timing, measure_s=round(time.perf_counter() - t, 1))
    pred = predict_seconds(cfg, timing, plan.n_pool, plan.n_val, plan.load_s, plan.batches)
    row.update(predicted=pred, predicted_s=pred["total_s"])
    log(f"  {key_label(candidate_key(row))} b{cfg.batch_size}: "
        f"train {timing['train_step_s'] * 1000:.0f} ms/step, predicted {pred['total_s'] / 60:.1f} min")
    return row


def search_candidates(plan: Planning, ladder: list[dict], measure: Callable[[Config], dict],
                      log: Callable[[str], None] = print) -> tuple[list[dict], dict[tuple, Config]]:
    """Measure candidates: the size ladder upwards (from the smallest size meeting the size rule) at each
    filter count, stopping at the first size over budget; costs grow with size and filters, so nothing
    skipped could fit. 32 filters only at sizes where 16 fit; 8 only if no 16 fits. Returns the candidate
    rows in the order measured and their settings by `candidate_key`."""
    rows: dict[tuple, dict] = {}
    configs: dict[tuple, Config] = {}
    make = plan.make or candidate
    allowed = [s for s in ladder if s["meets_size_rule"]] or ladder[-1:]
    fit16: list[dict] = []
    for filters in FILTERS:
        sizes = allowed if filters != 32 else [s for s in allowed if any(_same(s, f) for f in fit16)]
        if filters == 8 and fit16:
            break
        for size in sizes:
            cfg, row = make(plan, size, filters)
            key = candidate_key(row)
            if key not in rows:
                rows[key], configs[key] = measure_candidate(plan, cfg, row, measure, log), cfg
            if rows[key]["predicted_s"] > plan.budget_s:
                break
            if filters == 16:
                fit16.append(size)
    return list(rows.values()), configs


def fit_choice(plan: Planning, cfg: Config, best: dict, learned: dict | None) -> tuple[Config, dict[str, float]]:
    """The chosen settings with epochs cut to the budget where needed (unless the user fixed them), and their
    predicted run time; the learning probe's step time, when it has one, replaces the measured one."""
    timing = dict(best)
    if learned is not None and learned.get("train_step_s"):
        timing["train_step_s"] = learned["train_step_s"]  # 100 real steps beat 3 synthetic ones
    over = predict_seconds(cfg, timing, plan.n_pool, plan.n_val, plan.load_s, plan.batches)["total_s"] > plan.budget_s
    if over and not {"nb_initial_epochs", "nb_active_epochs"} & set(plan.fixed):
        cfg = fit_epochs(cfg, timing, plan.n_pool, plan.n_val, plan.load_s, plan.budget_s, plan.batches)
    return cfg, predict_seconds(cfg, timing, plan.n_pool, plan.n_val, plan.load_s, plan.batches)


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


def protocol_reasons(plan: Planning, reasons: dict[str, str], best: dict, recipe: dict, learned: dict | None,
                     planned: tuple[str, ...]) -> dict[str, str]:
    """`reasons` completed with what images and volumes share: the full-supervision protocol, the learning
    probe's verdict on the loss, and "set by the user" for each of the `planned` settings the user fixed."""
    if plan.full_supervision:
        reasons.update(nb_labeled="full supervision: the whole pool",
                       nb_initial_epochs=reasons["nb_initial_epochs"] + "; full supervision trains the initial "
                       "epochs plus every round's on the whole pool, as `--full-supervision` does")
    if learned is not None:
        verdict = best["probes"][0]["reason"]
        reasons["loss"] = reasons["batch_dice"] = (
            f"{reasons['loss']}; the learning probe: {verdict}" if not recipe else
            f"the learning probe refused the planned loss ({verdict}); "
            + ", ".join(f"{k.upper()}={v!r}" for k, v in recipe.items()) + f" learned ({learned['reason']})")
    for k in plan.fixed:
        if k in planned:
            reasons[k] = "set by the user"
    return reasons


def plan_warnings(plan: Planning, predicted: dict[str, float], budget_minutes: float) -> list[str]:
    """What the user should know about the data or the budget."""
    fp = plan.fp
    warnings = []
    if fp["intensity"]["looks_like_ct_hu"]:
        warnings.append("16-bit values look like CT Hounsfield units, but the loader reads 8 bits: window them "
                        "(e.g. lung -1000..400 HU) into 8-bit PNGs first")
    if fp["intensity"]["grey_stored_as_rgb"]:
        warnings.append("the images are grey stored as RGB: COLOR = gray uses a third of the input")
    if predicted["total_s"] > plan.budget_s:
        warnings.append(f"nothing fits the {budget_minutes:g}-minute budget on this machine now: the plan needs "
                        f"{predicted['total_s'] / 60:.1f} min; raise --budget-minutes (or PLAN_BUDGET_MINUTES)")
    if fp["masks"]["masks_read"] == 0:
        warnings.append("no masks found: the size rule could not be applied")
    return warnings


def make_plan(
    data_path: str | Path,
    budget_minutes: float = 15.0,
    fixed: dict[str, Any] | None = None,
    measure: Callable[[Config], dict] | None = None,
    log: Callable[[str], None] = print,
    sample: int = INTENSITY_SAMPLE,
    full_supervision: bool = False,
    probe: Callable[[Config], dict] | None = None,
) -> dict[str, Any]:
    """Fingerprint `data_path`, measure candidates, probe the choice, and choose the settings (a JSON-able dict).

    `fixed`: settings the user set (constants file, command line); they hold in every candidate.
    `full_supervision`: plan the run `--full-supervision` makes (the whole pool labelled, no rounds).
    `measure(cfg) -> timing dict` defaults to `measure_steps`, `probe(cfg) -> probe dict` to
    `probe_learning`; with injected timings and no probe, nothing is probed (tests).

    The steps, in order: `fingerprint`, `planning`, `size_ladder`, `search_candidates`, `choose_learning`,
    `fit_choice`, `plan_reasons`, `plan_warnings`."""
    t0 = time.perf_counter()
    fixed = {k.lower(): v for k, v in (fixed or {}).items() if k.lower() not in ("preset",)}
    fixed["data_path"] = str(data_path)
    if dataset_rank(data_path) == 3:  # NIfTI volumes: the rank is decided here once, as `space.space_for` does
        return make_volume_plan(data_path, budget_minutes, fixed, measure, log, full_supervision, probe)
    fp = fingerprint(data_path, sample=sample, seed=int(fixed.get("seed", 0)), log=log)
    probe = probe or (probe_learning if measure is None else None)
    measure = measure or measure_steps
    plan = planning(data_path, fp, fixed, budget_minutes, full_supervision,
                    memory=None if measure is measure_steps else 64 * 2**30)
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
        "warnings": plan_warnings(plan, d.predicted, budget_minutes),
        "plan_s": round(time.perf_counter() - t0, 1),
    }


@dataclass(frozen=True)
class Decision:
    """What the shared steps decide (`decide`): the measured candidate rows and their settings, the recipes the
    probe may try, the chosen candidate with its reason, recipe and probe result, and its final settings and
    predicted run time."""

    rows: list[dict]
    configs: dict[tuple, Config]
    recipes: list[dict]
    best: dict
    reason: str
    recipe: dict
    learned: dict | None
    cfg: Config
    predicted: dict[str, float]

    def probe_summary(self, probed: bool) -> dict | None:
        """The plan's `probe` entry (None when nothing was probed)."""
        if not probed:
            return None
        return {"steps": PROBE_STEPS, "min_rise": PROBE_MIN_RISE, "recipes": self.recipes, "chosen": self.learned,
                "train_step_s_from": "probe" if self.learned and self.learned.get("train_step_s") else "measured steps"}


def decide(plan: Planning, ladder: list[dict], measure: Callable[[Config], dict], probe: Callable | None,
           log: Callable[[str], None] = print) -> Decision:
    """The steps images and volumes share: `search_candidates` over the ladder, `choose_learning` with the
    recipes the user's settings allow, and `fit_choice`."""
    rows, configs = search_candidates(plan, ladder, measure, log)
    recipes = [r for r in RECIPES if not set(r) & set(plan.fixed)]
    best, reason, recipe, learned = choose_learning(rows, configs, plan.budget_s, probe, recipes, log)
    cfg, predicted = fit_choice(plan, configs[candidate_key(best)].replace(**recipe), best, learned)
    return Decision(rows, configs, recipes, best, reason, recipe, learned, cfg, predicted)


def choose_learning(rows: list[dict], configs: dict[tuple, Config], budget_s: float, probe: Callable | None,
                    recipes: list[dict], log: Callable[[str], None] = print) -> tuple[dict, str, dict, dict | None]:
    """`choose`, then the learning probe on the choice, recipe by recipe, until one learns: returns
    (candidate, reason, recipe, probe result). A candidate none of whose recipes learns is marked
    `refused` with the reasons and the next preferred one is probed; `MAX_PROBES` in all.
    Without a probe: `choose` alone."""
    done: list[str] = []
    while True:
        left = [c for c in rows if "refused" not in c]
        if not left or len(done) >= MAX_PROBES:
            raise DsalError(f"no planned candidate learned in the probe ({'; '.join(done)}); set LOSS=\"bce_dice\", "
                            "BATCH_DICE=True or NORM=\"instance\" with --set, or check the masks")
        best, reason = choose(left, budget_s)
        if probe is None:
            return best, reason, {}, None
        key = candidate_key(best)
        for recipe in recipes[:MAX_PROBES - len(done)]:
            result = probe(configs[key].replace(**recipe))
            ok, why = probe_verdict(result["soft_dice_before"], result["soft_dice_after"], result["steps"])
            best.setdefault("probes", []).append({"recipe": recipe, **result, "learned": ok, "reason": why})
            done.append(f"{key_label(key)} {recipe or 'as planned'}: {why}")
            log(f"  probe {done[-1]}")
            if ok:
                return best, reason, recipe, {**result, "reason": why}
        best["refused"] = "; ".join(f"{p['recipe'] or 'as planned'}: {p['reason']}" for p in best["probes"])


def size_only(size: dict) -> dict:
    return {"img_rows": size["img_rows"], "img_cols": size["img_cols"]}


def _same(a: dict, b: dict) -> bool:
    return input_size(a) == input_size(b)


# ------------------------------------------------------------------------------------ volumes (3D)
# A folder of NIfTI volumes is planned by the same steps (fingerprint, ladder, measured candidates, budget rule,
# learning probe), with a volume's own fingerprint and ladder and the volume space's streams and inferer.
VOLUME_SAMPLE = 16  # training volumes read whole for intensity statistics and the load time
FOREGROUND_SAMPLE = 10_000  # foreground voxels kept per sampled volume for the CT window (as nnU-Net)
CT_AIR, CT_RANGE = -500.0, 1000.0  # CT: the darkest voxel is air (<= -500 HU) and values span >= 1000 HU
PATCH_VOXELS = 128**3  # the largest patch considered: isotropic in mm, then clipped to the median shape
VOLUME_BATCH_SIZES = (8, 4, 2)
DATASET_SHARE = 0.05  # a batch's patches cover at most 5% of the pool's voxels (nnU-Net's overfitting guard)
EPOCH_STEPS = (10, 50)  # STEPS_PER_EPOCH: one expected pass over the initial labels, within these bounds
VOLUME_FOREGROUND_OVERSAMPLE = 0.33  # nnU-Net's share of patches centred on foreground
MIN_STRUCTURE_VOXELS = 27  # a 3x3x3 cube: a structure smaller than this at the target spacing gets a warning
PROBE_VOLUMES, PROBE_EVAL_VOLUMES = 8, 4  # pool volumes the probe and the timing decode (seeded); of them, scored
MEASURE_STEPS = 2  # timed training steps per volume candidate (after a warm-up step)
VOLUME_PLANNED = ("patch_size", "spacing", "volume_normalization", "ct_window", "depth", "base_filters", "batch_size",
                  "steps_per_epoch", "foreground_oversample", "loss", "batch_dice", "learning_rate", "nb_labeled",
                  "nb_iterations", "nb_next_sample", "pseudo_epoch", "nb_pseudo_initial", "pseudo_rate",
                  "nb_initial_epochs", "nb_active_epochs", "pool_size")


def planning_space(data_path: str | Path, values: dict[str, Any]):
    """The `VolumeSpace` a run with the user's `values` would build over `data_path`. Without a PATCH_SIZE of the
    user's, the smallest patch the U-Net takes, so any DEPTH builds: the plan reads its layout (target spacing,
    padded grid) and each volume's geometry, which do not depend on the patch below the median shape."""
    from .volume_space import VolumeSpace

    values = {**values, "data_path": str(data_path)}
    values.setdefault("patch_size", (2 ** int(values.get("depth", Config.depth)),) * 3)
    return VolumeSpace.from_config(resolve(values, source="the plan"))


def _volume_pairs(root: Path, split: str, naming: str) -> list[tuple[Path, Path | None]]:
    """(volume, label or None) of a split; a missing or empty folder is an empty split."""
    from .volumes import find_volume_pairs, list_volumes

    if not list_volumes(root / f"{split}Img"):
        return []
    return find_volume_pairs(root, split, naming, require_masks=False)


def _axes(values) -> list:
    """Per-axis values as a JSON list: ints stay ints, other values are rounded to 4 decimals."""
    return [int(v) if float(v).is_integer() else round(float(v), 4) for v in values]


def volume_fingerprint(data_path: str | Path, values: dict[str, Any] | None = None, sample: int = VOLUME_SAMPLE,
                       seed: int = 0, log: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """The fingerprint of a folder of NIfTI volumes; never holds more than one volume (and its label) read.

    From every header: volumes per split, the training shapes and spacings (voxels, mm), the target spacing (the
    space's: SPACING or the pool's median) and the training shapes resampled to it (`volume_space`'s geometry).
    From a seeded sample of `sample` training volumes: intensities (the modality guess, CT or MRI, and the CT
    window) and the seconds to read, normalise and resample one. From every train and val label: the foreground
    share and the connected components (26-connectivity) in voxels, in mm^3 and at the target spacing."""
    values = values or {}
    space = planning_space(data_path, values)
    root = Path(data_path)
    pairs = {s: _volume_pairs(root, s, space.cfg.mask_naming) for s in SPLITS}
    if not pairs["train"]:
        raise DsalError(f"no training volumes in {root / 'trainImg'}; put the pool there (see README, Data)")
    layout = space.layout
    target = tuple(float(v) for v in layout.spacing)
    intensity, load_s = _volume_intensity(pairs["train"], sample, seed, target)
    masks = _volume_mask_stats([p for split in ("train", "val") for p in pairs[split]], target)
    log(f"fingerprint: {sum(len(v) for v in pairs.values())} volume headers, {intensity['sampled_volumes']} "
        f"sampled volumes, {masks['masks_read']} labels")
    return {
        "space": "volume",
        "data_path": str(root),
        "counts": {s: len(pairs[s]) for s in SPLITS},
        **_volume_geometry(space, pairs["train"], target, "spacing" in values),
        "grid": list(layout.shape),
        "intensity": intensity,
        "load_s_per_volume": load_s,
        "masks": masks,
    }


def _volume_geometry(space, train: list[tuple[Path, Path | None]], target: tuple, user_spacing: bool) -> dict:
    """Shapes and spacings of the training volumes from their headers, and their shapes at `target` spacing."""
    from .volume_space import ANISOTROPY
    from .volumes import read_header

    heads = [read_header(img) for img, _ in train]
    shapes = np.array([h.shape for h in heads], np.int64)
    spacings = np.array([h.spacing for h in heads], np.float64)
    resampled = np.array([space.geometry(img).resampled for img, _ in train], np.int64)
    aniso = float(max(target) / min(target))

    def stats(a):
        return {"median": _axes(np.median(a, axis=0)), "min": _axes(a.min(axis=0)), "max": _axes(a.max(axis=0))}

    return {
        "shape": stats(shapes),
        "spacing": {**stats(spacings), "distinct": len({tuple(s) for s in spacings.tolist()}), "target": list(target),
                    "target_from": "SPACING, set by the user" if user_spacing else "the pool's median spacing",
                    "anisotropy": round(aniso, 3),
                    "slice_axis": int(np.argmax(target)) if aniso >= ANISOTROPY else None},
        "resampled_shape": stats(resampled),
        "pool_voxels": int(np.prod(resampled, axis=1).sum()),
        "note": "shapes in voxels (D, H, W: the files' axes), spacings in mm, over the training volumes; "
                "resampled_shape at the target spacing; grid: the padded grid every split shares",
    }


def _volume_intensity(train: list[tuple[Path, Path | None]], sample: int, seed: int,
                      target: tuple) -> tuple[dict[str, Any], float]:
    """(intensity statistics with the modality guess, median seconds to load one volume) from a seeded sample of
    training volumes, each read, normalised and resampled to `target` as a run caches it (timed)."""
    from .volumes import load_case, read_label

    rng = np.random.default_rng(seed)
    picks = np.sort(rng.choice(len(train), size=min(sample, len(train)), replace=False))
    lo, hi, sums, sq, n, p1s, fg, load_s, dtypes = np.inf, -np.inf, 0.0, 0.0, 0, [], [], [], set()
    for i in picks:
        img, label = train[i]
        t = time.perf_counter()
        case = load_case(img, label, target)
        load_s.append(time.perf_counter() - t)
        x = np.asarray(case.source.array, np.float64)
        dtypes.add(str(case.source.header.get_data_dtype()))
        lo, hi = min(lo, float(x.min())), max(hi, float(x.max()))
        sums, sq, n = sums + float(x.sum()), sq + float((x**2).sum()), n + x.size
        p1s.append(float(np.percentile(x, 1)))
        if label is not None:
            inside = x[read_label(label, case.source) > 0]
            if len(inside) > FOREGROUND_SAMPLE:
                inside = rng.choice(inside, FOREGROUND_SAMPLE, replace=False)
            fg.append(inside)
    mean = sums / n
    fg_all = np.concatenate(fg) if fg else np.zeros(0)
    ct = bool(lo <= CT_AIR and hi - lo >= CT_RANGE)
    return {
        "sampled_volumes": int(len(picks)), "sample_seed": seed, "dtypes": sorted(dtypes),
        "min": round(lo, 3), "max": round(hi, 3), "mean": round(mean, 3),
        "std": round(float(np.sqrt(max(sq / n - mean**2, 0.0))), 3), "p1_median": round(float(np.median(p1s)), 3),
        "foreground_p00_5": round(float(np.percentile(fg_all, 0.5)), 3) if len(fg_all) else None,
        "foreground_p99_5": round(float(np.percentile(fg_all, 99.5)), 3) if len(fg_all) else None,
        "modality": "CT" if ct else "MRI",
        "note": f"from a seeded sample of {len(picks)} training volumes (seed {seed}), voxels as stored (header "
                f"scaling applied); CT when the darkest voxel is air (<= {CT_AIR:g}) and the values span >= "
                f"{CT_RANGE:g} (Hounsfield units), else MRI (no fixed scale); foreground percentiles from up to "
                f"{FOREGROUND_SAMPLE} labelled voxels a volume",
    }, round(float(np.median(load_s)), 4)


def component_voxels(mask: np.ndarray) -> tuple[np.ndarray, list[tuple[slice, ...]]]:
    """Voxel counts and bounding boxes (slices) of the 26-connected foreground components of a 3-D mask."""
    from scipy import ndimage

    labels, n = ndimage.label(np.asarray(mask) > 0, structure=np.ones((3, 3, 3), bool))
    if n == 0:
        return np.zeros(0, np.int64), []
    return np.bincount(labels.ravel(), minlength=n + 1)[1:].astype(np.int64), ndimage.find_objects(labels)


def _volume_mask_stats(pairs: list[tuple[Path, Path | None]], target: tuple) -> dict[str, Any]:
    """Foreground shares and connected components of every label (checked against its volume, read one at a time):
    voxels on the file's grid, mm^3 with its spacing, and voxels at the `target` spacing; structures are the
    components of at least `SPECK_FRACTION` of their label's largest one. `box_*`: the median structure's extent
    per axis (the median over structures of each axis' extent)."""
    from .volumes import read_header, read_label

    fractions, voxels, mm3, raw, boxes_mm, n_empty, n_masks, missing = [], [], [], [], [], 0, 0, 0
    for img, label in pairs:
        if label is None:
            missing += 1
            continue
        head = read_header(img)
        mask = read_label(label, head)
        n_masks += 1
        fractions.append(float(mask.mean()))
        counts, slices = component_voxels(mask)
        n_empty += int(len(counts) == 0)
        raw.extend(counts.tolist())
        for k in np.flatnonzero(counts >= SPECK_FRACTION * counts.max()) if len(counts) else []:
            voxels.append(int(counts[k]))
            mm3.append(float(counts[k]) * math.prod(head.spacing))
            boxes_mm.append([(sl.stop - sl.start) * s for sl, s in zip(slices[k], head.spacing)])
    vox, mm, raw_arr = np.array(voxels, np.float64), np.array(mm3, np.float64), np.array(raw, np.float64)
    at_target = mm / math.prod(target)
    box_mm = np.median(np.array(boxes_mm), axis=0) if boxes_mm else None

    def pct(a, q, digits=2):
        return round(float(np.percentile(a, q)), digits) if len(a) else None

    return {
        "splits": ["train", "val"], "masks_read": n_masks, "volumes_without_label": missing, "empty_masks": n_empty,
        "foreground_fraction_mean": round(float(np.mean(fractions)), 5) if fractions else None,
        "foreground_fraction_median": round(float(np.median(fractions)), 5) if fractions else None,
        "components": int(len(vox)),
        "component_voxels_min": int(vox.min()) if len(vox) else None, "component_voxels_p5": pct(vox, 5),
        "component_voxels_median": pct(vox, 50),
        "component_mm3_min": round(float(mm.min()), 3) if len(mm) else None, "component_mm3_p5": pct(mm, 5, 3),
        "component_mm3_median": pct(mm, 50, 3),
        "component_target_voxels_min": round(float(at_target.min()), 2) if len(mm) else None,
        "component_target_voxels_p5": pct(at_target, 5),
        "box_mm_median": None if box_mm is None else _axes(box_mm),
        "box_target_voxels": None if box_mm is None else [int(math.ceil(b / t - 1e-9)) for b, t in zip(box_mm, target)],
        "specks_ignored": int(len(raw_arr) - len(vox)),
        "all_components_min": int(raw_arr.min()) if len(raw_arr) else None,
        "note": "26-connected components: voxels on each file's own grid, mm^3 with its spacing, target voxels = "
                f"mm^3 / the target voxel's volume; structures exclude specks under {SPECK_FRACTION:.0%} of their "
                "label's largest component; box: the median structure's extent per axis; the test split is not read",
    }


def patch_ladder(median_shape, spacing, depth: int = 4, box=None, max_voxels: int = PATCH_VOXELS) -> list[dict]:
    """Patch sizes (D, H, W) in voxels at the target `spacing`, smallest first, after nnU-Net's planner: start
    from a patch isotropic in mm of `max_voxels` voxels (so an anisotropic spacing gives fewer voxels along its
    coarse axis), clip it to the median resampled shape and round each side down to a multiple of 2**`depth`
    (at least 2**depth); then, one step of 2**depth at a time, shrink the side that is largest relative to the
    median shape (ties: the later axis), down to 2 x 2**depth per side (or the top side, if smaller). The size
    rule: the patch holds `box`, the median structure's extent in voxels (where the top patch can)."""
    step = 2 ** int(depth)
    median = np.maximum(np.asarray(median_shape, np.float64), 1.0)
    inverse = 1.0 / np.asarray(spacing, np.float64)
    start = np.minimum(np.round(inverse * (max_voxels / np.prod(inverse)) ** (1 / 3)), median)
    top = [max(step, int(n // step) * step) for n in start]
    floor = [min(t, 2 * step) for t in top]
    need = [min(t, int(b)) for t, b in zip(top, box)] if box is not None else [0, 0, 0]
    sizes, patch = [tuple(top)], list(top)
    while True:
        axes = [a for a in range(3) if patch[a] - step >= floor[a]]
        if not axes:
            break
        axis = max(axes, key=lambda a: (patch[a] / median[a], a))
        patch[axis] -= step
        sizes.append(tuple(patch))
    return [dict(patch_size=list(s), voxels=math.prod(s), structure_box=need,
                 meets_size_rule=all(p >= n for p, n in zip(s, need))) for s in reversed(sizes)]


def volume_base_settings(fp: dict, depth: int) -> dict[str, tuple[Any, str]]:
    """Settings that follow from a volume fingerprint alone, each with its reason."""
    it, sp = fp["intensity"], fp["spacing"]
    out = {"spacing": (tuple(sp["target"]), f"{sp['target_from']} (median {sp['median']} mm, range {sp['min']} to "
                                            f"{sp['max']})")}
    low, high = it["foreground_p00_5"], it["foreground_p99_5"]
    if it["modality"] == "CT" and low is not None and high > low:
        window = (round(low), round(high))
        out["volume_normalization"] = ("ct", f"CT (darkest voxel {it['min']:g}, values span "
                                             f"{it['max'] - it['min']:g}): a fixed window, the same HU the same "
                                             "value in every volume")
        out["ct_window"] = (window, "the 0.5th to 99.5th percentile of the labelled voxels' HU (nnU-Net's CT clip)")
    elif it["modality"] == "CT":
        out["volume_normalization"] = ("ct", "CT, but no labelled voxel was sampled: the default window")
    else:
        out["volume_normalization"] = ("zscore", f"MRI (darkest voxel {it['min']:g}): no fixed scale, z-score per "
                                                 "volume")
    shared = training_settings(fp["masks"]["foreground_fraction_mean"])
    return {**out, "depth": (depth, "the U-Net's depth: every patch side divides by 2**DEPTH"),
            "foreground_oversample": (VOLUME_FOREGROUND_OVERSAMPLE, "nnU-Net's share of each batch's patches centred "
                                      "on a foreground voxel"), **shared}


def volume_batches(grid) -> Batches:
    """Batches of each pass of a volume run (`predict_seconds`): an epoch is the space's `steps_per_epoch`
    (STEPS_PER_EPOCH, or one expected pass over the volumes on `grid`); validation takes `EVAL_VOLUMES`
    whole volumes a batch, scoring `SCORE_VOLUMES` a call."""
    from .volume_space import EVAL_VOLUMES, SCORE_VOLUMES, VolumeSpace

    def count(cfg: Config, kind: str, n: int) -> int:
        if kind == "train":
            space = VolumeSpace.from_config(cfg)
            return space.steps_per_epoch(n, tuple(max(g, p) for g, p in zip(grid, space.patch_size)))
        return math.ceil(n / (EVAL_VOLUMES if kind == "val" else SCORE_VOLUMES))

    return count


def volume_planning(data_path: str | Path, fp: dict, fixed: dict[str, Any], budget_minutes: float,
                    full_supervision: bool = False, memory: int | None = None) -> Planning:
    """The `Planning` of a volume folder: as `planning`, with the volume space's batch counts and candidates and
    the load time of every split (a volume run caches all three at its start, two volumes at a time)."""
    memory = memory_bytes() if memory is None else memory
    n_pool, n_val = pool_counts(data_path, fp, fixed, "volumes")
    depth = int(fixed.get("depth", Config.depth))
    base = {k: v for k, (v, _) in volume_base_settings(fp, depth).items()}
    load_s = fp["load_s_per_volume"] * sum(fp["counts"].values()) / min(2, os.cpu_count() or 1)
    return Planning(fp, fixed, base, n_pool, n_val, memory, load_s, 60.0 * budget_minutes, full_supervision,
                    batches=volume_batches(fp["grid"]), make=volume_candidate)


def pick_volume_batch(cfg: Config, patch: tuple[int, ...], memory: int, pool_voxels: int) -> int:
    """The largest of `VOLUME_BATCH_SIZES` whose activations use <= `MEMORY_SHARE` of `memory` and whose patches
    cover <= `DATASET_SHARE` of the pool's voxels (nnU-Net), at least the smallest."""
    per_patch = activation_bytes(cfg, (*patch, 1))
    cap = DATASET_SHARE * pool_voxels / math.prod(patch)
    return next((b for b in VOLUME_BATCH_SIZES if b <= cap and b * per_patch <= MEMORY_SHARE * memory),
                VOLUME_BATCH_SIZES[-1])


def volume_candidate(plan: Planning, size: dict, filters: int) -> tuple[Config, dict]:
    """The settings of a ladder patch at `filters` base filters (the user's fixed settings win; batch size, steps
    per epoch and schedule follow) and its candidate row."""
    from .volume_space import VolumeSpace

    fixed = plan.fixed
    cfg = resolve({**plan.base, "patch_size": tuple(size["patch_size"]), "base_filters": filters, **fixed},
                  source="the plan")
    space = VolumeSpace.from_config(cfg)
    patch = space.patch_size
    if "batch_size" not in fixed:
        cfg = cfg.replace(batch_size=pick_volume_batch(cfg, patch, plan.memory, plan.fp["pool_voxels"]))
    if "steps_per_epoch" not in fixed:
        labels = plan.n_pool if plan.full_supervision else int(fixed.get(
            "nb_labeled", schedule(plan.n_pool, cfg.batch_size)["nb_labeled"]))
        one_pass = VolumeSpace.from_config(cfg.replace(steps_per_epoch=0)).steps_per_epoch(
            min(labels, plan.n_pool), tuple(max(g, p) for g, p in zip(plan.fp["grid"], patch)))
        cfg = cfg.replace(steps_per_epoch=int(np.clip(one_pass, *EPOCH_STEPS)))
    steps = plan.batches(cfg, "train", 1)
    sched = {k: v for k, v in schedule(plan.n_pool, cfg.batch_size, lambda n: plan.batches(cfg, "train", n)).items()
             if k not in fixed}
    cfg = as_protocol(plan, cfg.replace(**sched))
    need = size["structure_box"]
    return cfg, {"patch_size": list(patch), "voxels": math.prod(patch), "base_filters": cfg.base_filters,
                 "batch_size": cfg.batch_size, "steps_per_epoch": steps, "structure_box": need,
                 "meets_size_rule": all(p >= n for p, n in zip(patch, need))}


def probe_sample(data_path: str | Path, seed: int = 0) -> Callable[[Config], tuple[np.ndarray, np.ndarray]]:
    """`sample(cfg) -> (images, masks)`: `PROBE_VOLUMES` seeded training volumes decoded by `cfg`'s space onto
    its padded grid (normalised, resampled), decoded again only when a candidate changes the grid."""
    from .volume_space import VolumeSpace

    held: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}

    def sample(cfg: Config) -> tuple[np.ndarray, np.ndarray]:
        space = VolumeSpace.from_config(cfg)
        s = space.settings
        key = (space.layout, s.volume_normalization, tuple(s.ct_window))
        if key not in held:
            pairs = [p for p in _volume_pairs(Path(data_path), "train", cfg.mask_naming) if p[1] is not None]
            rng = np.random.default_rng(seed)
            picks = np.sort(rng.choice(len(pairs), min(PROBE_VOLUMES, len(pairs)), replace=False))
            held.clear()
            held[key] = space.decode([pairs[i] for i in picks])
        return held[key]

    return sample


def measure_volume_steps(cfg: Config, images: np.ndarray, masks: np.ndarray, steps: int = MEASURE_STEPS,
                         seed: int = 0, keep: dict | None = None) -> dict[str, float]:
    """Seconds per training step of the real U-Net on random patches of decoded pool volumes (the space's
    `train_stream`), per validation volume (one whole padded volume, as `fit` validates) and per scoring call
    (a volume cropped to its box inside the padding, through the space's sliding-window `inferer` and the
    strategy's `score_batch`, as `score_pool` calls it), each after one warm-up call; `round_trace_s`: the
    warm-up's extra time of scoring, which every round's pass spends again (its inferer traces its windows
    anew). `keep`: where the trained model is left under `cfg.to_json()`, for the learning probe to continue
    (a 3D U-Net's first step traces for seconds)."""
    import tempfile

    import tensorflow as tf

    from . import determinism, train
    from .model import HEADS, float32_copy
    from .strategies import QUERY_STRATEGIES
    from .volume_space import VolumeSpace, content_box

    space = VolumeSpace.from_config(cfg)
    norm = space.fit_normalizer()
    determinism.apply(cfg)
    train.set_precision(cfg)
    model = train.new_model(cfg, seed)
    ds = space.train_stream(images, masks, norm, seed, heads=HEADS, repeat=True,
                            foreground_oversample=cfg.foreground_oversample)
    first_fit = _timed(lambda: model.fit(ds, steps_per_epoch=1, epochs=1, verbose=0))
    train_s = _timed(lambda: model.fit(ds, steps_per_epoch=steps, epochs=1, verbose=0)) / steps
    val = space.eval_stream(images[:1], masks[:1], norm, heads=HEADS)
    first_eval = _timed(lambda: model.evaluate(val, verbose=0))
    eval_s = _timed(lambda: model.evaluate(val, verbose=0))
    query = QUERY_STRATEGIES[cfg.query_strategy].from_config(cfg)
    scored = float32_copy(model) if getattr(query, "score_dtype", None) == "float32" else model
    infer = space.inferer(scored)
    box = tuple(slice(int(a), int(b)) for a, b in zip(*content_box(images[0])))
    x, y = norm(np.asarray(images[0])[box][None]), tf.cast(np.asarray(masks[0])[box][None], tf.float32)
    first_score = _timed(lambda: query.score_batch(infer, x, y))
    score_s = _timed(lambda: query.score_batch(infer, x, y))
    with tempfile.TemporaryDirectory() as tmp:
        save_s = _timed(lambda: model.save(Path(tmp) / "m.keras"))
    trace = max(0.0, first_fit - train_s) + max(0.0, first_eval - eval_s)
    if keep is not None:
        keep[cfg.to_json()] = model
    return dict(train_step_s=round(train_s, 4), eval_step_s=round(eval_s, 4), score_step_s=round(score_s, 4),
                epoch_overhead_s=round(save_s, 4), trace_s=round(trace, 2),
                round_trace_s=round(max(0.0, first_score - score_s), 2))


def probe_volume_learning(cfg: Config, images: np.ndarray, masks: np.ndarray, steps: int = PROBE_STEPS,
                          seed: int = 0, model=None) -> dict[str, Any]:
    """`probe_learning` for volumes: the candidate's real U-Net trains `steps` steps on random patches of the
    decoded pool volumes (the space's `train_stream`, with the run's foreground share and warm-up); the soft Dice
    of the main head over `PROBE_EVAL_VOLUMES` of them, through the space's sliding windows, before and after.
    `model`: the candidate's compiled U-Net from `measure_volume_steps` (a few steps in), continued rather than
    traced again; default a new one."""
    from . import determinism, train
    from .model import HEADS
    from .volume_space import VolumeSpace

    space = VolumeSpace.from_config(cfg)
    norm = space.fit_normalizer()
    determinism.apply(cfg)
    train.set_precision(cfg)
    model = model if model is not None else train.new_model(cfg, seed)
    infer = space.inferer(model)
    k = min(PROBE_EVAL_VOLUMES, len(images))
    ds = space.train_stream(images, masks, norm, seed, heads=HEADS, repeat=True,
                            foreground_oversample=cfg.foreground_oversample)
    return _probe_fit(cfg, model, ds, steps, masks[:k],
                      lambda: np.stack([infer.volume(norm.numpy(images[i]))["main"] for i in range(k)]),
                      space.steps_per_epoch(min(cfg.nb_labeled, len(images))))


def volume_reasons(plan: Planning, cfg: Config, best: dict, reason: str, recipe: dict,
                   learned: dict | None) -> dict[str, str]:
    """Why each planned volume setting has its value."""
    fp = plan.fp
    reasons = {k: r for k, (_, r) in volume_base_settings(fp, cfg.depth).items()}
    m, med = fp["masks"], fp["resampled_shape"]["median"]
    box = (f"holds the median structure ({_x(m['box_mm_median'])} mm, {_x(best['structure_box'])} voxels at the "
           "target spacing)" if m["box_mm_median"] else "no structures to hold")
    reasons.update(
        patch_size=f"nnU-Net's rule: patches from the median shape at the target spacing ({_x(med)} voxels), each side "
                   f"a multiple of 2**DEPTH = {2 ** cfg.depth}, shrunk along the side largest relative to it; {box}; "
                   + reason,
        base_filters=reason,
        batch_size=f"largest of {list(VOLUME_BATCH_SIZES)} whose activations "
                   f"({activation_bytes(cfg, (*best['patch_size'], 1)) / 2**20:.0f} MiB per patch) use <= "
                   f"{MEMORY_SHARE:.0%} of {plan.memory / 2**30:.0f} GiB and whose patches cover <= "
                   f"{DATASET_SHARE:.0%} of the pool's {fp['pool_voxels']} voxels (nnU-Net)",
        steps_per_epoch=f"one expected pass over the initial labels (each volume's grid {_x(fp['grid'])} over the "
                        f"patch, {cfg.batch_size} patches a step), within {list(EPOCH_STEPS)}: every epoch "
                        "costs the same",
        nb_initial_epochs=f"about {INITIAL_STEPS} steps for the initial model, {ROUND_STEPS} in round 1, at "
                          f"{best['steps_per_epoch']} steps an epoch",
        nb_labeled="labels and queries scale with the pool like isic2017-cpu (600 + 5 x 70 of 1600)",
    )
    return protocol_reasons(plan, reasons, best, recipe, learned, VOLUME_PLANNED)


def _x(values) -> str:
    return "x".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def volume_warnings(plan: Planning, predicted: dict[str, float], budget_minutes: float) -> list[str]:
    """What the user should know about the volumes or the budget."""
    fp, m = plan.fp, plan.fp["masks"]
    warnings = []
    small = m["component_target_voxels_min"]
    if small is not None and small < MIN_STRUCTURE_VOXELS:
        warnings.append(f"the smallest structure ({m['component_mm3_min']:g} mm^3) is {small:g} voxels at the target "
                        f"spacing {fp['spacing']['target']} mm, under {MIN_STRUCTURE_VOXELS}: set a finer SPACING "
                        "if such structures matter")
    if predicted["total_s"] > plan.budget_s:
        warnings.append(f"nothing fits the {budget_minutes:g}-minute budget on this machine now: the plan needs "
                        f"{predicted['total_s'] / 60:.1f} min; raise --budget-minutes (or PLAN_BUDGET_MINUTES)")
    if m["masks_read"] == 0:
        warnings.append("no labels found: the size rule could not be applied")
    return warnings


def make_volume_plan(data_path: str | Path, budget_minutes: float, fixed: dict[str, Any],
                     measure: Callable[[Config], dict] | None = None, log: Callable[[str], None] = print,
                     full_supervision: bool = False, probe: Callable[[Config], dict] | None = None) -> dict[str, Any]:
    """`make_plan` for a folder of NIfTI volumes (`fixed` already lower-case, with DATA_PATH): `volume_fingerprint`,
    `volume_planning`, `patch_ladder`, then the shared `search_candidates`, `choose_learning` and `fit_choice`
    over the volume candidates, timed (`measure_volume_steps`) and probed (`probe_volume_learning`) on a seeded
    sample of decoded pool volumes; `volume_reasons`, `volume_warnings`."""
    from .volume_space import VolumeSettings

    t0 = time.perf_counter()
    seed = int(fixed.get("seed", 0))
    fp = volume_fingerprint(data_path, fixed, seed=seed, log=log)
    if measure is None:
        sample, models = probe_sample(data_path, seed), {}
        probe = probe or (lambda cfg: probe_volume_learning(cfg, *sample(cfg), seed=seed,
                                                           model=models.pop(cfg.to_json(), None)))
        measure = lambda cfg: measure_volume_steps(cfg, *sample(cfg), seed=seed, keep=models)  # noqa: E731
        memory = None
    else:
        memory = 64 * 2**30
    plan = volume_planning(data_path, fp, fixed, budget_minutes, full_supervision, memory)
    ladder = patch_ladder(fp["resampled_shape"]["median"], fp["spacing"]["target"],
                          int(fixed.get("depth", Config.depth)), fp["masks"]["box_target_voxels"])
    d = decide(plan, ladder, measure, probe, log)
    values, coerced = d.cfg.to_dict(), VolumeSettings.from_config(d.cfg).to_dict()
    settings = {k: coerced.get(k, values[k]) for k in VOLUME_PLANNED if k in values}  # the user's as the run reads them
    return {
        "space": "volume",
        "budget_minutes": budget_minutes,
        "fingerprint": fp,
        "patch_ladder": ladder,
        "candidates": sorted(d.rows, key=preference),
        "full_supervision": full_supervision,
        "probe": d.probe_summary(probe is not None),
        "choice": {"settings": settings, "predicted": d.predicted,
                   "reasons": volume_reasons(plan, d.cfg, d.best, d.reason.replace("pixels", "voxels"), d.recipe,
                                             d.learned)},
        "warnings": volume_warnings(plan, d.predicted, budget_minutes),
        "plan_s": round(time.perf_counter() - t0, 1),
    }


def volume_table(plan: dict) -> str:
    """The short printed summary of a volume plan."""
    fp, ch = plan["fingerprint"], plan["choice"]
    m, it, sp, c = fp["masks"], fp["intensity"], fp["spacing"], fp["counts"]
    out = [
        f"data {fp['data_path']}: {c['train']} pool, {c['val']} val, {c['test']} test volumes; median "
        f"{_x(fp['shape']['median'])} voxels at {_x(sp['median'])} mm -> {_x(fp['resampled_shape']['median'])} at "
        f"{_x(sp['target'])} mm; {it['modality']}; foreground {m['foreground_fraction_mean']}; smallest structure "
        f"{m['component_voxels_min']} voxels ({m['component_mm3_min']} mm^3)",
        f"{'patch':>12} {'filters':>7} {'batch':>5} {'steps':>5} {'rule':>4} {'train ms':>8} {'score ms':>8} "
        f"{'predicted':>9} {'probe':>7}",
    ]
    for r in plan["candidates"]:
        out.append(f"{_x(r['patch_size']):>12} {r['base_filters']:>7} {r['batch_size']:>5} {r['steps_per_epoch']:>5} "
                   f"{'ok' if r['meets_size_rule'] else 'no':>4} {r['train_step_s'] * 1000:>8.0f} "
                   f"{r['score_step_s'] * 1000:>8.0f} {r['predicted_s'] / 60:>7.1f} m "
                   f"{'refused' if 'refused' in r else 'learned' if r.get('probes') else '-':>7}")
    s = ch["settings"]
    out.append(f"chosen: patch {_x(s['patch_size'])} at {_x(s['spacing'])} mm, {s['volume_normalization']}, "
               f"{s['base_filters']} filters, batch {s['batch_size']}, {s['steps_per_epoch']} steps an epoch, loss "
               f"{s['loss']}{' (batch Dice)' if s.get('batch_dice') else ''}, "
               f"{s['nb_initial_epochs']}+{s['nb_iterations']}x{s['nb_active_epochs']} epochs; predicted "
               f"{ch['predicted']['total_s'] / 60:.1f} min of {plan['budget_minutes']} (planning took "
               f"{plan['plan_s']:.0f} s)")
    out += [f"refused {_x(r['patch_size'])} f{r['base_filters']}: {r['refused']}" for r in plan["candidates"]
            if "refused" in r]
    out += [f"warning: {w}" for w in plan["warnings"]]
    return "\n".join(out)


def constants_text(plan: dict, exp_name: str | None = None) -> str:
    """A ready constants file with the planned settings."""
    s = plan["choice"]["settings"]
    fp = plan["fingerprint"]
    lines = [
        f'"""Planned by `dsal plan` for {fp["data_path"]} (budget {plan["budget_minutes"]} min, predicted '
        f'{plan["choice"]["predicted"]["total_s"] / 60:.1f} min). Reasons: plan.json."""',
        "",
        'PRESET = "demo"  # the base; every planned setting is below',
        f"DATA_PATH = {fp['data_path']!r}",
    ]
    if exp_name:
        lines.append(f"EXP_NAME = {exp_name!r}")
    lines += [f"{k.upper()} = {v!r}" for k, v in s.items()]
    return "\n".join(lines) + "\n"


def table(plan: dict) -> str:
    """The short printed summary: fingerprint, candidates, choice."""
    if plan.get("space") == "volume":
        return volume_table(plan)
    fp, ch = plan["fingerprint"], plan["choice"]
    m, im = fp["masks"], fp["image_size"]
    out = [
        f"data {fp['data_path']}: {fp['counts']['train']} pool, {fp['counts']['val']} val, "
        f"{fp['counts']['test']} test; "
        f"median {im['median_rows']:.0f}x{im['median_cols']:.0f} ({fp['color']}, {fp['intensity']['dtype']}); "
        f"foreground {m['foreground_fraction_mean']}; components p5 {m['component_pixels_p5']} px, "
        f"min {m['component_pixels_min']} px",
        f"{'size':>9} {'filters':>7} {'batch':>5} {'p5 px':>7} {'rule':>4} {'train ms':>8} {'score ms':>8} "
        f"{'predicted':>9} {'probe':>7}",
    ]
    for c in plan["candidates"]:
        out.append(f"{c['img_rows']:>4}x{c['img_cols']:<4} {c['base_filters']:>7} {c['batch_size']:>5} "
                   f"{c['p5_structure_pixels'] if c['p5_structure_pixels'] is not None else '-':>7} "
                   f"{'ok' if c['meets_size_rule'] else 'no':>4} {c['train_step_s'] * 1000:>8.0f} "
                   f"{c['score_step_s'] * 1000:>8.0f} {c['predicted_s'] / 60:>7.1f} m "
                   f"{'refused' if 'refused' in c else 'learned' if c.get('probes') else '-':>7}")
    s = ch["settings"]
    out.append(f"chosen: {s['img_rows']}x{s['img_cols']}, {s['base_filters']} filters, batch {s['batch_size']}, "
               f"loss {s['loss']}{' (batch Dice)' if s.get('batch_dice') else ''}, "
               f"{s['nb_initial_epochs']}+{s['nb_iterations']}x{s['nb_active_epochs']} epochs; "
               f"predicted {ch['predicted']['total_s'] / 60:.1f} min of {plan['budget_minutes']} "
               f"(planning took {plan['plan_s']:.0f} s)")
    out += [f"refused {c['img_rows']}x{c['img_cols']} f{c['base_filters']}: {c['refused']}"
            for c in plan["candidates"] if "refused" in c]
    out += [f"warning: {w}" for w in plan["warnings"]]
    return "\n".join(out)


def write_plan(plan: dict, out: str | Path, exp_name: str | None = None) -> tuple[Path, Path]:
    """`plan.json` at `out` and the constants file beside it (`<stem>_constants.py`)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(plan, indent=2, default=float))
    tmp.replace(out)
    const = out.with_name(f"{out.stem}_constants.py")
    const.write_text(constants_text(plan, exp_name))
    return out, const


def explicit_values(constants: str | Path | None, overrides: dict[str, Any]) -> dict[str, Any]:
    """What the user set: the constants file's names, then the command line's (lower-case keys)."""
    values: dict[str, Any] = {}
    if constants is not None and Path(constants).is_file():
        values.update({k.lower(): v for k, v in read_constants(constants).items()})
    values.update({k.lower(): v for k, v in overrides.items() if v is not None})
    return values


def plan_for_run(cfg: Config, user: dict[str, Any], log: Callable[[str], None] = print,
                 full_supervision: bool = False) -> Config:
    """`PRESET = "auto"`: plan on first use, store `plan.json` in the run folder, and resolve
    planned settings < constants file < command line. A resumed run reuses its stored plan.
    `full_supervision`: the run is `--full-supervision`; the plan predicts and fits that protocol."""
    path = cfg.run_dir / "plan.json"
    if path.is_file():
        plan = json.loads(path.read_text())
        log(f"PRESET auto: using the stored plan {path}")
    else:
        log(f"PRESET auto: planning for {cfg.data_path} within {cfg.plan_budget_minutes} min")
        plan = make_plan(cfg.data_path, cfg.plan_budget_minutes, fixed=user, log=log,
                         full_supervision=full_supervision)
        write_plan(plan, path)
        log(table(plan))
    settings = {**plan["choice"]["settings"], **{k: v for k, v in user.items() if k != "preset"}}
    return resolve({**settings, "preset": "auto"}, source=f"the plan {path} and your settings")


__all__ = ["fingerprint", "component_areas", "size_ladder", "schedule", "predict_seconds", "choose",
           "choose_learning", "probe_learning", "probe_verdict", "measure_steps", "make_plan", "write_plan",
           "plan_for_run", "table", "explicit_values", "volume_fingerprint", "component_voxels", "patch_ladder",
           "make_volume_plan", "measure_volume_steps", "probe_volume_learning", "volume_table"]
