"""The orgData layout: discovery, validation, decoding, caching and `tf.data` pipelines.

Arrays are NHWC uint8: images [N,H,W,C] (C = 3 for RGB, 1 for gray) and masks [N,H,W,1] in
{0, 1}. Decoded pools are cached as memory-mapped `.npy` files keyed by a hash of the file list
(names, sizes, mtimes) and the preprocessing settings, so a changed file or setting never reuses a
stale cache and a pool larger than memory is never fully resident.
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
from .folders import IMAGE_EXTS, SPLITS, list_images  # noqa: F401 (re-exported: data.SPLITS, data.list_images)

CACHE_VERSION = 2


@dataclass
class Split:
    """One decoded split: file stems, uint8 images [N,H,W,C] and {0,1} masks [N,H,W,1].

    `has_mask[i]` is False for a pool image nobody has drawn yet (`ORACLE = "files"`); its mask
    row is all zero and means nothing. `files` are the image paths on disk."""

    names: list[str]
    images: np.ndarray
    masks: np.ndarray
    has_mask: np.ndarray | None = None
    files: list[Path] | None = None

    def __post_init__(self):
        if self.has_mask is None:
            self.has_mask = np.ones(len(self.names), bool)

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


def detect_naming(data_path: str | Path, naming: str = "auto") -> str:
    """`isic` (X.jpg -> X_segmentation.png) or `same` (X.png -> X.png), decided from the first image
    that has a mask (train, then val, then test), so a pool without masks still gets the dataset's rule."""
    if naming != "auto":
        return naming
    root = Path(data_path)
    for split in SPLITS:
        gt_dir = root / f"{split}GT"
        for img in list_images(root / f"{split}Img"):
            found = [p for p in _mask_candidates(img, gt_dir, "auto") if p.is_file()]
            if found:
                return "isic" if found[0].name.endswith("_segmentation.png") else "same"
    return "same"


def mask_name(stem: str, naming: str) -> str:
    """The file name a mask of image `stem` gets under the dataset's naming rule."""
    return f"{stem}_segmentation.png" if naming == "isic" else f"{stem}.png"


def find_pairs(
    data_path: str | Path, split: str, naming: str = "auto", require_masks: bool = True
) -> list[tuple[Path, Path | None]]:
    """(image, mask) paths of a split, sorted by name. Raises on an empty folder, and on a missing
    mask unless `require_masks` is False (an unlabelled pool): then the mask path is None."""
    root = Path(data_path)
    img_dir, gt_dir = root / f"{split}Img", root / f"{split}GT"
    if not img_dir.is_dir():
        raise DsalError(f"folder {img_dir} not found; put the {split} images there (see README, Data)")
    images = list_images(img_dir)
    if not images:
        raise DsalError(f"folder {img_dir} has no images ({', '.join(IMAGE_EXTS)}); add the {split} images")
    naming = detect_naming(root, naming)  # decided once, then every file is held to it
    pairs = []
    for img in images:
        candidates = _mask_candidates(img, gt_dir, naming)
        mask = next((p for p in candidates if p.is_file()), None)
        if mask is None and require_masks:
            raise DsalError(
                f"missing mask for {img}: expected {candidates[0]}; add it or remove the image"
            )
        pairs.append((img, mask))
    return pairs


def read_image(path: Path, color: str) -> np.ndarray:
    """Decode one image at its original size: [H,W,3] RGB or [H,W] gray, uint8; one-line error if bad."""
    if os.path.getsize(path) == 0:
        raise DsalError(f"{path} is empty (0 bytes); replace or remove it")
    img = cv2.imread(str(path), cv2.IMREAD_COLOR if color == "rgb" else cv2.IMREAD_GRAYSCALE)
    if img is None:
        raise DsalError(f"cannot decode image {path} (corrupt or not an image); replace or remove it")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB) if color == "rgb" else img


LOW, HIGH = 32, 224  # grey levels at or below LOW read as background, at or above HIGH as foreground
MID_GREY_MAX = 0.05  # a lossy mask may have at most this share of pixels strictly between the bands
PLATEAU = 0.01  # a grey level covering at least this share of the pixels is a label, not compression noise


