"""The space: the one object that owns everything depending on the image rank.

Chosen once from the data (`space_for`), like nnU-Net decides the dimensionality once from the
plan. The loop, the strategies and the trainers ask the space and never branch on the rank:

- the input shape, and loading a split (decoded, cached, memory-mapped);
- the training stream (augmentation included) and the evaluation stream;
- inference over items (`inferer`: the model itself in 2D, one batched call; sliding windows over
  a volume in 3D, as MONAI's `SimpleInferer` / `SlidingWindowInferer`);
- the scoring pass over the pool (`score_pool`), which calls the query strategy per batch;
- the axes that per-item values reduce over (`item_axes`: every axis but the first);
- writing masks at the original size of their files (PNG in 2D) and the thumbnails a cold start
  spreads its first picks over.

`ImageSpace` is the 2D space. A volume space (NIfTI, patches, sliding windows) goes beside it and
`space_for` picks it from the data; that is the only branch on the rank.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import cv2
import numpy as np

from .data import SPLITS, Normalizer, Rows, Split, disk_array, find_pairs, load_splits, make_dataset
from .errors import DsalError
from .files import atomic_dir
from .model import float32_copy
from .settings import Settings
from .volume_space import VolumeNormalizer, VolumeSpace
from .volumes import dataset_rank

THRESHOLD = 0.5
EVAL_BATCH_FACTOR, EVAL_BATCH_CAP = 4, 256


def eval_batch_size(cfg) -> int:
    """The batch of the passes that do not train (validation, pool scoring, test evaluation):
    `EVAL_BATCH_FACTOR` x `BATCH_SIZE`, at most `EVAL_BATCH_CAP` images (never below `BATCH_SIZE`).
    Inference keeps no activations for a backward pass, so 4x the training batch fits where training
    fits, and fewer, larger batches spend less on per-step overhead. Per-image outputs do not depend
    on the batch (checked in tests/test_speed.py); a validation Dice (the per-image mean, summed over
    batches) changes only in its float summation order."""
    return max(cfg.batch_size, min(EVAL_BATCH_FACTOR * cfg.batch_size, EVAL_BATCH_CAP))




def item_axes(x) -> list[int]:
    """Every axis of `x` but the first (the item axis): what per-image or per-volume values reduce over.

    Rank-generic: [N,H,W,C] gives [1, 2, 3], [N,D,H,W,C] gives [1, 2, 3, 4]."""
    return list(range(1, len(x.shape)))


def original_size(path: Path) -> tuple[int, int]:
    """(rows, cols) of an image file as it decodes (EXIF orientation applied, like training)."""
    img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if img is None:
        raise DsalError(f"cannot decode image {path} (corrupt or not an image); replace or remove it")
    return img.shape[:2]


def to_original(prob: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A [h,w] or [h,w,1] probability map resized (bilinear) to `shape` (rows, cols), float32."""
    prob = np.asarray(prob, np.float32).reshape(prob.shape[0], prob.shape[1])
    return cv2.resize(prob, (int(shape[1]), int(shape[0])), interpolation=cv2.INTER_LINEAR)


def predict_main(model, images, normalizer: Normalizer, batch_size: int) -> np.ndarray:
    """Main-head probabilities [N,H,W,1] in one batched pass."""
    ds = make_dataset(images, np.zeros(images.shape[:3] + (1,), np.uint8), normalizer, batch_size).map(
        lambda x, y: x)
    return model.predict(ds, verbose=0)["main"]


