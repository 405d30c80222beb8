"""The 3-D volume planner: `make_volume_plan`, which `make_plan` runs on a folder of NIfTI volumes.

The same steps as the image planner (`core.py` holds the ones they share), with a volume's own fingerprint
(`volume_fingerprint`: shapes, spacings, the target spacing and the shapes resampled to it, CT or MRI, components
in voxels and mm^3), nnU-Net's patch rule (`patch_ladder`), a ladder patch as a candidate (`volume_candidate`),
the volume space's own streams, sliding-window inferer and batch counts (`measure_volume_steps`,
`probe_volume_learning`, `volume_batches`), its reasons and warnings, and its printed summary (`volume_table`).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
    Batches,
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
    from ..volume_space import VolumeSpace

    values = {**values, "data_path": str(data_path)}
    values.setdefault("patch_size", (2 ** int(values.get("depth", Config.depth)),) * 3)
    return VolumeSpace.from_config(resolve(values, source="the plan"))


def _volume_pairs(root: Path, split: str, naming: str) -> list[tuple[Path, Path | None]]:
    """(volume, label or None) of a split; a missing or empty folder is an empty split."""
    from ..volumes import find_volume_pairs, list_volumes

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
    from ..volume_space import ANISOTROPY
    from ..volumes import read_header

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
    from ..volumes import load_case, read_label

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
    from ..volumes import read_header, read_label

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
    shared["loss"] = ("bce_dice", "Dice + cross-entropy, nnU-Net's loss and the default on volumes (LOSS = \"auto\"): "
                      "soft Dice alone collapsed to all-background in round 0 on 2 of 4 hippocampus seeds "
                      "(bench/results/hippocampus.md)")
    return {**out, "depth": (depth, "the U-Net's depth: every patch side divides by 2**DEPTH"),
            "foreground_oversample": (VOLUME_FOREGROUND_OVERSAMPLE, "nnU-Net's share of each batch's patches centred "
                                      "on a foreground voxel"), **shared}


def volume_batches(grid) -> Batches:
    """Batches of each pass of a volume run (`predict_seconds`): an epoch is the space's `steps_per_epoch`
    (STEPS_PER_EPOCH, or one expected pass over the volumes on `grid`); validation takes `EVAL_VOLUMES`
    whole volumes a batch, scoring `SCORE_VOLUMES` a call."""
    from ..volume_space import EVAL_VOLUMES, SCORE_VOLUMES, VolumeSpace

    def count(cfg: Config, kind: str, n: int) -> int:
        if kind == "train":
            space = VolumeSpace.from_config(cfg)
            return space.steps_per_epoch(n, tuple(max(g, p) for g, p in zip(grid, space.patch_size)))
        return math.ceil(n / (EVAL_VOLUMES if kind == "val" else SCORE_VOLUMES))

    return count


def volume_planning(data_path: str | Path, fp: dict, fixed: dict[str, Any], budget_minutes: float,
                    full_supervision: bool = False, memory: int | None = None,
                    started: float | None = None) -> Planning:
    """The `Planning` of a volume folder: as `planning`, with the volume space's batch counts and candidates and
    the load time of every split (a volume run caches all three at its start, two volumes at a time)."""
    memory = memory_bytes() if memory is None else memory
    n_pool, n_val = pool_counts(data_path, fp, fixed, "volumes")
    depth = int(fixed.get("depth", Config.depth))
    base = {k: v for k, (v, _) in volume_base_settings(fp, depth).items()}
    load_s = fp["load_s_per_volume"] * sum(fp["counts"].values()) / min(2, os.cpu_count() or 1)
    return Planning(fp, fixed, base, n_pool, n_val, memory, load_s, 60.0 * budget_minutes, full_supervision,
                    batches=volume_batches(fp["grid"]), make=volume_candidate,
                    started=time.perf_counter() if started is None else started)


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
    from ..volume_space import VolumeSpace

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
    from ..volume_space import VolumeSpace

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

    from .. import determinism, train
    from ..model import HEADS, float32_copy
    from ..strategies import QUERY_STRATEGIES
    from ..volume_space import VolumeSpace, content_box

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
    from .. import determinism, train
    from ..model import HEADS
    from ..volume_space import VolumeSpace

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


def volume_warnings(plan: Planning) -> list[str]:
    """What the user should know about the volumes (the budget's warnings are `Decision.warnings`)."""
    fp, m = plan.fp, plan.fp["masks"]
    warnings = []
    small = m["component_target_voxels_min"]
    if small is not None and small < MIN_STRUCTURE_VOXELS:
        warnings.append(f"the smallest structure ({m['component_mm3_min']:g} mm^3) is {small:g} voxels at the target "
                        f"spacing {fp['spacing']['target']} mm, under {MIN_STRUCTURE_VOXELS}: set a finer SPACING "
                        "if such structures matter")
    if m["masks_read"] == 0:
        warnings.append("no labels found: the size rule could not be applied")
    return warnings


def make_volume_plan(data_path: str | Path, budget_minutes: float, fixed: dict[str, Any],
                     measure: Callable[[Config], dict] | None = None, log: Callable[[str], None] = print,
                     full_supervision: bool = False,
                     probe: Callable[[Config, int], dict] | None = None) -> dict[str, Any]:
    """`make_plan` for a folder of NIfTI volumes (`fixed` already lower-case, with DATA_PATH): `volume_fingerprint`,
    `volume_planning`, `patch_ladder`, then the shared `search_candidates`, `choose_learning` and `fit_choice`
    over the volume candidates, timed (`measure_volume_steps`) and probed (`probe_volume_learning`) on a seeded
    sample of decoded pool volumes; `volume_reasons`, `volume_warnings`."""
    from ..volume_space import VolumeSettings

    t0 = time.perf_counter()
    seed = int(fixed.get("seed", 0))
    fp = volume_fingerprint(data_path, fixed, seed=seed, log=log)
    if measure is None:
        sample, models = probe_sample(data_path, seed), {}
        probe = probe or (lambda cfg, steps: probe_volume_learning(cfg, *sample(cfg), steps=steps, seed=seed,
                                                                  model=models.pop(cfg.to_json(), None)))
        measure = lambda cfg: measure_volume_steps(cfg, *sample(cfg), seed=seed, keep=models)  # noqa: E731
        memory = None
    else:
        memory = 64 * 2**30
    plan = volume_planning(data_path, fp, fixed, budget_minutes, full_supervision, memory, started=t0)
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
        "warnings": volume_warnings(plan) + d.warnings(plan, budget_minutes),
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
