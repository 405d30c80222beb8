"""Patches of volumes: sliding-window inference with Gaussian blending, and training patches drawn
with a foreground share (both as nnU-Net does).

Layout: a volume is `[D,H,W,C]` (or `[D,H,W]`, one channel); a batch of patches is `[N,d,h,w,C]`;
labels are `[D,H,W]` / `[N,d,h,w,1]` in {0,1}. Heads come back as `[D,H,W]` float32 maps, so
the DSAL agreement, entropy or MC scores reduce over a whole volume like over an image.

Windows overlap by `overlap` (0.5) and are spread evenly so the last one ends on the border; a
volume smaller than the patch is padded with zeros (the z-scored mean) and cropped back. Each
window's probabilities are weighted by a Gaussian (sigma = patch / 8), so the centre of a patch,
which saw the most context, counts most where windows overlap.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from .data import forced_foreground

OVERLAP = 0.5
SIGMA_SCALE = 1.0 / 8
FOREGROUND_OVERSAMPLE = 0.33
MAX_FOREGROUND_VOXELS = 10_000  # foreground voxels kept per case to centre patches on (nnU-Net's cap)


def gaussian_importance(patch_size: Sequence[int], sigma_scale: float = SIGMA_SCALE) -> np.ndarray:
    """Blending weights `[d,h,w]` float32: a Gaussian centred on the patch, max 1, no zeros (the
    border weight is raised to the smallest positive one, so every voxel is covered)."""
    grids = []
    for n in patch_size:
        x = np.arange(n, dtype=np.float64) - (n - 1) / 2
        grids.append(np.exp(-0.5 * (x / max(n * sigma_scale, 1e-6)) ** 2))
    w = grids[0]
    for g in grids[1:]:
        w = np.multiply.outer(w, g)
    w = w / w.max()
    w[w == 0] = w[w > 0].min()
    return w.astype(np.float32)


def window_starts(size: int, patch: int, overlap: float = OVERLAP) -> list[int]:
    """Start indices of the windows along one axis: steps of at most `patch * (1 - overlap)`,
    spread evenly from 0 to `size - patch` (nnU-Net's rule). `size <= patch`: one window at 0."""
    if size <= patch:
        return [0]
    step = max(1.0, patch * (1.0 - overlap))
    n = math.ceil((size - patch) / step) + 1
    actual = (size - patch) / (n - 1)
    return [int(round(actual * i)) for i in range(n)]


def _as_channels(volume: np.ndarray) -> np.ndarray:
    v = np.asarray(volume, np.float32)
    return v[..., None] if v.ndim == 3 else v


def _pad_to(volume: np.ndarray, patch_size: Sequence[int]) -> tuple[np.ndarray, tuple[slice, ...]]:
    """Zero-pad the spatial axes up to the patch size (centred); the slices crop the padding away."""
    pads, crop = [], []
    for n, p in zip(volume.shape[:3], patch_size, strict=True):
        extra = max(0, p - n)
        pads.append((extra // 2, extra - extra // 2))
        crop.append(slice(extra // 2, extra // 2 + n))
    pads += [(0, 0)] * (volume.ndim - 3)
    return np.pad(volume, pads), tuple(crop)


def _call(model, batch: np.ndarray, training: bool) -> dict[str, np.ndarray]:
    out = model(batch, training=training) if training else model(batch)
    if not isinstance(out, dict):
        out = {"main": out}
    return {k: np.asarray(v, np.float32) for k, v in out.items()}


def sliding_window_predict(
    model: Callable,
    volume: np.ndarray,
    patch_size: Sequence[int],
    overlap: float = OVERLAP,
    heads: Sequence[str] = ("main",),
    batch_size: int = 2,
    sigma_scale: float = SIGMA_SCALE,
    training: bool = False,
) -> dict[str, np.ndarray]:
    """Each head's probabilities `[D,H,W]` over a whole volume `[D,H,W,C]`, blended over windows.

    `model` maps `[N,d,h,w,C]` to a dict of `[N,d,h,w,1]` maps (the U-Net's heads) or to one map
    (taken as `main`). Ask for `heads=HEADS` to get the side heads too, for the DSAL agreement
    per volume; `training=True` gives an MC-dropout pass. Windows go `batch_size` at a time.
    """
    out = sliding_window_outputs(model, volume, patch_size, overlap, batch_size, sigma_scale, training)
    missing = [k for k in heads if k not in out]
    if missing:
        raise KeyError(f"the model has no head {missing[0]!r}; it has {sorted(out)}")
    return {k: out[k] for k in heads}


def sliding_window_outputs(
    model: Callable,
    volume: np.ndarray,
    patch_size: Sequence[int],
    overlap: float = OVERLAP,
    batch_size: int = 2,
    sigma_scale: float = SIGMA_SCALE,
    training: bool = False,
) -> dict[str, np.ndarray]:
    """Every output of `model` over a whole volume `[D,H,W,C]`: spatial outputs (`[n,d,h,w,1]`
    per window, the heads) Gaussian-blended into `[D,H,W]` maps as `sliding_window_predict` does,
    and vector outputs (`[n,C]` per window, e.g. the bottleneck `features` of diverse selection)
    averaged over the windows. The same windows, weights and crop as `sliding_window_predict`."""
    vol, crop = _pad_to(_as_channels(volume), patch_size)
    shape = vol.shape[:3]
    weight = gaussian_importance(patch_size, sigma_scale)
    starts = [(z, y, x) for z in window_starts(shape[0], patch_size[0], overlap)
              for y in window_starts(shape[1], patch_size[1], overlap)
              for x in window_starts(shape[2], patch_size[2], overlap)]
    maps: dict[str, np.ndarray] = {}
    vectors: dict[str, np.ndarray] = {}
    norm = np.zeros(shape, np.float32)
    d, h, w = patch_size
    for i in range(0, len(starts), batch_size):
        chunk = starts[i:i + batch_size]
        out = _call(model, np.stack([vol[z:z + d, y:y + h, x:x + w] for z, y, x in chunk]), training)
        for j, (z, y, x) in enumerate(chunk):
            region = (slice(z, z + d), slice(y, y + h), slice(x, x + w))
            norm[region] += weight
            for k, v in out.items():
                if v.ndim == 2:
                    vectors[k] = vectors.get(k, 0.0) + v[j] / len(starts)
                else:
                    maps.setdefault(k, np.zeros(shape, np.float32))[region] += weight * v[j].reshape(d, h, w)
    return {**{k: (v / norm)[crop] for k, v in maps.items()},
            **{k: np.asarray(v, np.float32) for k, v in vectors.items()}}


# --- training patches ---------------------------------------------------------------------------

def crop_patch(array: np.ndarray, start: Sequence[int], patch_size: Sequence[int]) -> np.ndarray:
    """The `patch_size` box at `start` (may lie partly outside: those voxels are zero)."""
    out = np.zeros((*patch_size, *array.shape[3:]), array.dtype)
    src, dst = [], []
    for s, p, n in zip(start, patch_size, array.shape[:3], strict=True):
        lo, hi = max(s, 0), min(s + p, n)
        src.append(slice(lo, max(lo, hi)))
        dst.append(slice(lo - s, lo - s + max(0, hi - lo)))
    out[tuple(dst)] = array[tuple(src)]
    return out


def patch_start(shape: Sequence[int], patch_size: Sequence[int], rng: np.random.Generator,
                centre: Sequence[int] | None = None) -> tuple[int, ...]:
    """A random box start: uniform over the boxes inside the volume (along an axis shorter than
    the patch: over the boxes holding the whole axis); with `centre`, the box around that voxel,
    shifted inside the volume where it fits."""
    start = []
    for a, (n, p) in enumerate(zip(shape, patch_size, strict=True)):
        low, high = min(0, n - p), max(0, n - p)
        if centre is None:
            start.append(int(rng.integers(low, high + 1)))
        else:
            start.append(int(np.clip(centre[a] - p // 2, low, high)))
    return tuple(start)


class PatchSampler:
    """Seeded training patches from whole cases: each batch's last `forced_foreground(batch,
    share)` patches are centred on a random foreground voxel (of a random case with foreground),
    the others drawn uniformly, as nnU-Net's `oversample_foreground_percent` (0.33)."""

    def __init__(self, images: Sequence[np.ndarray], labels: Sequence[np.ndarray], patch_size: Sequence[int],
                 foreground: float = FOREGROUND_OVERSAMPLE, seed: int = 0):
        if len(images) != len(labels) or not images:
            raise ValueError("PatchSampler needs as many labels as images, at least one")
        self.images = [_as_channels(x) for x in images]
        self.labels = [np.asarray(y).reshape(np.shape(x)[:3]) for x, y in zip(images, labels, strict=True)]
        self.patch_size = tuple(int(p) for p in patch_size)
        self.foreground = float(foreground)
        self.rng = np.random.default_rng(seed)
        self.fg_voxels = []
        for y in self.labels:
            where = np.argwhere(y > 0)
            if len(where) > MAX_FOREGROUND_VOXELS:
                where = where[self.rng.choice(len(where), MAX_FOREGROUND_VOXELS, replace=False)]
            self.fg_voxels.append(where)
        self.with_fg = [i for i, v in enumerate(self.fg_voxels) if len(v)]

    def patch(self, force_fg: bool) -> tuple[np.ndarray, np.ndarray]:
        """One (image `[d,h,w,C]`, label `[d,h,w,1]`) patch; `force_fg` centres it on foreground."""
        if force_fg and self.with_fg:
            case = self.with_fg[int(self.rng.integers(len(self.with_fg)))]
            voxels = self.fg_voxels[case]
            centre = voxels[int(self.rng.integers(len(voxels)))]
        else:
            case, centre = int(self.rng.integers(len(self.images))), None
        start = patch_start(self.labels[case].shape, self.patch_size, self.rng, centre)
        return (crop_patch(self.images[case], start, self.patch_size),
                crop_patch(self.labels[case], start, self.patch_size)[..., None].astype(np.float32))

    def batch(self, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """`[N,d,h,w,C]` images and `[N,d,h,w,1]` labels; the last `forced_foreground` are forced."""
        forced = forced_foreground(batch_size, self.foreground)
        pairs = [self.patch(i >= batch_size - forced) for i in range(batch_size)]
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])

    def dataset(self, batch_size: int, heads: Sequence[str] = ("main", "side_1", "side_2")):
        """An endless `tf.data` stream of `(image, {head: label})` batches for `model.fit`
        (give `steps_per_epoch`); the same seed gives the same patches."""
        import tensorflow as tf

        d, h, w = self.patch_size
        c = self.images[0].shape[-1]

        def gen():
            while True:
                x, y = self.batch(batch_size)
                yield x, {k: y for k in heads}

        spec_y = tf.TensorSpec((batch_size, d, h, w, 1), tf.float32)
        return tf.data.Dataset.from_generator(
            gen, output_signature=(tf.TensorSpec((batch_size, d, h, w, c), tf.float32), {k: spec_y for k in heads}))