def binarize_mask(mask: np.ndarray, path: Path) -> tuple[np.ndarray, bool]:
    """{0,1} uint8 from a decoded mask, and whether the lossy rule was needed.

    Binary masks (at most two levels, the lower one 0: 0/1, 0/255, 0/65535) map nonzero to 1.
    Masks saved lossy (e.g. as JPEG: levels clustered near 0 and 255, a few greys between) are
    thresholded at 127 (on an 8-bit scale): allowed when at most `MID_GREY_MAX` of the pixels lie
    strictly between `LOW` and `HIGH`, and no grey level covering `PLATEAU` of the image sits
    between them or shares a band with another one (a label map such as 0/1/2 or 0/128/255).
    """
    values = np.unique(mask)
    if len(values) == 1 or (len(values) == 2 and values[0] == 0):
        return (mask > 0).astype(np.uint8), False
    if mask.dtype != np.uint8:
        top = np.iinfo(mask.dtype).max if np.issubdtype(mask.dtype, np.integer) else max(float(values[-1]), 1.0)
        mask = np.clip(np.round(mask.astype(np.float64) / top * 255), 0, 255).astype(np.uint8)
    levels, counts = np.unique(mask, return_counts=True)
    mid_share = float(np.mean((mask > LOW) & (mask < HIGH)))
    plateaus = levels[counts >= PLATEAU * mask.size]
    labels = (np.any((plateaus > LOW) & (plateaus < HIGH)) or np.sum(plateaus <= LOW) > 1
              or np.sum(plateaus >= HIGH) > 1)
    if mid_share > MID_GREY_MAX or labels:
        why = "several labels" if labels else f"{mid_share:.0%} mid-grey pixels"
        raise DsalError(
            f"mask {path} is not binary ({len(values)} grey levels, {why}, e.g. {values[:4].tolist()}); "
            "save it as a 0/255 PNG"
        )
    return (mask > 127).astype(np.uint8), True


def read_mask(path: Path, shape: tuple[int, int] | None = None,
              image: Path | None = None) -> tuple[np.ndarray, bool]:
    """Decode and check one mask: ([H,W] uint8 in {0,1}, saved lossy?). `shape` (rows, cols) is the
    image's size. 8- and 16-bit, gray, colour or palette files; EXIF orientation applied like images."""
    if os.path.getsize(path) == 0:
        raise DsalError(f"{path} is empty (0 bytes); replace or remove it")
    mask = cv2.imread(str(path), cv2.IMREAD_ANYDEPTH)  # grayscale, keeping 16-bit values
    if mask is None:
        raise DsalError(f"cannot decode mask {path} (corrupt or not an image); replace or remove it")
    if shape is not None and mask.shape[:2] != tuple(shape):
        raise DsalError(
            f"size mismatch: {image or 'the image'} is {shape[1]}x{shape[0]} but its mask {path} "
            f"is {mask.shape[1]}x{mask.shape[0]}; re-export the mask at the image size"
        )
    return binarize_mask(mask, path)


def read_pair(img_path: Path, mask_path: Path | None, rows: int, cols: int,
              color: str) -> tuple[np.ndarray, np.ndarray, bool]:
    """Decode, check and resize one pair: area interpolation for the image, nearest for the mask.
    Without a mask (an unlabelled pool image) the mask is all zero. The flag: mask saved lossy."""
    img = read_image(img_path, color)
    lossy = False
    if mask_path is None:
        mask = np.zeros(img.shape[:2], np.uint8)
    else:
        mask, lossy = read_mask(mask_path, img.shape[:2], img_path)
    img = cv2.resize(img, (cols, rows), interpolation=cv2.INTER_AREA)
    mask = cv2.resize(mask, (cols, rows), interpolation=cv2.INTER_NEAREST)
    img = img.reshape(rows, cols, -1)
    return img.astype(np.uint8), (mask > 0).astype(np.uint8)[..., None], lossy


def _cache_key(pairs, cfg: Config, split: str) -> str:
    files = [(str(p), os.path.getsize(p), os.stat(p).st_mtime_ns) if p is not None else None
             for pair in pairs for p in pair]
    settings = dict(v=CACHE_VERSION, split=split, rows=cfg.img_rows, cols=cfg.img_cols,
                    color=cfg.color, naming=cfg.mask_naming, files=files)
    return hashlib.sha1(json.dumps(settings).encode()).hexdigest()[:20]


def masks_optional(cfg: Config, split: str) -> bool:
    """With a human oracle (`ORACLE = "files"`) pool images may wait for their masks."""
    return split == "train" and cfg.oracle == "files"


