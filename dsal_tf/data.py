"""The orgData layout: discovery, validation, decoding, caching and `tf.data` pipelines.

Arrays are NHWC uint8: images [N,H,W,C] (C = 3 for RGB, 1 for gray) and masks [N,H,W,1] in
{0, 1}. Decoded pools are cached as `.npz` keyed by a hash of the file list (names, sizes,
mtimes) and the preprocessing settings, so a changed file or setting never reuses a stale cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from .config import Config
from .errors import DsalError

SPLITS = ("train", "val", "test")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
CACHE_VERSION = 1


@dataclass
class Split:
    """One decoded split: file stems, uint8 images [N,H,W,C] and {0,1} masks [N,H,W,1]."""

    names: list[str]
    images: np.ndarray
    masks: np.ndarray

    def __len__(self) -> int:
        return len(self.names)


def _mask_candidates(img: Path, gt_dir: Path, naming: str) -> list[Path]:
    isic = gt_dir / f"{img.stem}_segmentation.png"
    same = [gt_dir / img.name, gt_dir / f"{img.stem}.png"]
    if naming == "isic":
        return [isic]
    if naming == "same":
        return same
    return [isic, *same]


def find_pairs(data_path: str | Path, split: str, naming: str = "auto") -> list[tuple[Path, Path]]:
    """(image, mask) paths of a split, sorted by name. Raises on an empty folder or a missing mask."""
    root = Path(data_path)
    img_dir, gt_dir = root / f"{split}Img", root / f"{split}GT"
    if not img_dir.is_dir():
        raise DsalError(f"folder {img_dir} not found; put the {split} images there (see README, Data)")
    images = sorted(p for p in img_dir.iterdir() if p.suffix.lower() in IMAGE_EXTS and not p.name.startswith("."))
    if not images:
        raise DsalError(f"folder {img_dir} has no images ({', '.join(IMAGE_EXTS)}); add the {split} images")
    if naming == "auto":  # decide once from the first image, then hold every file to it
        found = [p for p in _mask_candidates(images[0], gt_dir, "auto") if p.is_file()]
        naming = "isic" if found and found[0].name.endswith("_segmentation.png") else "same"
    pairs = []
    for img in images:
        candidates = _mask_candidates(img, gt_dir, naming)
        mask = next((p for p in candidates if p.is_file()), None)
        if mask is None:
            raise DsalError(
                f"missing mask for {img}: expected {candidates[0]}; add it or remove the image"
            )
        pairs.append((img, mask))
    return pairs


def read_pair(img_path: Path, mask_path: Path, rows: int, cols: int, color: str) -> tuple[np.ndarray, np.ndarray]:
    """Decode, check and resize one pair: area interpolation for the image, nearest for the mask."""
    for path in (img_path, mask_path):
        if os.path.getsize(path) == 0:
            raise DsalError(f"{path} is empty (0 bytes); replace or remove it")
    flag = cv2.IMREAD_COLOR if color == "rgb" else cv2.IMREAD_GRAYSCALE
    img = cv2.imread(str(img_path), flag)
    if img is None:
        raise DsalError(f"cannot decode image {img_path} (corrupt or not an image); replace or remove it")
    mask = cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise DsalError(f"cannot decode mask {mask_path} (corrupt or not an image); replace or remove it")
    if img.shape[:2] != mask.shape[:2]:
        raise DsalError(
            f"size mismatch: {img_path} is {img.shape[1]}x{img.shape[0]} but its mask {mask_path} "
            f"is {mask.shape[1]}x{mask.shape[0]}; re-export the mask at the image size"
        )
    values = np.unique(mask)
    if len(values) > 2 or (len(values) == 2 and values[0] != 0):
        raise DsalError(
            f"mask {mask_path} is not binary ({len(values)} grey levels, e.g. {values[:4].tolist()}); "
            "save it as a 0/255 PNG"
        )
    if color == "rgb":
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    img = cv2.resize(img, (cols, rows), interpolation=cv2.INTER_AREA)
    mask = cv2.resize(mask, (cols, rows), interpolation=cv2.INTER_NEAREST)
    img = img.reshape(rows, cols, -1)
    return img.astype(np.uint8), (mask > 0).astype(np.uint8)[..., None]


def _cache_key(pairs, cfg: Config, split: str) -> str:
    files = [(str(p), os.path.getsize(p), os.stat(p).st_mtime_ns) for pair in pairs for p in pair]
    settings = dict(v=CACHE_VERSION, split=split, rows=cfg.img_rows, cols=cfg.img_cols,
                    color=cfg.color, naming=cfg.mask_naming, files=files)
    return hashlib.sha1(json.dumps(settings).encode()).hexdigest()[:20]


def load_split(cfg: Config, split: str, use_cache: bool = True) -> Split:
    """Decode one split (cached). The train split is truncated to `pool_size` images if set."""
    pairs = find_pairs(cfg.data_path, split, cfg.mask_naming)
    if split == "train" and cfg.pool_size:
        pairs = pairs[: cfg.pool_size]
    cache_file = cfg.cache_path / f"{split}-{_cache_key(pairs, cfg, split)}.npz"
    names = [img.stem for img, _ in pairs]
    if use_cache and cache_file.is_file():
        with np.load(cache_file) as z:
            if list(z["names"]) == names:
                return Split(names, z["images"], z["masks"])
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as ex:
        decoded = list(ex.map(lambda p: read_pair(*p, cfg.img_rows, cfg.img_cols, cfg.color), pairs))
    split_data = Split(names, np.stack([d[0] for d in decoded]), np.stack([d[1] for d in decoded]))
    if use_cache:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(".tmp.npz")
        np.savez(tmp, names=np.array(names), images=split_data.images, masks=split_data.masks)
        os.replace(tmp, cache_file)
    return split_data


def load_splits(cfg: Config, splits=SPLITS) -> dict[str, Split]:
    return {s: load_split(cfg, s) for s in splits}


# ------------------------------------------------------------------ normalization
@dataclass(frozen=True)
class Normalizer:
    """uint8 -> float32: x/255, then z-score with per-channel statistics of the training pool."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def fit(cls, images: np.ndarray, mode: str) -> Normalizer:
        channels = images.shape[-1]
        if mode == "unit":
            return cls((0.0,) * channels, (1.0,) * channels)
        x = images.reshape(-1, channels).astype(np.float64) / 255.0
        return cls(tuple(x.mean(0).tolist()), tuple(np.maximum(x.std(0), 1e-6).tolist()))

    def __call__(self, x):
        import tensorflow as tf

        x = tf.cast(x, tf.float32) / 255.0
        return (x - tf.constant(self.mean, tf.float32)) / tf.constant(self.std, tf.float32)

    def numpy(self, x: np.ndarray) -> np.ndarray:
        return ((x.astype(np.float32) / 255.0 - np.float32(self.mean)) / np.float32(self.std)).astype(np.float32)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps({"mean": self.mean, "std": self.std}))

    @classmethod
    def load(cls, path: Path) -> Normalizer:
        d = json.loads(path.read_text())
        return cls(tuple(d["mean"]), tuple(d["std"]))


