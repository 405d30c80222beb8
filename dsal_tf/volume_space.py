"""The volume space: NIfTI volumes (3D) through every workflow, beside the 2D `ImageSpace`.

Same methods as `space.ImageSpace`, so the loop, the strategies and the trainers never branch on
the rank; what differs lives here:

- **Data.** The orgData layout with `.nii.gz`/`.nii` files (`volumes.find_volume_pairs`). Every
  volume is normalised on its own grid (z-score for MRI, a clipped window for CT), resampled to the
  target spacing (`SPACING`, default the pool's median, nnU-Net style) and stored centred in one
  fixed grid: the largest resampled shape over the train, val and test folders, rounded up to a
  multiple of 2**DEPTH and at least `PATCH_SIZE`. Padding is 0 after normalisation (the z-scored
  mean, the CT window's floor), as `sliding.py` and nnU-Net pad. A split is cached as memory-mapped
  `images.npy` (float16 [N,D,H,W,1]: normalised values need no more; half the disk and page cache)
  and `masks.npy` (uint8 {0,1} [N,D,H,W,1]), keyed like the 2D cache (file names, sizes, mtimes and
  every setting that changes a voxel), so the pool is never fully resident. `meta.json` records
  each volume's grid and where it sits in the padded array.
- **Normalizer.** Normalisation happens at load time, so the run's normalizer is a cast to float32
  (`VolumeNormalizer`); `fit_normalizer` / `load_normalizer` make and read it (its JSON records the
  spacing, patch size and normalisation, what an exported model needs beside it).
- **Training.** Random `PATCH_SIZE` patches of the given volumes, drawn inside each volume's
  non-padding box; the last `forced_foreground(batch, share)` of every batch centred on a random
  foreground voxel (`foreground_oversample`, nnU-Net's 0.33); flips on all three axes and 90-degree
  rotations in the in-slice plane, identical for image and mask. Each patch's randomness comes
  from one seeded draw of `tf.data.Dataset.random(rerandomize_each_iteration=True)`: two streams
  with the same seed give the same batches, and every epoch new ones. An epoch is a fixed number of
  steps (`steps_per_epoch`).
- **Validation.** Whole padded volumes, one per batch, through the model: the U-Net is fully
  convolutional and the padded grid divides by 2**DEPTH, so Keras' `val_main_dice` is the mean
  per-volume Dice of one whole-volume pass. (A sliding window cannot run inside `fit`'s validation;
  a whole-volume pass is what sliding windows approximate, with the full context.)
- **Inference.** `inferer(model)`: the model's contract `(x, training) -> {head: prob}` over whole
  volumes through Gaussian sliding windows (`sliding.sliding_window_outputs`) over each volume's
  non-padding box, every head (and `features`) returned; outside the box every head says 0, so the
  padding adds nothing to any score. Strategies' `batch_scores` run unchanged on it (DSAL's
  agreement, entropy, CEAL's MC dropout with `training=True`).
- **Masks on disk.** NIfTI at the input's grid, affine and header (`volumes.write_mask`), named
  `<name>.nii.gz`.

The model for volumes must be built with `model_input_shape` = (None, None, None, 1): Keras
refuses other shapes than the one a functional model was built with, and the same weights run on
patches (training), the padded grid (validation) and windows (inference).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .data import SPLITS, Normalizer, Rows, Split, disk_array, forced_foreground, masks_optional, steady
from .errors import DsalError
from .files import atomic_dir, atomic_write_text
from .settings import Settings as BaseSettings
from .settings import coerce, positive, suggest
from .sliding import MAX_FOREGROUND_VOXELS, OVERLAP, patch_start, sliding_window_outputs
from .volumes import (
    DEFAULT_CT_WINDOW,
    NIFTI_EXTS,
    NORMALIZATIONS,
    find_volume_pairs,
    list_volumes,
    load_case,
    median_spacing,
    read_header,
    read_label,
    resampled_shape,
    resize,
    volume_stem,
    write_mask,
)

CACHE_VERSION = 1
STORE_DTYPE = np.float16
THRESHOLD = 0.5
SCORE_VOLUMES = 1  # volumes per `score_batch` call: one, cropped to its box inside the padding
EVAL_VOLUMES = 1  # volumes per validation batch: a whole padded volume is a large input
THUMBNAIL_SIDE = 8
ANISOTROPY = 2.0  # a target spacing whose largest axis is this much coarser has a slice axis


@dataclass(frozen=True)
class VolumeSettings(BaseSettings):
    """What the volume space reads from the configuration (all optional)."""

    patch_size: tuple = (32, 48, 32)  # training patch (D, H, W) in voxels at SPACING; multiples of 2**DEPTH
    spacing: tuple = ()  # target voxel spacing (D, H, W) in mm; () = the pool's median (nnU-Net)
    volume_normalization: str = "zscore"  # "zscore" (MRI, per volume) or "ct" (CT_WINDOW clipped to [0, 1])
    ct_window: tuple = DEFAULT_CT_WINDOW  # (low, high) Hounsfield units when VOLUME_NORMALIZATION = "ct"
    steps_per_epoch: int = 0  # training steps per epoch; 0 = one expected pass over the labelled volumes

    def check(self) -> None:
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise DsalError(f"PATCH_SIZE = {self.patch_size!r} must be three positive sizes (D, H, W), "
                            "e.g. (32, 48, 32)")
        if self.spacing and (len(self.spacing) != 3 or min(self.spacing) <= 0):
            raise DsalError(f"SPACING = {self.spacing!r} must be () (the pool's median) or three positive "
                            "values in mm, e.g. (1.0, 1.0, 1.0)")
        if self.volume_normalization not in NORMALIZATIONS:
            raise DsalError(f"VOLUME_NORMALIZATION = {self.volume_normalization!r} is not one of "
                            f"{list(NORMALIZATIONS)}" + suggest(self.volume_normalization, NORMALIZATIONS))
        if len(self.ct_window) != 2 or not self.ct_window[1] > self.ct_window[0]:
            raise DsalError(f"CT_WINDOW = {self.ct_window!r} must be (low, high) with high > low, e.g. (-160, 240)")
        positive("steps_per_epoch", self.steps_per_epoch, strict=False)

    @classmethod
    def from_values(cls, values, source: str = "constants.py") -> VolumeSettings:
        """As `Settings.from_values`; SPACING's default is empty, so it is read as floats (and
        `()`, `[]`, `""` or None mean the pool's median)."""
        given = {}
        for f in dataclasses.fields(cls):
            if f.name not in values:
                continue
            value = values[f.name]
            if f.name == "spacing":
                empty = value is None or (isinstance(value, (str, tuple, list)) and not str(value).strip("()[], "))
                given[f.name] = () if empty else coerce(f.name, value, (1.0,), source)
            else:
                given[f.name] = coerce(f.name, value, f.default, source)
        settings = cls(**given)
        settings.check()
        return settings