def _decode_into(pairs, cfg: Config, images: np.ndarray, masks: np.ndarray, chunk: int = 256) -> list[Path]:
    """Decode `pairs` into preallocated (possibly memory-mapped) arrays, `chunk` files at a time, so
    at most one chunk of decoded images is held besides the arrays; returns the masks saved lossy."""
    lossy = []
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as ex:
        for start in range(0, len(pairs), chunk):
            part = pairs[start:start + chunk]
            for j, (img, mask, was_lossy) in enumerate(
                    ex.map(lambda p: read_pair(*p, cfg.img_rows, cfg.img_cols, cfg.color), part)):
                images[start + j], masks[start + j] = img, mask
                if was_lossy:
                    lossy.append(part[j][1])
    return lossy


def load_split(cfg: Config, split: str, use_cache: bool = True) -> Split:
    """Decode one split. The train split is truncated to `pool_size` images if set.

    Cached (the default), the decoded arrays live on disk as uint8 `.npy` files under
    `CACHE_DIR/<split>-<key>/` and come back memory-mapped, read-only: the pool is never fully
    resident, the kernel pages in what a batch reads. The key hashes the file list (names, sizes,
    modification times) and the preprocessing settings, so a changed file or setting never reuses
    a stale cache; a cache folder appears only complete (written under a temporary name, renamed)."""
    pairs = find_pairs(cfg.data_path, split, cfg.mask_naming, require_masks=not masks_optional(cfg, split))
    if split == "train" and cfg.pool_size:
        pairs = pairs[: cfg.pool_size]
    names = [img.stem for img, _ in pairs]
    files = [img for img, _ in pairs]
    has_mask = np.array([m is not None for _, m in pairs], bool)
    shape = (len(pairs), cfg.img_rows, cfg.img_cols, cfg.channels)
    mask_shape = (*shape[:3], 1)
    if not use_cache:
        images, masks = np.empty(shape, np.uint8), np.empty(mask_shape, np.uint8)
        _warn_lossy(_decode_into(pairs, cfg, images, masks), split)
        return Split(names, images, masks, has_mask, files)
    folder = cfg.cache_path / f"{split}-{_cache_key(pairs, cfg, split)}"
    if not ((folder / "names.json").is_file() and json.loads((folder / "names.json").read_text()) == names):
        import shutil

        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        images = np.lib.format.open_memmap(tmp / "images.npy", "w+", np.uint8, shape)
        masks = np.lib.format.open_memmap(tmp / "masks.npy", "w+", np.uint8, mask_shape)
        lossy = _decode_into(pairs, cfg, images, masks)
        images.flush(), masks.flush()
        del images, masks
        (tmp / "names.json").write_text(json.dumps(names))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
        _warn_lossy(lossy, split)
    return Split(names, np.load(folder / "images.npy", mmap_mode="r"), np.load(folder / "masks.npy", mmap_mode="r"),
                 has_mask, files)


def _warn_lossy(lossy: list[Path], split: str) -> None:
    if lossy:
        import sys

        print(f"warning: {len(lossy)} {split} mask(s) were saved lossy (grey levels near 0 and 255, e.g. "
              f"{lossy[0]}); binarized at 127 (README, Data)", file=sys.stderr)


def load_splits(cfg: Config, splits=SPLITS) -> dict[str, Split]:
    """Decode the splits. With `ORACLE = "files"` the test split is optional (absent: left out)."""
    root = Path(cfg.data_path)
    return {s: load_split(cfg, s) for s in splits
            if not (s == "test" and cfg.oracle == "files" and not list_images(root / "testImg"))}