# ------------------------------------------------------------------ tf.data
def _augment(image, mask, seed, square: bool):
    """Random flips (and 90-degree rotations for square inputs), identical for image and mask."""
    import tensorflow as tf

    both = tf.concat([tf.cast(image, tf.float32), tf.cast(mask, tf.float32)], axis=-1)
    both = tf.image.stateless_random_flip_left_right(both, seed)
    both = tf.image.stateless_random_flip_up_down(both, seed + 1)
    if square:
        k = tf.random.stateless_uniform([], seed + 2, 0, 4, dtype=tf.int32)
        both = tf.image.rot90(both, k)
    return both[..., :-1], both[..., -1:]


def make_dataset(
    images: np.ndarray,
    masks: np.ndarray,
    normalizer: Normalizer,
    batch_size: int,
    shuffle: bool = False,
    augment: bool = False,
    seed: int = 0,
    heads: tuple[str, ...] | None = None,
    repeat: bool = False,
):
    """Batched, prefetched `(x, y)`; with `heads`, y is `{head: mask}` for a multi-output fit."""
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((images, masks))
    if shuffle:
        ds = ds.shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    if augment:
        square = images.shape[1] == images.shape[2]
        seeds = tf.data.Dataset.random(seed=seed).batch(2)
        ds = tf.data.Dataset.zip((ds, seeds)).map(
            lambda pair, s: _augment(pair[0], pair[1], s, square), num_parallel_calls=tf.data.AUTOTUNE
        )

    def finish(x, y):
        x = normalizer(x)
        y = tf.cast(y, tf.float32)
        return x, ({h: y for h in heads} if heads else y)

    return ds.batch(batch_size).map(finish, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
