"""Label-noise simulator: a copy of an orgData folder with a seeded fraction of training masks corrupted
(docs/methods.md#noise-synthesis).

Kinds, with parameters drawn per mask from a generator seeded by `(seed, mask index)`:
- `dilate` / `erode`: binary morphology (scikit-image) with a disk of radius
  `U(RADIUS[0], RADIUS[1]) x` the shorter image side (2-6%: 5-15 px on a 256 px mask, 1.3-4 px
  after resizing to 64), the exact disk (no footprint decomposition, which approximates it);
- `elastic`: MCPM's random-grid deformation: displacements ~ N(0, sigma^2) on a 5x5 control grid,
  sigma ~ U(1, 11) px at a 128 px side (scaled to the mask's shorter side), upsampled by cubic
  interpolation, plus a rotation ~ U(-45, 45) degrees and a zoom ~ U(0.8, 2) about the centre;
  the mask is resampled by nearest neighbour (scikit-image `warp`). `elasticdeform`, the usual
  library for this, is built against NumPy 1 and fails to import under NumPy 2, so the same
  random-grid recipe is written here on scikit-image.

Which masks are corrupted: `round(rate * n)` of the n training masks, a seeded choice. Everything
else (images, val and test, the other masks) is copied byte for byte; the source is only read.
`recipe.json` beside the output names the source, the settings and every corrupted mask with its
parameters, so `dsal run`, `dsal compare` and the loop use the output as an ordinary orgData folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from .errors import DsalError

KINDS = ("dilate", "erode", "elastic")
RADIUS = (0.02, 0.06)  # disk radius, as a fraction of the shorter side
ELASTIC_SIGMA = (1.0, 11.0)  # px at a 128 px side
ELASTIC_POINTS = 5
ELASTIC_ROTATION = (-45.0, 45.0)  # degrees
ELASTIC_ZOOM = (0.8, 2.0)
RECIPE = "recipe.json"
LOSSLESS = (".png", ".bmp", ".tif", ".tiff")


def corrupt_mask(mask: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """`(corrupted, params)`: a boolean [H,W] mask corrupted by `kind` with parameters drawn from `rng`."""
    from skimage import morphology

    mask = np.asarray(mask) > 0
    side = min(mask.shape)
    if kind in ("dilate", "erode"):
        radius = max(1, int(round(rng.uniform(*RADIUS) * side)))
        footprint = morphology.disk(radius)
        op = morphology.dilation if kind == "dilate" else morphology.erosion
        return op(mask, footprint), {"radius": radius}
    if kind == "elastic":
        return elastic(mask, rng)
    raise DsalError(f"--kind {kind!r} is not one of {list(KINDS)}")


def elastic(mask: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """Random-grid elastic deformation + rotation + zoom about the centre, nearest-neighbour resampling."""
    from skimage.transform import resize, warp

    h, w = mask.shape
    sigma = rng.uniform(*ELASTIC_SIGMA)
    angle = rng.uniform(*ELASTIC_ROTATION)
    zoom = rng.uniform(*ELASTIC_ZOOM)
    sigma_px = sigma * min(h, w) / 128.0
    grid = rng.normal(0.0, sigma_px, size=(2, ELASTIC_POINTS, ELASTIC_POINTS))
    displacement = np.stack([resize(g, (h, w), order=3, mode="edge") for g in grid])
    rows, cols = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
    t = np.deg2rad(angle)
    # inverse map: output pixel p reads the input at centre + R(-angle) (p - centre) / zoom + displacement
    dy, dx = rows - cy, cols - cx
    src_r = cy + (np.cos(t) * dy - np.sin(t) * dx) / zoom + displacement[0]
    src_c = cx + (np.sin(t) * dy + np.cos(t) * dx) / zoom + displacement[1]
    out = warp(mask.astype(np.float32), np.stack([src_r, src_c]), order=0, mode="constant", cval=0.0)
    return out > 0.5, {"sigma": round(float(sigma), 4), "angle": round(float(angle), 3),
                       "zoom": round(float(zoom), 4)}


def choose(n: int, rate: float, seed: int) -> np.ndarray:
    """Sorted indices of the `round(rate * n)` masks to corrupt."""
    k = int(round(rate * n))
    return np.sort(np.random.default_rng([seed, 7919]).choice(n, k, replace=False))


def corrupt_folder(src: str | Path, out: str | Path, rate: float, kind: str, seed: int = 0,
                   naming: str = "auto", log=print) -> dict:
    """Write `out`: a copy of the orgData folder `src` with a fraction `rate` of `trainGT` masks corrupted.

    Returns the recipe (also saved as `out/recipe.json`). Refuses to touch `src` or overwrite an
    unrelated folder; rerunning with the same settings on a finished output does nothing.
    """
    import cv2

    from .data import find_pairs

    src, out = Path(src).resolve(), Path(out).resolve()
    if kind not in KINDS:
        raise DsalError(f"--kind {kind!r} is not one of {list(KINDS)}")
    if not 0.0 <= rate <= 1.0:
        raise DsalError(f"--rate {rate} must be in [0, 1] (the fraction of training masks to corrupt)")
    if out == src or src in out.parents or out in src.parents:
        raise DsalError(f"--out {out} must be a new folder outside --data {src} (the source is never written)")
    settings = {"source": str(src), "kind": kind, "rate": float(rate), "seed": int(seed)}
    recipe_path = out / RECIPE
    if recipe_path.is_file():
        done = json.loads(recipe_path.read_text())
        if {k: done.get(k) for k in settings} == settings:
            log(f"{out} already holds this corruption ({RECIPE}); nothing to do")
            return done
        raise DsalError(f"{out} holds a different corruption ({recipe_path}); pick a new --out")
    if out.exists() and any(out.iterdir()):
        raise DsalError(f"--out {out} exists and is not empty; pick a new folder")
    pairs = find_pairs(src, "train", naming)
    picked = set(choose(len(pairs), rate, seed).tolist())
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(src, tmp)  # byte-identical copy first; the chosen masks are then rewritten
    corrupted = {}
    for i, (_, mask_path) in enumerate(pairs):
        if i not in picked:
            continue
        if mask_path.suffix.lower() not in LOSSLESS:
            raise DsalError(f"{mask_path}: masks must be lossless ({', '.join(LOSSLESS)}) to be corrupted exactly")
        raw = cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE)
        if raw is None:
            raise DsalError(f"cannot decode mask {mask_path}; replace or remove it")
        noisy, params = corrupt_mask(raw, kind, np.random.default_rng([seed, i]))
        on = int(raw.max()) if raw.max() > 0 else 255
        target = tmp / mask_path.relative_to(src)
        if not cv2.imwrite(str(target), noisy.astype(np.uint8) * on):
            raise DsalError(f"could not write {target}; check the disk and permissions")
        corrupted[mask_path.name] = params
    recipe = {**settings, "naming": naming, "n_train": len(pairs), "n_corrupted": len(corrupted),
              "radius_fraction": RADIUS, "elastic": {"sigma_at_128px": ELASTIC_SIGMA, "points": ELASTIC_POINTS,
                                                     "rotation_deg": ELASTIC_ROTATION, "zoom": ELASTIC_ZOOM},
              "corrupted": corrupted}
    recipe = json.loads(json.dumps(recipe))  # what a reader of recipe.json gets (lists, not tuples)
    (tmp / RECIPE).write_text(json.dumps(recipe, indent=1))
    tmp.rename(out)
    log(f"wrote {out}: {len(corrupted)} of {len(pairs)} training masks corrupted by {kind} (seed {seed})")
    return recipe