# ------------------------------------------------------------------ normalization
@dataclass(frozen=True)
class Normalizer:
    """uint8 -> float32: x/255, then z-score with per-channel statistics of the training pool."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def fit(cls, images: np.ndarray, mode: str, chunk: int = 512) -> Normalizer:
        """Per-channel statistics in one streaming pass over `chunk` images at a time (sums of x
        and x^2 in float64), so a memory-mapped pool is never copied as floats.

        One float64 buffer of `chunk` images is allocated once and reused: x/255 is written into
        it, summed, squared in place and summed again. (Converting, dividing and squaring into new
        arrays held three chunks at once, the previous chunk still alive while the next one was
        converted: 1.6 GiB at 192x240 RGB, the step in peak memory of pools above `chunk` images.)
        The chunks and reductions are unchanged, so the statistics are bit-identical."""
        channels = images.shape[-1]
        if mode == "unit":
            return cls((0.0,) * channels, (1.0,) * channels)
        total = np.zeros(channels)
        squares = np.zeros(channels)
        buf = np.empty((min(chunk, len(images)), *images.shape[1:]), np.float64)
        for start in range(0, len(images), chunk):
            rows = images[start:start + chunk]
            part = buf[:len(rows)]
            np.divide(rows, 255.0, out=part, dtype=np.float64)  # = rows as float64 / 255, element by element
            part = part.reshape(-1, channels)
            total += part.sum(0)
            np.square(part, out=part)
            squares += part.sum(0)
        n = max(images.size // channels, 1)
        mean = total / n
        std = np.sqrt(np.maximum(squares / n - mean**2, 0.0))
        return cls(tuple(mean.tolist()), tuple(np.maximum(std, 1e-6).tolist()))

    def __call__(self, x):
        import tensorflow as tf

        x = tf.cast(x, tf.float32) / 255.0
        return (x - tf.constant(self.mean, tf.float32)) / tf.constant(self.std, tf.float32)

    def numpy(self, x: np.ndarray) -> np.ndarray:
        return ((x.astype(np.float32) / 255.0 - np.float32(self.mean)) / np.float32(self.std)).astype(np.float32)

    def save(self, path: Path) -> None:
        from .files import atomic_write_text

        atomic_write_text(path, json.dumps({"mean": self.mean, "std": self.std}))

    @classmethod
    def load(cls, path: Path) -> Normalizer:
        d = json.loads(path.read_text())
        return cls(tuple(d["mean"]), tuple(d["std"]))


# ------------------------------------------------------------------ tf.data
def disk_array(shape: tuple[int, ...], dtype) -> np.ndarray:
    """A writable array backed by an anonymous temporary file (deleted when the array is)."""
    import tempfile

    with tempfile.TemporaryFile() as f:  # the mapping keeps the data after the file is closed
        return np.memmap(f, dtype=dtype, mode="w+", shape=shape)


class Rows:
    """Rows `index` of a (memory-mapped) array, read only when asked: a pool subset that is never
    copied whole. `make_dataset` streams it; indexing it returns a plain array."""

    def __init__(self, array: np.ndarray, index: np.ndarray):
        self.array, self.index = array, np.asarray(index, np.int64)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.index), *self.array.shape[1:])

    @property
    def dtype(self):
        return self.array.dtype

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i) -> np.ndarray:
        return np.asarray(self.array[self.index[i]])


def _gather(images, masks, indices):
    """`(image, mask)` elements for a dataset of row `indices`: in-memory arrays are gathered from
    tensors; memory maps and `Rows` are read on demand, one row per element.

    Shuffles act on the indices (`Dataset.range(n).shuffle(n)`), so a shuffle buffer holds integers,
    not images; a seeded shuffle of n indices gives the same order as the same shuffle of n images."""
    import tensorflow as tf

    if not isinstance(images, (Rows, np.memmap)) and not isinstance(masks, (Rows, np.memmap)):
        x_all, y_all = tf.convert_to_tensor(images), tf.convert_to_tensor(masks)
        return indices.map(lambda i: (tf.gather(x_all, i), tf.gather(y_all, i)))

    def fetch(i):
        return np.asarray(images[int(i)]), np.asarray(masks[int(i)])

    def load(i):
        x, y = tf.numpy_function(fetch, [i], [tf.uint8, tf.uint8])
        x.set_shape(images.shape[1:])
        y.set_shape(masks.shape[1:])
        return x, y

    return indices.map(load, num_parallel_calls=tf.data.AUTOTUNE)


def _indices(rows, shuffle: bool = False, seed: int = 0, repeat: bool = False):
    """A dataset of the row indices `rows` (an int or an index array), optionally a seeded shuffle
    that reshuffles every pass, optionally repeated."""
    import tensorflow as tf

    if isinstance(rows, (int, np.integer)):
        n, ds = int(rows), tf.data.Dataset.range(int(rows))
    else:
        rows = np.asarray(rows, np.int64)
        n, ds = len(rows), tf.data.Dataset.from_tensor_slices(rows)
    if shuffle:
        ds = ds.shuffle(n, seed=seed, reshuffle_each_iteration=True)
    return ds.repeat() if repeat else ds


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


def _flat_chunks(masks, chunk: int):
    """`(start, items [k, pixels])` over `masks` (a memory map or `Rows` stays on disk), at most `chunk` items
    and about 16M values at a time (one CT volume, or 256 images)."""
    step = max(1, min(chunk, (1 << 24) // max(1, int(np.prod(masks.shape[1:])))))
    for start in range(0, len(masks), step):
        part = np.asarray(masks[start:start + step])
        yield start, part.reshape(len(part), -1)


def foreground_rows(masks, chunk: int = 256) -> np.ndarray:
    """Indices of the masks `[N,H,W,1]` (or `[N,D,H,W,1]`) with at least one foreground pixel."""
    found = [np.zeros(0, np.int64)]
    for start, part in _flat_chunks(masks, chunk):
        found.append(np.flatnonzero(part.max(axis=1) > 0) + start)
    return np.concatenate(found)


def all_foreground_dice(masks, chunk: int = 256, sizes=None) -> float:
    """The mean per-item hard Dice of a prediction that is foreground everywhere, `(2s + 1) / (s + n + 1)`
    for an item of n pixels (or voxels) of which s are foreground (`losses.dice`): the validation Dice
    of a model collapsed to all-foreground. `sizes` [N]: n per item instead of the whole item (a volume's
    voxels inside its padding, the foreground everywhere there and nowhere else)."""
    values = [np.zeros(0)]
    for start, part in _flat_chunks(masks, chunk):
        s = (part > 0.5).sum(axis=1).astype(np.float64)
        n = part.shape[1] if sizes is None else np.asarray(sizes, np.float64)[start:start + len(part)]
        values.append((2 * s + 1) / (s + n + 1))
    return float(np.concatenate(values).mean()) if len(masks) else float("nan")


def forced_foreground(batch_size: int, share: float) -> int:
    """How many images of each batch come from the foreground images: as nnU-Net, the last
    `batch_size - round(batch_size * (1 - share))` (share 0.33: 5 of 16, 1 of 2)."""
    return batch_size - round(batch_size * (1.0 - share)) if share > 0 else 0


def _foreground_mixed(images, masks, batch_size: int, share: float, seed: int, repeat: bool):
    """`(image, mask)` elements whose every batch ends with `forced_foreground` images drawn from the
    masks with foreground, the rest from the whole set; or None when that would change nothing (no
    forced slot, or every mask, or none, has foreground). Both streams are seeded shuffles that
    reshuffle every pass; an epoch keeps the plain epoch's length, `len(images)` elements."""
    import tensorflow as tf

    k = forced_foreground(batch_size, share)
    fg = foreground_rows(masks) if k else np.zeros(0, np.int64)
    if not 0 < len(fg) < len(images):
        return None
    every = _indices(len(images), shuffle=True, seed=seed, repeat=True)
    fg_ds = _indices(fg, shuffle=True, seed=seed + 1, repeat=True)
    pattern = tf.data.Dataset.from_tensor_slices(tf.constant([0] * (batch_size - k) + [1] * k, tf.int64)).repeat()
    ds = _gather(images, masks, tf.data.Dataset.choose_from_datasets([every, fg_ds], pattern))
    return ds if repeat else ds.take(len(images)).apply(tf.data.experimental.assert_cardinality(len(images)))