class ImageSpace:
    """2D images, NHWC: decoded to IMG_ROWS x IMG_COLS, masks written as 0/255 PNGs at the
    original size of their image."""

    rank = 2
    reduced_precision_by_default = True  # MIXED_PRECISION = "auto" may pick bf16/fp16 (issue 24's measurements)
    mask_suffix = ".png"

    def __init__(self, cfg):
        self.cfg = cfg

    Settings = Settings  # no settings of its own: IMG_ROWS, IMG_COLS and COLOR are the run's

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.cfg.img_rows, self.cfg.img_cols, self.cfg.channels)

    @property
    def model_input_shape(self) -> tuple[int, int, int]:
        """What the network is built with (a volume space builds a fully convolutional one)."""
        return self.input_shape

    def fit_normalizer(self, images) -> Normalizer:
        """Per-channel statistics of the training pool (`NORMALIZATION`)."""
        return Normalizer.fit(images, self.cfg.normalization)

    def load_normalizer(self, path: Path) -> Normalizer:
        return Normalizer.load(path)

    # ------------------------------------------------------------------ data
    def load_splits(self, splits=SPLITS) -> dict[str, Split]:
        return load_splits(self.cfg, splits)

    def pool_size(self) -> int:
        """How many pool items the run sees (POOL_SIZE caps it), from the file names alone."""
        n = len(find_pairs(self.cfg.data_path, "train", self.cfg.mask_naming))
        return min(n, self.cfg.pool_size) if self.cfg.pool_size else n

    def steps_per_epoch(self, n_images: int) -> int:
        """One pass over `n_images`: ceil(n / BATCH_SIZE) batches, at least one (what `train_stream`
        gives without `repeat`; a volume space counts patch steps, `VolumeSpace.steps_per_epoch`)."""
        return max(1, math.ceil(n_images / self.cfg.batch_size))

    def train_stream(self, images, masks, normalizer: Normalizer, seed: int, heads=None, repeat: bool = False,
                     foreground_oversample: float = 0.0):
        """Shuffled, augmented (AUGMENT), batched `(x, y)` for training."""
        return make_dataset(images, masks, normalizer, self.cfg.batch_size, shuffle=True, augment=self.cfg.augment,
                            seed=seed, heads=heads, repeat=repeat, foreground_oversample=foreground_oversample)

    def image_stream(self, images, normalizer: Normalizer, seed: int, repeat: bool = True):
        """Shuffled, augmented batches of images alone (the unlabelled pool), read row by row."""
        blank = Rows(np.zeros((1, *images.shape[1:-1], 1), np.uint8), np.zeros(len(images), np.int64))
        return self.train_stream(images, blank, normalizer, seed, repeat=repeat).map(lambda x, y: x)

    @property
    def eval_batch_size(self) -> int:
        return eval_batch_size(self.cfg)

    def eval_stream(self, images, masks, normalizer: Normalizer, heads=None):
        """Batched `(x, y)` in order, no augmentation (validation, test, scoring), at the larger
        inference batch (`eval_batch_size`)."""
        return make_dataset(images, masks, normalizer, self.eval_batch_size, heads=heads)

    # ------------------------------------------------------------------ inference
    def inferer(self, model):
        """A callable with the model's contract, `(x, training) -> {head: prob}`, over whole items.
        In 2D an item is one network input: the model itself."""
        return model

    def score_pool(self, query, model, images, masks, normalizer: Normalizer, progress: bool = False,
                   with_features=None) -> dict[str, np.ndarray]:
        """One batched pass of `query.score_batch` over `images` (`Rows` of the pool, read batch by
        batch); per-item arrays, and `pred` (uint8, kept on disk: memory stays flat in pool size).
        `with_features(model)`: the same graph with the bottleneck features as one more output."""
        from tqdm.auto import tqdm

        if len(images) == 0:
            return {}
        if getattr(query, "score_dtype", None) == "float32":  # scores that bf16 would move (CEAL)
            model = float32_copy(model)
        step = self._traced_step(query, model, with_features)
        parts: dict[str, list] = {}
        pred = None
        done = 0
        total = -(-len(images) // self.eval_batch_size)
        for x, y in tqdm(self.eval_stream(images, masks, normalizer), total=total, desc=f"scoring ({query.name})",
                         disable=not progress, leave=False):
            out = {k: v.numpy() for k, v in step(x, y).items()}
            batch = out.pop("pred")
            if pred is None:
                pred = disk_array((len(images), *batch.shape[1:]), batch.dtype)
            pred[done:done + len(batch)] = batch
            done += len(batch)
            for k, v in out.items():
                parts.setdefault(k, []).append(v)
        return {**{k: np.concatenate(v) for k, v in parts.items()}, "pred": pred}

    @staticmethod
    def _traced_step(query, model, with_features):
        """One graph per set of models, reused each round; the key holds the models themselves
        (compared by identity), so a freed model's id can never be mistaken for a new one."""
        import tensorflow as tf

        key = query.models(model)
        cached = getattr(query, "_traced_for", ())
        if len(cached) != len(key) or any(a is not b for a, b in zip(cached, key)):
            scored = with_features(model) if with_features is not None else model
            query._traced = tf.function(lambda x, y: query.score_batch(scored, x, y), reduce_retracing=True)
            query._traced_for = key
        return query._traced

    def predict(self, model, images, normalizer: Normalizer) -> np.ndarray:
        """Main-head probabilities of whole items, [N,H,W,1]."""
        return predict_main(model, images, normalizer, self.eval_batch_size)

    def evaluate(self, model, split: Split, normalizer: Normalizer):
        """Per-image test metrics (Dice, IoU, HD95, ASD at the model's size) and the predicted masks."""
        import pandas as pd

        from .metrics import batch_metrics

        pred = (self.predict(model, split.images, normalizer) > THRESHOLD).astype(np.uint8)
        return pd.DataFrame({"name": split.names, **batch_metrics(split.masks, pred)}), pred

    def overlay_rows(self, split: Split, pred: np.ndarray, n: int) -> list[list[np.ndarray]]:
        """`test.py`'s picture of the first `n` items of `split` and their predicted masks `pred`: one row of
        tiles, ground truth green and prediction red (`overlays.tile`)."""
        from .overlays import tile

        return [[tile(split.images[i], split.masks[i], pred[i]) for i in range(min(n, len(split.names)))]]

    # ------------------------------------------------------------------ masks on disk
    def masks_at_original_size(self, model, images, files: list[Path], normalizer: Normalizer) -> list[np.ndarray]:
        """The model's {0,1} uint8 masks for model-size `images`, each at the original size of its file."""
        prob = self.predict(model, images, normalizer)
        return [(to_original(p, original_size(f)) > THRESHOLD).astype(np.uint8) for p, f in zip(prob, files)]

    def write_masks(self, folder: Path, idx: np.ndarray, masks: np.ndarray, split: Split) -> None:
        """Masks of items `idx` of `split` at the original size of their files (0/255 PNGs named after
        the item), for a person to inspect or delete; the folder appears complete or not at all."""
        with atomic_dir(folder) as tmp:
            for i, mask in zip(idx, masks):
                h, w = original_size(split.files[i])
                big = cv2.resize(np.asarray(mask)[..., 0].astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST)
                self.write_mask_file(self.mask_file(tmp, split.names[i]), big, split.files[i])

    def mask_file(self, folder: Path, name: str) -> Path:
        return folder / f"{name}{self.mask_suffix}"

    # ------------------------------------------------------------------ a person's masks (ORACLE = "files")
    label_studio_tasks = True  # Label Studio's image tasks fit an item: each request has a tasks.json
    mask_pattern = re.compile(r"(?P<stem>.+?)(_segmentation)?\.png", re.IGNORECASE)  # a returned mask's name
    mask_names = "<image>_segmentation.png or <image>.png"
    annotation_help = ("Draw a binary mask (0/255 PNG at the image's own size) for each image, or correct its "
                       "prelabels/<image>.png, and save it as <image>.png or <image>_segmentation.png.")

    def write_mask_file(self, path: Path, mask: np.ndarray, image: Path) -> None:
        """A {0,1} mask already at the original size of `image`, as a 0/255 PNG (a request's prelabel)."""
        mask = np.asarray(mask, np.uint8)
        cv2.imwrite(str(path), mask.reshape(mask.shape[:2]) * 255)

    def check_mask(self, mask: Path, image: Path) -> None:
        """A person's mask for `image`: decodable, binary, the image's size; else one line naming it."""
        from .data import read_mask

        read_mask(mask, original_size(image), image)

    def mask_targets(self, gt: Path, found: dict[str, Path]) -> dict[str, Path]:
        """Where each returned mask ({image name: file}) goes in `gt`: the dataset's naming rule."""
        from .data import detect_naming, mask_name

        naming = detect_naming(self.cfg.data_path, self.cfg.mask_naming)
        return {stem: gt / mask_name(stem, naming) for stem in found}

    def thumbnails(self, images, side: int = 16) -> np.ndarray:
        """[N, side*side*C] float32 in [0,1]: area-downsampled copies, the features of a cold start."""
        return np.stack([cv2.resize(np.asarray(im), (side, side), interpolation=cv2.INTER_AREA).reshape(-1)
                         for im in images]).astype(np.float32) / 255.0


def space_for(cfg):
    """The space of a run's data, `ImageSpace` or `VolumeSpace`: the only place that decides the rank
    (NIfTI volumes in the split folders make a volume dataset; a mix of both is one line)."""
    if dataset_rank(cfg.data_path) == 3:
        return VolumeSpace.from_config(cfg)
    return ImageSpace(cfg)


def run_space(cfg, normalizer):
    """The space a trained run works in, from what the run recorded (a volume run's normalizer.json
    says "volume"), not from its data folder, which may have moved or gone since it trained."""
    if isinstance(normalizer, VolumeNormalizer):
        return VolumeSpace.from_config(cfg)
    return ImageSpace(cfg)


__all__ = ["ImageSpace", "VolumeSpace", "Rows", "disk_array", "item_axes", "original_size", "run_space", "space_for",
           "to_original"]
