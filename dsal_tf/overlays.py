"""Pictures for checking masks by eye: contours of the ground truth (green) and the prediction (red) over the
image, for 2D images and, as three orthogonal slices, for volumes.

`python test.py` writes `overlays/round_XX.png` for the first and last round (`NB_OVERLAYS` test items, one
row of tiles for images, one row of three planes per volume); `dsal predict --overlays` writes one picture per
input. A volume's planes go through its mask's largest cross-section along each axis, so a small structure is
in view; each tile keeps the physical aspect of its voxels (`spacing`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

GREEN, RED = (0, 255, 0), (255, 0, 0)
TILE_HEIGHT = 192  # pixels: small model inputs are shown enlarged, large images shrunk


def to_uint8(image: np.ndarray) -> np.ndarray:
    """`image` for display: uint8 as it is, anything else (MRI, CT, z-scored) from its 1st-99th percentile to 0-255."""
    if image.dtype == np.uint8:
        return image
    x = np.asarray(image, np.float32)
    lo, hi = np.percentile(x, (1, 99)) if x.size else (0.0, 1.0)
    return (np.clip((x - lo) / max(float(hi - lo), 1e-6), 0, 1) * 255).astype(np.uint8)


def planes(volume: np.ndarray, masks: Sequence[np.ndarray | None], spacing: Sequence[float] = (1.0, 1.0, 1.0)
           ) -> list[tuple[np.ndarray, list[np.ndarray | None], tuple[float, float]]]:
    """The three orthogonal slices of a `[D,H,W]` volume (and of each `[D,H,W]` mask, None kept as None), one per
    axis, each through the largest cross-section of the first mask with foreground (the middle slice when none
    has any); each with its pixels' (row, column) spacing."""
    volume = np.asarray(volume)
    ref = next((m for m in masks if m is not None and np.any(m)), None)
    out = []
    for axis in range(3):
        if ref is None:
            k = volume.shape[axis] // 2
        else:
            k = int(np.argmax(np.sum(ref > 0, axis=tuple(a for a in range(3) if a != axis))))
        pixel = tuple(float(s) for a, s in enumerate(spacing) if a != axis)
        out.append((np.take(volume, k, axis=axis), [None if m is None else np.take(m, k, axis=axis) for m in masks],
                    pixel))
    return out


def tile(image: np.ndarray, gt: np.ndarray | None, pred: np.ndarray | None,
         pixel: tuple[float, float] = (1.0, 1.0), height: int | None = TILE_HEIGHT, thickness: int = 1) -> np.ndarray:
    """One RGB uint8 tile `height` pixels high (None: the image's own size): a 2D image (grey `[H,W]`/`[H,W,1]` or
    RGB) with the contours of `gt` (green) and `pred` (red) drawn after resizing, `thickness` pixels wide, its
    width following the pixel spacing `pixel`."""
    img = to_uint8(np.asarray(image))
    img = img[..., 0] if img.ndim == 3 and img.shape[-1] == 1 else img
    img = cv2.cvtColor(img, cv2.COLOR_GRAY2RGB) if img.ndim == 2 else img[..., :3]
    rows, cols = img.shape[:2]
    height = rows if height is None else height
    size = (max(1, round(height * cols * pixel[1] / (rows * pixel[0]))), height)
    out = np.ascontiguousarray(cv2.resize(img, size, interpolation=cv2.INTER_CUBIC if height >= rows else
                                          cv2.INTER_AREA))
    for mask, color in ((gt, GREEN), (pred, RED)):
        if mask is None:
            continue
        m = np.asarray(mask).reshape(rows, cols)
        m = cv2.resize((m > 0).astype(np.uint8), size, interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(out, contours, -1, color, thickness)
    return out


def volume_tiles(volume: np.ndarray, gt: np.ndarray | None, pred: np.ndarray | None,
                 spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> list[np.ndarray]:
    """A volume's three plane tiles (`planes`, then `tile`), the planes chosen on `gt` (or `pred` when `gt` is
    None or empty)."""
    return [tile(img, g, p, pixel) for img, (g, p), pixel in planes(volume, [gt, pred], spacing)]


def write_grid(rows: list[list[np.ndarray]], path: Path) -> None:
    """Tiles as a picture: each inner list a row, left to right; rows padded with black to the widest."""
    lines = [np.concatenate(r, axis=1) for r in rows if r]
    if not lines:
        return
    width = max(line.shape[1] for line in lines)
    lines = [np.pad(line, ((0, 0), (0, width - line.shape[1]), (0, 0))) for line in lines]
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(np.concatenate(lines, axis=0), cv2.COLOR_RGB2BGR))