def steady(ds):
    """`ds` with tf.data's autotuner off: parallel maps then use one thread per core and prefetch a
    fixed buffer, the same elements in the same order. With the autotuner on, dropping an iterator
    (Keras drops one at the end of every fit and every evaluation) stalled for about 2 s on this
    2-core machine at random; off, it never did, and a fit ran as fast (bench/results/speed.md)."""
    import tensorflow as tf

    options = tf.data.Options()
    options.autotune.enabled = False
    return ds.with_options(options)


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
    foreground_oversample: float = 0.0,
):
    """Batched, prefetched `(x, y)`; with `heads`, y is `{head: mask}` for a multi-output fit.
    `images`/`masks` may be memory-mapped or `Rows`: then they are read per element, never whole.
    `foreground_oversample` (with `shuffle`): that share of every batch is drawn from the images
    whose mask has foreground (`FOREGROUND_OVERSAMPLE`); 0 is the plain seeded shuffle."""
    import tensorflow as tf

    mixed = _foreground_mixed(images, masks, batch_size, foreground_oversample, seed, repeat) if shuffle else None
    if mixed is not None:
        ds = mixed
    else:
        ds = _gather(images, masks, _indices(len(images), shuffle=shuffle, seed=seed, repeat=repeat))
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

    return steady(ds.batch(batch_size).map(finish, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE))
