"""Per-image evaluation metrics on binary masks (numpy/scipy, no TensorFlow).

Overlap metrics (`dice`, `iou`) say how much of the lesion was found; surface metrics
(`hd95`, `asd`) say how far the predicted border strays, which overlap hides for large lesions.

Conventions, chosen so that averages over a test set stay meaningful:

* Inputs are masks of any shape (`[H, W]`, or a volume `[D, H, W]`); values `> 0.5` are foreground, so bool,
  0/1, 0/255 and probability maps all work (probabilities are thresholded at 0.5).
* Both masks empty: the prediction is perfect, so `dice = iou = 1.0` and `hd95 = asd = 0.0`.
* Exactly one mask empty: there is no border to measure against, so `hd95 = asd = nan`
  (and `dice = iou = 0.0`). Use `np.nanmean` and report how many were nan.
* `hd95_penalized` is `hd95` with the undefined case scored as the image diagonal (the largest
  distance the image allows), so a model that misses lesions cannot get a better mean HD95 by
  leaving them out. The README tables use it.
* The boundary of a mask is the mask XOR its binary erosion (4-connected structuring element);
  pixels on the image edge count as boundary.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

Spacing = float | Sequence[float]


def _as_bool(mask: np.ndarray) -> np.ndarray:
    """Foreground is `> 0.5`, so 0/1, 0/255, bool and probability maps give the same mask."""
    return np.asarray(mask) > 0.5


def _pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = _as_bool(a), _as_bool(b)
    if a.shape != b.shape:
        raise ValueError(f"mask shapes differ: {a.shape} vs {b.shape}; resize one to the other")
    return a, b


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice coefficient 2|A∩B| / (|A|+|B|); 1.0 when both masks are empty."""
    a, b = _pair(a, b)
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union |A∩B| / |A∪B|; 1.0 when both masks are empty."""
    a, b = _pair(a, b)
    union = int((a | b).sum())
    return 1.0 if union == 0 else int((a & b).sum()) / union


def boundary(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels: the mask XOR its erosion (pixels on the image edge are boundary)."""
    m = _as_bool(mask)
    return m ^ ndimage.binary_erosion(m)


def surface_distances(a: np.ndarray, b: np.ndarray, spacing: Spacing = 1.0) -> np.ndarray:
    """Distance from each boundary pixel of `a` to the nearest boundary pixel of `b`.

    Directed (a -> b), in raster order of `a`'s boundary pixels, in units of `spacing`
    (a scalar or one value per axis). Empty if `a` is empty; all `inf` if only `b` is empty,
    since there is nothing to reach.
    """
    a, b = _pair(a, b)
    edge_a, edge_b = boundary(a), boundary(b)
    if not edge_b.any():
        return np.full(int(edge_a.sum()), np.inf)
    # EDT measures distance to the nearest zero, so the zeros must be b's boundary.
    dist_to_b = ndimage.distance_transform_edt(~edge_b, sampling=spacing)
    return dist_to_b[edge_a]


def _symmetric(a: np.ndarray, b: np.ndarray, spacing: Spacing) -> np.ndarray | float:
    """Both directions' surface distances pooled; 0.0 / nan for the empty cases."""
    a, b = _pair(a, b)
    has_a, has_b = bool(a.any()), bool(b.any())
    if not has_a and not has_b:
        return 0.0
    if has_a != has_b:
        return float("nan")
    return np.concatenate([surface_distances(a, b, spacing), surface_distances(b, a, spacing)])


def hd95(a: np.ndarray, b: np.ndarray, spacing: Spacing = 1.0) -> float:
    """95th percentile Hausdorff distance: robust to a few stray pixels, unlike the max.

    The percentile is taken over the pooled distances of both directions (a->b and b->a),
    with numpy's linear interpolation. 0.0 if both masks are empty, nan if exactly one is.
    """
    return _surface_summary(a, b, spacing)[0]


def asd(a: np.ndarray, b: np.ndarray, spacing: Spacing = 1.0) -> float:
    """Average symmetric surface distance: the mean over the pooled boundary pixels of both masks,
    (sum d(a->b) + sum d(b->a)) / (|∂A| + |∂B|). 0.0 if both masks are empty, nan if exactly one is.
    """
    return _surface_summary(a, b, spacing)[1]