# ------------------------------------------------------------------ geometry
@dataclass(frozen=True)
class Layout:
    """The grid every split shares: the target spacing (mm) and the padded shape (voxels)."""

    spacing: tuple[float, float, float]
    shape: tuple[int, int, int]


@dataclass(frozen=True)
class Geometry:
    """One volume: its file's grid, its grid at the target spacing, and where that sits (its
    first voxel) in the padded array."""

    shape: tuple[int, int, int]
    resampled: tuple[int, int, int]
    offset: tuple[int, int, int]

    @property
    def box(self) -> tuple[slice, slice, slice]:
        return tuple(slice(o, o + n) for o, n in zip(self.offset, self.resampled, strict=True))


def rounded_up(n: int, step: int) -> int:
    return -(-int(n) // step) * step


def content_box(volume) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) corners of the box holding every non-zero voxel of `[D,H,W]` / `[D,H,W,1]`:
    the volume inside its padding (the whole grid when it is all zero)."""
    v = np.asarray(volume)
    v = v.reshape(v.shape[:3]) if v.ndim == 4 else v
    nonzero = v != 0
    low, high = [], []
    for axis in range(3):
        hit = np.flatnonzero(nonzero.any(axis=tuple(a for a in range(3) if a != axis)))
        if len(hit) == 0:
            return np.zeros(3, np.int64), np.asarray(v.shape[:3], np.int64)
        low.append(hit[0])
        high.append(hit[-1] + 1)
    return np.asarray(low, np.int64), np.asarray(high, np.int64)


def stored_boxes(images) -> list[tuple[np.ndarray, np.ndarray]] | None:
    """Each item's (low, high) box inside its padding from the cache's `meta.json`, when `images`
    is a cached split's memory map (whole, not a view) or `Rows` of one; else None. Saves reading
    every volume of a large pool to find its box."""
    base, index = (images.array, images.index) if isinstance(images, Rows) else (images, None)
    filename = getattr(base, "filename", None)
    if not filename or isinstance(base.base, np.ndarray):  # a slice of a memory map: rows unknown
        return None
    meta_file = Path(filename).parent / "meta.json"
    if not meta_file.is_file():
        return None
    vols = json.loads(meta_file.read_text())["volumes"]
    if len(vols) != base.shape[0]:
        return None
    boxes = [(np.asarray(v["offset"], np.int64), np.asarray(v["offset"], np.int64) + np.asarray(v["resampled"]))
             for v in vols]
    return boxes if index is None else [boxes[int(i)] for i in index]


def box_sizes(images) -> np.ndarray:
    """Voxels inside each item's padding box [N]: the cache's record (`stored_boxes`), or found from the
    voxels (`content_box`)."""
    boxes = stored_boxes(images) or [content_box(images[i]) for i in range(len(images))]
    return np.array([int(np.prod(high - low)) for low, high in boxes], np.int64)


def crop_item(array, i: int, start, size) -> np.ndarray:
    """The `size` box at `start` of item `i` of `array` ([N,D,H,W,...], a memory map or `Rows`),
    reading only that box; voxels outside the item are zero."""
    base, row = (array.array, int(array.index[i])) if isinstance(array, Rows) else (array, int(i))
    out = np.zeros((*size, *base.shape[4:]), base.dtype)
    src, dst = [], []
    for s, p, n in zip(start, size, base.shape[1:4], strict=True):
        lo, hi = max(int(s), 0), min(int(s) + int(p), int(n))
        hi = max(lo, hi)
        src.append(slice(lo, hi))
        dst.append(slice(lo - int(s), hi - int(s)))
    out[tuple(dst)] = base[(row, *src)]
    return out


def area_matrix(n: int, side: int) -> np.ndarray:
    """[side, n] weights averaging `n` voxels into `side` bins by overlap length (area resampling)."""
    edges = np.arange(side + 1) * n / side
    voxels = np.arange(n)
    overlap = np.minimum(edges[1:, None], voxels[None] + 1) - np.maximum(edges[:-1, None], voxels[None])
    w = np.clip(overlap, 0, None)
    return w / w.sum(axis=1, keepdims=True)


def area_downsample(volume: np.ndarray, side: int) -> np.ndarray:
    """`[D,H,W]` averaged down to `[side, side, side]` (each output voxel the mean of its region)."""
    out = np.asarray(volume, np.float64)
    for axis in range(3):
        out = np.moveaxis(np.tensordot(area_matrix(out.shape[axis], side), out, axes=([1], [axis])), 0, axis)
    return out.astype(np.float32)


# ------------------------------------------------------------------ normalizer
@dataclass(frozen=True)
class VolumeNormalizer:
    """The normalizer of a volume run: voxels are normalised when the volumes are cached, so the
    stream only casts to float32. It records what preprocessing the network expects (spacing,
    patch, normalisation) for predictions and exports. Its JSON has no `mean`/`std`, so the 2D
    `Normalizer.load` (x / 255) refuses it instead of scaling volumes silently."""

    normalization: str = "zscore"
    ct_window: tuple = DEFAULT_CT_WINDOW
    spacing: tuple = ()
    patch_size: tuple = ()

    def __call__(self, x):
        import tensorflow as tf

        return tf.cast(x, tf.float32)

    def numpy(self, x) -> np.ndarray:
        return np.asarray(x, np.float32)

    def save(self, path: Path) -> None:
        atomic_write_text(path, json.dumps({"space": "volume", **dataclasses.asdict(self)}))

    @classmethod
    def load(cls, path: Path) -> VolumeNormalizer:
        d = json.loads(Path(path).read_text())
        if d.get("space") != "volume":
            raise DsalError(f"{path} is the normalizer of a 2D run, not of volumes; start a new run "
                            "(another EXP_NAME) for this volume dataset")
        return cls(d["normalization"], tuple(d["ct_window"]), tuple(d["spacing"]), tuple(d["patch_size"]))


def _check_normalizer(normalizer) -> None:
    if isinstance(normalizer, Normalizer):
        raise TypeError("the 2D Normalizer (x / 255) was given to the volume space; "
                        "use space.fit_normalizer / space.load_normalizer")


# ------------------------------------------------------------------ training patches
def rotation_plane(spacing) -> tuple[int, int]:
    """The in-slice plane that 90-degree rotations turn: the two axes other than the slice axis
    (the coarsest, when the target spacing is anisotropic by `ANISOTROPY` or more), else the
    first two voxel axes (the in-slice plane of an axially acquired scan)."""
    s = np.asarray(spacing, np.float64) if len(spacing) == 3 else np.ones(3)
    thick = int(np.argmax(s)) if s.max() >= ANISOTROPY * s.min() else 2
    a, b = (axis for axis in range(3) if axis != thick)
    return a, b


class PatchDraw:
    """One training patch from one random draw `r`, so patches are reproducible in any order or
    thread: `(image [d,h,w,1], mask [d,h,w,1] uint8)` of `images`/`masks` ([N,D,H,W,1] arrays,
    memory maps or `Rows`, read one box at a time).

    Boxes are drawn inside each volume's non-padding box (along an axis shorter than the patch,
    the patch holds the whole axis); `force` centres the patch on a random foreground voxel of a
    random volume with foreground (at most `MAX_FOREGROUND_VOXELS` kept per volume, seeded). With
    `augment`: a rotation by k * 90 degrees in `plane` (an odd k reads the box with the plane's two
    sizes swapped, so the turned patch has the patch's shape) and a flip on each axis, p = 0.5."""

    def __init__(self, images, masks, patch_size, seed: int, augment: bool = True, plane=(0, 1)):
        if len(images) == 0:
            raise ValueError("no volumes to draw training patches from")
        self.images, self.masks = images, masks
        self.patch_size = tuple(int(p) for p in patch_size)
        self.augment, self.plane = augment, tuple(plane)
        rng = np.random.default_rng(seed)
        self.boxes = list(stored_boxes(images) or [content_box(images[i]) for i in range(len(images))])
        self.fg: list[np.ndarray] = []
        for i in range(len(images) if masks is not None else 0):
            where = np.argwhere(np.asarray(masks[i]).reshape(images.shape[1:4]) > 0)
            if len(where) > MAX_FOREGROUND_VOXELS:
                where = where[np.sort(rng.choice(len(where), MAX_FOREGROUND_VOXELS, replace=False))]
            self.fg.append(where)
            if len(where):  # a labelled voxel outside the non-zero box (CT air clipped to 0) widens it
                low, high = self.boxes[i]
                self.boxes[i] = (np.minimum(low, where.min(0)), np.maximum(high, where.max(0) + 1))
        self.with_fg = [i for i, v in enumerate(self.fg) if len(v)]

    def draw(self, r: int, force: bool) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(int(r) % 2**63)
        if force and self.with_fg:
            case = self.with_fg[int(rng.integers(len(self.with_fg)))]
            centre = self.fg[case][int(rng.integers(len(self.fg[case])))]
        else:
            case, centre = int(rng.integers(len(self.images))), None
        k = int(rng.integers(4)) if self.augment else 0
        size = list(self.patch_size)
        if k % 2:
            a, b = self.plane
            size[a], size[b] = size[b], size[a]
        low, high = self.boxes[case]
        start = np.asarray(patch_start(high - low, size, rng, None if centre is None else centre - low)) + low
        x = crop_item(self.images, case, start, size)
        y = (crop_item(self.masks, case, start, size) if self.masks is not None
             else np.zeros((*size, 1), np.uint8))
        if self.augment:
            x, y = np.rot90(x, k, axes=self.plane), np.rot90(y, k, axes=self.plane)
            for axis in range(3):
                if rng.random() < 0.5:
                    x, y = np.flip(x, axis), np.flip(y, axis)
        return np.ascontiguousarray(x), np.ascontiguousarray(y, dtype=np.uint8)

    def __call__(self, r, force):
        return self.draw(int(r), bool(force))


# ------------------------------------------------------------------ inference
class SlidingInferer:
    """The model's contract over whole volumes: `(x [N,D,H,W,C], training) -> {output: value}`,
    each volume through Gaussian sliding windows of `patch_size` over its non-padding box. Spatial
    outputs (the heads) come back `[N,D,H,W,1]`, 0 outside the box; vector outputs (`features`)
    `[N,C]`, averaged over the windows. `training=True` runs the windows in training mode (MC
    dropout: every window and every call draws its own masks)."""

    def __init__(self, model, patch_size, batch_size: int = 2, overlap: float = OVERLAP):
        self.model = model
        self.patch_size = tuple(int(p) for p in patch_size)
        self.batch_size = max(1, int(batch_size))
        self.overlap = overlap
        self._graphs: dict[bool, object] = {}

    def _window_model(self, batch, training: bool = False):
        import tensorflow as tf

        if training not in self._graphs:
            model = self.model
            self._graphs[training] = tf.function(lambda b: model(b, training=training), reduce_retracing=True)
        return self._graphs[training](tf.convert_to_tensor(batch, tf.float32))

    def volume(self, volume: np.ndarray, training: bool = False) -> dict[str, np.ndarray]:
        """Every output for one volume `[D,H,W,C]`: maps `[D,H,W,1]`, vectors `[C]`."""
        volume = np.asarray(volume, np.float32)
        low, high = content_box(volume)
        box = tuple(slice(int(a), int(b)) for a, b in zip(low, high))
        got = sliding_window_outputs(self._window_model, volume[box], self.patch_size, self.overlap,
                                     self.batch_size, training=training)
        out = {}
        for k, v in got.items():
            if v.ndim == 3:
                full = np.zeros((*volume.shape[:3], 1), np.float32)
                full[box] = v[..., None]
                out[k] = full
            else:
                out[k] = v
        return out

    def __call__(self, x, training: bool = False):
        import tensorflow as tf

        per = [self.volume(v, training) for v in np.asarray(x, np.float32)]
        return {k: tf.constant(np.stack([p[k] for p in per])) for k in per[0]}


def smoothed_dice(a: np.ndarray, b: np.ndarray) -> float:
    """(2|a b| + 1) / (|a| + |b| + 1), as `strategies.base.binary_dice` (1 when both are empty)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return float((2.0 * np.sum(a & b) + 1.0) / (a.sum() + b.sum() + 1.0))


def predict_file(model, image_path: Path, out_path: Path, normalizer: VolumeNormalizer,
                 batch_size: int = 2, probabilities_path: Path | None = None, overlay_path: Path | None = None) -> dict:
    """Predict one NIfTI volume that was never cached (`dsal predict`): read, normalise and resample
    it as the run's volumes were (`normalizer` records how), slide the windows over it, write the
    main head's mask on the input's grid with its affine and header (and its probabilities at
    `probabilities_path`, a picture of three planes at `overlay_path`), and return its DSAL agreement
    (on the network's grid), the mask's foreground in voxels and its shape."""
    window = normalizer.ct_window if normalizer.normalization == "ct" else None
    case = load_case(image_path, None, normalizer.spacing or None, normalizer.normalization, window)
    heads = SlidingInferer(model, normalizer.patch_size, batch_size).volume(case.image[..., None])
    b0, b1, b2 = (heads[h][..., 0] > THRESHOLD for h in ("main", "side_1", "side_2"))
    prob = resize(heads["main"][..., 0], case.source.shape, 1)
    mask = (prob > THRESHOLD).astype(np.uint8)
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    write_mask(out_path, mask, case.source)
    if probabilities_path is not None:
        write_probabilities(probabilities_path, prob, case.source)
    if overlay_path is not None:
        from .overlays import volume_tiles, write_grid

        write_grid([volume_tiles(case.source.array, None, mask, case.source.spacing)], overlay_path)
    return {"agreement": 0.5 * (smoothed_dice(b0, b1) + smoothed_dice(b0, b2)), "foreground": int(mask.sum()),
            "shape": case.source.shape}


def write_probabilities(path: Path, prob: np.ndarray, reference) -> None:
    """Probabilities `[D,H,W]` on `reference`'s grid as NIfTI with its affine: uint8 p x 255 with
    scl_slope 1/255, so viewers and nibabel's `get_fdata()` read p (to 1/255) at a quarter of float32's size."""
    import gzip

    import nibabel as nib

    from .files import atomic_write

    header = reference.header.copy()
    header.set_data_dtype(np.uint8)
    img = nib.Nifti1Image(np.round(np.clip(prob, 0.0, 1.0) * 255).astype(np.uint8), reference.affine, header=header)
    img.header.set_slope_inter(1.0 / 255, 0.0)
    data = img.to_bytes()
    if Path(path).name.lower().endswith(".gz"):
        data = gzip.compress(data, compresslevel=6, mtime=0)
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


# ------------------------------------------------------------------ the space
class VolumeSpace:
    """3D volumes, NDHWC: NIfTI in, patches to train on, sliding windows to infer, NIfTI out."""

    rank = 3
    # MIXED_PRECISION = "auto" trains volumes in float32: with bf16 the 3D U-Net (NORM = "none") did not learn
    # the hippocampus (train Dice 0.31 after 300 steps, fp32 0.80; docs/gpus.md#precision). Set it to choose.
    reduced_precision_by_default = False
    mask_suffix = ".nii.gz"
    Settings = VolumeSettings

    def __init__(self, cfg, settings: VolumeSettings | None = None):
        self.cfg = cfg
        self.settings = settings if settings is not None else self.Settings()
        step = 2 ** int(cfg.depth)
        patch = self.settings.patch_size
        if any(p % step for p in patch):
            fixed = tuple(max(step, round(p / step) * step) for p in patch)
            raise DsalError(f"PATCH_SIZE = {patch} must divide by 2**DEPTH = {step} on every axis "
                            f"(the U-Net pools DEPTH times); use e.g. {fixed}")
        self._layout: Layout | None = None
        self._geometry: dict[str, Geometry] = {}

    @classmethod
    def from_config(cls, cfg) -> VolumeSpace:
        return cls(cfg, cls.Settings.from_config(cfg))

    @property
    def patch_size(self) -> tuple[int, int, int]:
        return tuple(int(p) for p in self.settings.patch_size)

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        """What the network trains on (and an export takes): one patch, one channel."""
        return (*self.patch_size, 1)

    @property
    def eval_batch_size(self) -> int:
        """Items per scoring batch (where `dsal score --shard` cuts the pool): whole volumes."""
        return SCORE_VOLUMES

    @property
    def model_input_shape(self) -> tuple[None, None, None, int]:
        """What to build the U-Net with: any grid (patches, the padded grid, windows)."""
        return (None, None, None, 1)

    # ------------------------------------------------------------------ layout
    def _pairs(self, split: str, require_masks: bool) -> list[tuple[Path, Path | None]]:
        pairs = find_volume_pairs(self.cfg.data_path, split, self.cfg.mask_naming, require_masks=require_masks)
        if split == "train" and self.cfg.pool_size:
            pairs = pairs[: self.cfg.pool_size]
        return pairs

    def pool_size(self) -> int:
        """How many pool volumes the run sees (POOL_SIZE caps it), from the file names alone."""
        return len(self._pairs("train", require_masks=True))

    @property
    def layout(self) -> Layout:
        """The target spacing and the padded grid, from the headers of every split (no voxels read):
        the same for every split and every process over the same files."""
        if self._layout is None:
            self._layout = self._plan_layout()
        return self._layout

    def _plan_layout(self) -> Layout:
        root = Path(self.cfg.data_path)
        headers: dict[str, list] = {}
        for split in SPLITS:
            folder = root / f"{split}Img"
            if not folder.is_dir() or not any(p.is_file() for p in folder.iterdir()):
                continue
            headers[split] = [read_header(img) for img, _ in self._pairs(split, require_masks=False)]
        every = [v for vs in headers.values() for v in vs]
        if not every:
            raise DsalError(f"no volumes ({', '.join(NIFTI_EXTS)}) under {root}/trainImg; add the training volumes")
        spacing = (tuple(float(s) for s in self.settings.spacing) if self.settings.spacing
                   else median_spacing(v.spacing for v in headers.get("train") or every))
        step = 2 ** int(self.cfg.depth)
        resampled = {str(v.path): resampled_shape(v.shape, v.spacing, spacing) for v in every}
        largest = np.max(np.asarray(list(resampled.values())), axis=0)
        shape = tuple(max(p, rounded_up(n, step)) for p, n in zip(self.patch_size, largest, strict=True))
        for v in every:
            r = resampled[str(v.path)]
            self._geometry[str(v.path)] = Geometry(v.shape, r, tuple((s - n) // 2 for s, n in zip(shape, r)))
        return Layout(spacing, shape)

    def geometry(self, path: Path) -> Geometry:
        """Where the volume of `path` sits in the padded grid (its header read if not seen yet)."""
        key = str(path)
        layout = self.layout
        if key not in self._geometry:
            v = read_header(path)
            r = resampled_shape(v.shape, v.spacing, layout.spacing)
            if any(n > s for n, s in zip(r, layout.shape)):
                raise DsalError(f"{path} is {'x'.join(map(str, r))} voxels at the run's spacing, larger than its grid "
                                f"{'x'.join(map(str, layout.shape))}; put it in the dataset before the run starts")
            self._geometry[key] = Geometry(v.shape, r, tuple((s - n) // 2 for s, n in zip(layout.shape, r)))
        return self._geometry[key]

    # ------------------------------------------------------------------ data
    def load_splits(self, splits=SPLITS) -> dict[str, Split]:
        """Each split checked, preprocessed and cached (memory-mapped); with `ORACLE = "files"` the
        test split is optional (absent: left out)."""
        root = Path(self.cfg.data_path)
        return {s: self.load_split(s) for s in splits
                if not (s == "test" and self.cfg.oracle == "files" and not list_volumes(root / "testImg"))}

    def _cache_key(self, pairs, split: str) -> str:
        layout = self.layout
        files = [(str(p), os.path.getsize(p), os.stat(p).st_mtime_ns) if p is not None else None
                 for pair in pairs for p in pair]
        s = self.settings
        settings = dict(v=CACHE_VERSION, kind="volumes", split=split, spacing=list(layout.spacing),
                        shape=list(layout.shape), normalization=s.volume_normalization,
                        window=list(s.ct_window) if s.volume_normalization == "ct" else None,
                        dtype=np.dtype(STORE_DTYPE).name, naming=self.cfg.mask_naming, files=files)
        return hashlib.sha1(json.dumps(settings).encode()).hexdigest()[:20]

    def load_split(self, split: str) -> Split:
        """One split as a `data.Split`: float16 images [N,D,H,W,1] (normalised, resampled, padded)
        and uint8 {0,1} masks [N,D,H,W,1], memory-mapped read-only from `CACHE_DIR/volumes-<split>-<key>/`
        (written under a temporary name, renamed when complete)."""
        pairs = self._pairs(split, require_masks=not masks_optional(self.cfg, split))
        names = [volume_stem(img) for img, _ in pairs]
        files = [img for img, _ in pairs]
        has_mask = np.array([m is not None for _, m in pairs], bool)
        layout = self.layout
        folder = self.cfg.cache_path / f"volumes-{split}-{self._cache_key(pairs, split)}"
        names_file = folder / "names.json"
        if not (names_file.is_file() and json.loads(names_file.read_text()) == names):
            tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            try:
                shape = (len(pairs), *layout.shape, 1)
                images = np.lib.format.open_memmap(tmp / "images.npy", "w+", STORE_DTYPE, shape)
                masks = np.lib.format.open_memmap(tmp / "masks.npy", "w+", np.uint8, shape)
                meta = self._decode_into(pairs, images, masks)
                images.flush(), masks.flush()
                del images, masks
                (tmp / "meta.json").write_text(json.dumps(
                    {"spacing": layout.spacing, "shape": layout.shape, "volumes": meta}, indent=1))
                names_file_tmp = tmp / "names.json"
                names_file_tmp.write_text(json.dumps(names))
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(tmp, folder)
        return Split(names, np.load(folder / "images.npy", mmap_mode="r"), np.load(folder / "masks.npy", mmap_mode="r"),
                     has_mask, files)

    def _decode_into(self, pairs, images: np.ndarray, masks: np.ndarray) -> list[dict]:
        """Read, check, normalise and resample each pair into its slot of the padded arrays; two
        volumes at a time (at most that many are held besides the arrays)."""
        s, layout = self.settings, self.layout

        def one(pair):
            img, label = pair
            case = load_case(img, label, layout.spacing, s.volume_normalization, s.ct_window)
            return case

        meta = []
        with ThreadPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as ex:
            for i, case in enumerate(ex.map(one, pairs)):
                geo = self.geometry(pairs[i][0])
                if tuple(case.image.shape) != geo.resampled:  # the header and the voxels disagree
                    raise DsalError(f"{pairs[i][0]}: its voxels are {case.image.shape} after resampling but its "
                                    f"header says {geo.resampled}; re-export the file")
                slot = np.zeros((*layout.shape, 1), STORE_DTYPE)
                slot[geo.box] = case.image[..., None]
                images[i] = slot
                slot = np.zeros((*layout.shape, 1), np.uint8)
                if case.label is not None:
                    slot[geo.box] = case.label[..., None]
                masks[i] = slot
                meta.append(dict(file=str(pairs[i][0]), label=None if pairs[i][1] is None else str(pairs[i][1]),
                                 shape=geo.shape, source_spacing=case.source.spacing, resampled=geo.resampled,
                                 offset=geo.offset, affine=np.asarray(case.source.affine).tolist()))
        return meta

    def decode(self, pairs) -> tuple[np.ndarray, np.ndarray]:
        """(images, masks) of a few `(image, label)` pairs in memory, on the run's padded grid exactly as
        `load_split` caches them (float16 [n,D,H,W,1], uint8 {0,1}): what `dsal plan` times and probes on,
        without caching a split."""
        shape = (len(pairs), *self.layout.shape, 1)
        images, masks = np.zeros(shape, STORE_DTYPE), np.zeros(shape, np.uint8)
        self._decode_into(pairs, images, masks)
        return images, masks

    # ------------------------------------------------------------------ normalizer
    def fit_normalizer(self, images=None) -> VolumeNormalizer:
        """The run's normalizer (nothing to fit: each volume was normalised when cached)."""
        s = self.settings
        window = tuple(s.ct_window) if s.volume_normalization == "ct" else ()
        return VolumeNormalizer(s.volume_normalization, window, tuple(self.layout.spacing), self.patch_size)

    def load_normalizer(self, path: Path) -> VolumeNormalizer:
        return VolumeNormalizer.load(path)

    # ------------------------------------------------------------------ streams
    def steps_per_epoch(self, n_volumes: int, shape=None) -> int:
        """`STEPS_PER_EPOCH`, or (0) one expected pass over the volumes: each volume gives
        ceil(grid voxels / patch voxels) patches, `BATCH_SIZE` patches a step, at least one step.
        (Hippocampus, 48x64x48 grid, 32x48x32 patches: 3 patches a volume; 10 volumes at batch 2:
        15 steps.) It grows with the labelled set, as a 2D epoch is one pass over its images."""
        if self.settings.steps_per_epoch:
            return int(self.settings.steps_per_epoch)
        grid = self.layout.shape if shape is None else tuple(shape)
        per_volume = math.ceil(np.prod(grid, dtype=np.float64) / np.prod(self.patch_size, dtype=np.float64))
        return max(1, math.ceil(n_volumes * per_volume / self.cfg.batch_size))

    def _patch_stream(self, draw: PatchDraw, forced: int, seed: int, steps: int | None):
        """Batches of `draw`n patches; the last `forced` of each batch centred on foreground."""
        import tensorflow as tf

        b = self.cfg.batch_size
        randoms = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
        slots = tf.data.Dataset.range(b).repeat()
        ds = tf.data.Dataset.zip(randoms, slots)
        if steps is not None:
            ds = ds.take(steps * b)
        x_dtype = tf.as_dtype(draw.images.dtype)
        size = (*self.patch_size, 1)

        def load(r, slot):
            x, y = tf.numpy_function(draw, [r, slot >= b - forced], [x_dtype, tf.uint8], stateful=False)
            x.set_shape(size)
            y.set_shape(size)
            return x, y

        return ds.map(load, num_parallel_calls=tf.data.AUTOTUNE).batch(b, drop_remainder=True)

    def train_stream(self, images, masks, normalizer, seed: int, heads=None, repeat: bool = False,
                     foreground_oversample: float = 0.0):
        """Batches `(x [B,d,h,w,1] float32, y)` of random patches of `images`/`masks` (any rows:
        arrays, memory maps, `Rows`), `foreground_oversample` of each batch centred on foreground
        (the run's FOREGROUND_OVERSAMPLE; nnU-Net uses 0.33), augmented when AUGMENT is on. Seeded:
        the same `seed` gives the same batches, each pass new ones. `repeat=False`: one epoch of
        `steps_per_epoch(len(images))` batches; True: endless (give `fit` the steps)."""
        import tensorflow as tf

        _check_normalizer(normalizer)
        draw = PatchDraw(images, masks, self.patch_size, seed, self.cfg.augment, rotation_plane(self.layout.spacing))
        forced = forced_foreground(self.cfg.batch_size, foreground_oversample)
        ds = self._patch_stream(draw, forced, seed, None if repeat else self.steps_per_epoch(len(images)))

        def finish(x, y):
            y = tf.cast(y, tf.float32)
            return normalizer(x), ({h: y for h in heads} if heads else y)

        return steady(ds.map(finish, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE))

    def image_stream(self, images, normalizer, seed: int, repeat: bool = True):
        """Random augmented patches of volumes alone (the unlabelled pool), `[B,d,h,w,1]`."""
        import tensorflow as tf

        _check_normalizer(normalizer)
        draw = PatchDraw(images, None, self.patch_size, seed, self.cfg.augment, rotation_plane(self.layout.spacing))
        ds = self._patch_stream(draw, 0, seed, None if repeat else self.steps_per_epoch(len(images)))
        ds = ds.map(lambda x, y: normalizer(x), num_parallel_calls=tf.data.AUTOTUNE)
        return steady(ds.prefetch(tf.data.AUTOTUNE))

    def eval_stream(self, images, masks, normalizer, heads=None):
        """`(x [1,D,H,W,1], y)` whole padded volumes in order: Keras' validation Dice is then the
        mean per-volume Dice of whole-volume passes (the model must take any grid)."""
        import tensorflow as tf

        _check_normalizer(normalizer)

        def fetch(i):
            return np.asarray(images[int(i)]), np.asarray(masks[int(i)], np.uint8)

        def load(i):
            x, y = tf.numpy_function(fetch, [i], [tf.as_dtype(images.dtype), tf.uint8], stateful=False)
            x.set_shape(images.shape[1:])
            y.set_shape(images.shape[1:])
            return x, y

        def finish(x, y):
            y = tf.cast(y, tf.float32)
            return normalizer(x), ({h: y for h in heads} if heads else y)

        # two whole volumes in flight, not one per core: with tf.data's autotuner off (`steady`) AUTOTUNE
        # means a thread per core, and a many-core machine would hold that many large CT volumes at once
        ds = tf.data.Dataset.range(len(images)).map(load, num_parallel_calls=2)
        return steady(ds.batch(EVAL_VOLUMES).map(finish).prefetch(tf.data.AUTOTUNE))

    # ------------------------------------------------------------------ inference
    def inferer(self, model) -> SlidingInferer:
        """The model's contract over whole volumes, through sliding windows of PATCH_SIZE."""
        return SlidingInferer(model, self.patch_size, batch_size=self.cfg.batch_size)

    def score_pool(self, query, model, images, masks, normalizer, progress: bool = False,
                   with_features=None) -> dict[str, np.ndarray]:
        """`query.score_batch` over `images` (`Rows` of the pool), one volume a call cropped to its
        box inside the padding, through sliding windows of every head: per-volume arrays (reduced
        over the volume's own voxels), and `pred` (uint8
        [N,D,H,W,1], kept on disk). Eager (the windows are a Python loop); the model's forward
        pass on a window batch is one traced graph."""
        import tensorflow as tf
        from tqdm.auto import tqdm

        _check_normalizer(normalizer)
        if len(images) == 0:
            return {}
        infer = self.inferer(with_features(model) if with_features is not None else model)
        parts: dict[str, list] = {}
        pred = None
        for i in tqdm(range(len(images)), desc=f"scoring ({query.name})", disable=not progress, leave=False):
            # one volume a call, cropped to its box inside the padding (the windows cover only that box):
            # a per-volume mean is then over the volume's own voxels, not over a padded grid that would
            # shrink the scores of small volumes by their share of the grid
            volume = np.asarray(images[i])
            low, high = content_box(volume)
            box = tuple(slice(int(a), int(b)) for a, b in zip(low, high))
            x = normalizer(volume[box][None])
            y = tf.cast(np.asarray(masks[i])[box][None], tf.float32)
            out = {k: np.asarray(v) for k, v in query.score_batch(infer, x, y).items()}
            mask = out.pop("pred")
            if pred is None:
                pred = disk_array((len(images), *volume.shape), mask.dtype)
            pred[i] = 0
            pred[i][box] = mask[0]
            for k, v in out.items():
                parts.setdefault(k, []).append(v)
        return {**{k: np.concatenate(v) for k, v in parts.items()}, "pred": pred}

    def predict(self, model, images, normalizer) -> np.ndarray:
        """Main-head probabilities of whole volumes, [N,D,H,W,1] float32 (on disk)."""
        _check_normalizer(normalizer)
        infer = self.inferer(model)
        out = disk_array((len(images), *images.shape[1:4], 1), np.float32)
        for i in range(len(images)):
            out[i] = infer.volume(normalizer.numpy(images[i]))["main"]
        return out

    # ------------------------------------------------------------------ masks on disk
    def to_original(self, array: np.ndarray, path: Path, order: int) -> np.ndarray:
        """A map on the padded grid (`[D,H,W]` or `[D,H,W,1]`) cropped to the volume of `path` and
        resampled to its file's grid: order 1 for probabilities (threshold after), 0 for masks."""
        geo = self.geometry(path)
        a = np.asarray(array)
        a = a.reshape(a.shape[:3])[geo.box]
        return resize(a.astype(np.float32) if order else a, geo.shape, order)

    def evaluate(self, model, split: Split, normalizer) -> tuple[pd.DataFrame, np.ndarray]:
        """Per-volume test metrics on each file's own grid, surface distances in mm (its header's
        spacing), and the predicted masks on the padded grid (for overlays)."""
        from .metrics import volume_metrics

        _check_normalizer(normalizer)
        infer = self.inferer(model)
        rows, pred = [], np.zeros(split.masks.shape, np.uint8)
        for i, path in enumerate(split.files):
            prob = infer.volume(normalizer.numpy(split.images[i]))["main"]
            pred[i] = (np.asarray(prob).reshape(pred.shape[1:]) > THRESHOLD)
            mine = (self.to_original(prob, path, 1) > THRESHOLD).astype(np.uint8)
            truth = self.to_original(split.masks[i], path, 0)
            rows.append({"name": split.names[i], **volume_metrics(truth, mine, read_header(path).spacing)})
        return pd.DataFrame(rows), pred

    def overlay_rows(self, split: Split, pred: np.ndarray, n: int) -> list[list[np.ndarray]]:
        """`test.py`'s picture of the first `n` volumes of `split` and their predicted masks `pred` (padded grid):
        one row a volume, its three planes through the ground truth's largest cross-sections, each volume cropped
        to its own box (`overlays.volume_tiles`)."""
        from .overlays import volume_tiles

        rows = []
        for i in range(min(n, len(split.names))):
            box = (*self.geometry(split.files[i]).box, 0)
            rows.append(volume_tiles(split.images[i][box], split.masks[i][box], pred[i][box], self.layout.spacing))
        return rows

    def masks_at_original_size(self, model, images, files: list[Path], normalizer) -> list[np.ndarray]:
        """The model's {0,1} uint8 masks `[D,H,W]` of padded `images`, each on its file's grid."""
        _check_normalizer(normalizer)
        infer = self.inferer(model)
        return [(self.to_original(infer.volume(normalizer.numpy(images[i]))["main"], f, 1) > THRESHOLD)
                .astype(np.uint8) for i, f in enumerate(files)]

    def write_masks(self, folder: Path, idx: np.ndarray, masks: np.ndarray, split: Split) -> None:
        """Masks of items `idx` of `split` as `<name>.nii.gz` on their volume's grid, with its affine
        and header (ITK-SNAP and 3D Slicer overlay them), for a person to inspect or delete; the
        folder appears complete or not at all."""
        with atomic_dir(folder) as tmp:
            for i, mask in zip(idx, masks):
                path = split.files[i]
                back = self.to_original(np.asarray(mask).astype(np.uint8), path, 0)
                self.write_mask_file(self.mask_file(tmp, split.names[i]), back, path)

    def mask_file(self, folder: Path, name: str) -> Path:
        return folder / f"{name}{self.mask_suffix}"

    # ------------------------------------------------------------------ a person's masks (ORACLE = "files")
    label_studio_tasks = False  # Label Studio's tasks are 2D images; a volume is drawn whole in a 3D viewer
    mask_pattern = re.compile(r"(?P<stem>.+?)(_segmentation)?\.nii(\.gz)?", re.IGNORECASE)  # a returned mask's name
    mask_names = "<image>.nii.gz or <image>_segmentation.nii.gz"
    annotation_help = ("Open each volume with its prelabels/<image>.nii.gz in ITK-SNAP or 3D Slicer, correct the "
                       "whole volume and save the mask as <image>.nii.gz on the image's grid (same shape and "
                       "affine), values {0,1} or {0,255}.")

    def write_mask_file(self, path: Path, mask: np.ndarray, image: Path) -> None:
        """A {0,1} mask already on the grid of `image` as NIfTI with its affine and header (a request's prelabel)."""
        write_mask(path, mask, read_header(image))

    def check_mask(self, mask: Path, image: Path) -> None:
        """A person's mask for `image`: reads as NIfTI, 3D, the image's shape and affine, binary; else one
        line naming it and the fix."""
        read_label(mask, read_header(image))

    def mask_targets(self, gt: Path, found: dict[str, Path]) -> dict[str, Path]:
        """Where each returned mask ({image name: file}) goes in `gt`: the dataset's naming rule (MASK_NAMING,
        or the first label of train, val, test), keeping the file's own extension (.nii.gz or .nii)."""
        naming = self.cfg.mask_naming
        if naming == "auto":
            labels = [p for s in SPLITS for p in list_volumes(Path(self.cfg.data_path) / f"{s}GT")]
            naming = "isic" if labels and volume_stem(labels[0]).endswith("_segmentation") else "same"
        suffix = "_segmentation" if naming == "isic" else ""
        return {stem: gt / f"{stem}{suffix}{'.nii' if p.name.lower().endswith('.nii') else '.nii.gz'}"
                for stem, p in found.items()}

    def thumbnails(self, images, side: int = THUMBNAIL_SIDE) -> np.ndarray:
        """[N, side**3] float32: each volume area-averaged to side x side x side (a cold start's features)."""
        return np.stack([area_downsample(np.asarray(images[i], np.float32)[..., 0], side).reshape(-1)
                         for i in range(len(images))])


__all__ = ["Geometry", "Layout", "PatchDraw", "SlidingInferer", "VolumeNormalizer", "VolumeSettings", "VolumeSpace",
           "area_downsample", "content_box", "crop_item", "predict_file", "rotation_plane", "stored_boxes",
           "write_probabilities"]