def _surface_summary(a: np.ndarray, b: np.ndarray, spacing: Spacing) -> tuple[float, float, float]:
    """`(hd95, asd, hd95_penalized)` from one set of pooled surface distances (two distance transforms)."""
    d = _symmetric(a, b, spacing)
    hd, mean = (d, d) if isinstance(d, float) else (float(np.percentile(d, 95)), float(np.mean(d)))
    return hd, mean, diagonal(np.shape(_as_bool(a)), spacing) if np.isnan(hd) else hd


def diagonal(shape: Sequence[int], spacing: Spacing = 1.0) -> float:
    """The image diagonal in units of `spacing`: the worst border distance an image allows."""
    sp = np.broadcast_to(np.asarray(spacing, np.float64), (len(shape),))
    return float(np.sqrt(np.sum((np.asarray(shape, np.float64) * sp) ** 2)))


def hd95_penalized(a: np.ndarray, b: np.ndarray, spacing: Spacing = 1.0) -> float:
    """`hd95`, but an empty-versus-nonempty pair scores the image diagonal instead of nan."""
    return _surface_summary(a, b, spacing)[2]


METRICS = {"dice": dice, "iou": iou, "hd95": hd95, "asd": asd, "hd95_penalized": hd95_penalized}
SURFACE_METRICS = ("hd95", "asd", "hd95_penalized")  # the ones measured in units of `spacing`


def _three_axes(gt: np.ndarray, pred: np.ndarray, layout: str) -> tuple[np.ndarray, np.ndarray]:
    """`gt`, `pred` as 3-axis arrays of one shape (`layout`), a trailing channel of 1 dropped."""
    gt, pred = np.asarray(gt), np.asarray(pred)
    if gt.ndim == 4 and gt.shape[-1] == 1:
        gt = gt[..., 0]
    if pred.ndim == 4 and pred.shape[-1] == 1:
        pred = pred[..., 0]
    if gt.ndim != 3 or gt.shape != pred.shape:
        raise ValueError(
            f"gt {gt.shape} and pred {pred.shape} must both be [{layout}] or [{layout},1] "
            "with the same shape; threshold/argmax multi-channel outputs first"
        )
    return gt, pred


def pair_metrics(gt: np.ndarray, pred: np.ndarray, spacing: Spacing = 1.0) -> dict[str, float]:
    """All of `METRICS` for one mask pair, the same values as calling each; the surface distances
    (two distance transforms) are computed once for the three surface metrics, not once each."""
    hd, mean, penalized = _surface_summary(gt, pred, spacing)
    return {"dice": float(dice(gt, pred)), "iou": float(iou(gt, pred)), "hd95": hd, "asd": mean,
            "hd95_penalized": penalized}


def volume_metrics(gt: np.ndarray, pred: np.ndarray, spacing: Spacing = 1.0) -> dict[str, float]:
    """All of `METRICS` for one volume `[D,H,W]` (or `[D,H,W,1]`), surface distances in the units
    of `spacing` (mm, one value per axis from the header): the per-volume score of a 3D test set.
    The boundary is 6-connected in 3D (the erosion's cross-shaped element)."""
    gt, pred = _three_axes(gt, pred, "D,H,W")
    return pair_metrics(gt, pred, spacing)


def batch_metrics(gt: np.ndarray, pred: np.ndarray) -> dict[str, np.ndarray]:
    """Per-image metrics for a batch: `gt`, `pred` are `[N, H, W]` or `[N, H, W, 1]`.

    Returns `{"dice", "iou", "hd95", "asd", "hd95_penalized"}`, each a float64 array of shape `[N]`, so callers
    can average, rank or look up the worst cases (nan marks one-empty cases for hd95/asd).
    """
    gt, pred = _three_axes(gt, pred, "N,H,W")
    rows = [pair_metrics(g, p) for g, p in zip(gt, pred, strict=True)]
    return {name: np.array([r[name] for r in rows], dtype=np.float64) for name in METRICS}
