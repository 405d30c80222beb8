"""A seeded synthetic dermoscopy-like lesion dataset, so the whole loop runs with no download.

The images are deliberately not trivial: a threshold on darkness alone should not solve them.
Skin tone and illumination vary per image, lesions vary in size, shape, contrast and texture,
dark hairs cross lesion and skin (and are *not* in the mask), and corners are vignetted the way
a dermatoscope darkens them. Pure numpy + cv2, so generating data never imports TensorFlow.

Layout written by `make_synthetic` (ISIC naming, as `mask_naming="isic"` expects)::

    root/trainImg/SYN_000001.jpg    root/trainGT/SYN_000001_segmentation.png
    root/valImg/...                 root/valGT/...
    root/testImg/...                root/testGT/...

Images are RGB JPEGs (quality 95); masks are uint8 PNGs with values exactly 0 and 255.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from .data import SPLITS
from .errors import DsalError

AREA_RANGE = (0.05, 0.50)  # lesion area as a fraction of the image, before rejection
# The small-lesion variant (`make_synthetic(..., small=True)`): 1-3 lesions per image, each 0.08-0.6%
# of the image, about 1% foreground in all, like infection in a CT slice: at 256x256 the smallest
# lesions are ~50 pixels, ~3 pixels once resized to 64x64.
SMALL_AREA_RANGE = (0.0008, 0.006)
SMALL_MAX_LESIONS = 3
JPEG_QUALITY = 95

# Skin tones (RGB, 0..1) to mix from: light beige, pink, tan, olive-beige.
_SKIN_TONES = np.array(
    [[0.91, 0.78, 0.68], [0.92, 0.70, 0.68], [0.80, 0.62, 0.50], [0.84, 0.70, 0.58]],
    dtype=np.float32,
)
# Pigment tones (RGB, 0..1): light brown, mid brown, dark brown, blue-grey (dermal pigment).
_PIGMENT_TONES = np.array(
    [[0.62, 0.42, 0.32], [0.45, 0.28, 0.19], [0.27, 0.16, 0.12], [0.35, 0.32, 0.38]],
    dtype=np.float32,
)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Zero-mean noise in about [-1, 1] whose features are ~size/cells pixels wide.

    A tiny random grid upsampled with bicubic interpolation is far cheaper than filtering
    full-resolution white noise, and gives the blotchy low-frequency look of skin.
    """
    grid = rng.uniform(-1.0, 1.0, size=(cells, cells)).astype(np.float32)
    return cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC)


def _random_mix(rng: np.random.Generator, tones: np.ndarray) -> np.ndarray:
    """A random convex mix of `tones`, so colours vary continuously rather than in a few classes."""
    weights = rng.dirichlet(np.full(len(tones), 0.7))
    return (weights @ tones).astype(np.float32)


def _lesion_mask(rng: np.random.Generator, size: int, area_range: tuple = AREA_RANGE) -> np.ndarray:
    """An irregular blob: an ellipse whose radius is perturbed by a few random Fourier harmonics.

    Resamples until the lesion covers `area_range` of the image, so the mask statistics are
    bounded whatever the draw (the rng stays deterministic, so this is still seeded).
    """
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    for _ in range(100):
        frac = rng.uniform(*area_range)
        r0 = np.sqrt(frac * size * size / np.pi)
        aspect = rng.uniform(0.7, 1.0)
        angle = rng.uniform(0.0, np.pi)
        margin = 0.6 * r0
        cx, cy = rng.uniform(margin, size - margin, size=2)
        dx, dy = xx - cx, yy - cy
        # Rotate then squash one axis: an elongated lesion at a random orientation.
        u = dx * np.cos(angle) + dy * np.sin(angle)
        v = (-dx * np.sin(angle) + dy * np.cos(angle)) / aspect
        theta = np.arctan2(v, u)
        radius = np.full_like(theta, 1.0)
        for k in range(2, 8):
            amp = rng.uniform(0.0, 0.22) / k**0.8
            radius += amp * np.cos(k * theta + rng.uniform(0.0, 2 * np.pi))
        radius = r0 * np.sqrt(aspect) * np.maximum(radius, 0.3)
        mask = (np.hypot(u, v) <= radius).astype(np.uint8)
        if area_range[0] <= mask.mean() <= area_range[1]:
            return mask
    raise RuntimeError(f"could not draw a lesion within {area_range}; widen the area range")


def _hair_layer(rng: np.random.Generator, size: int) -> np.ndarray:
    """Alpha map (0..1) of 0-10 thin dark curves that cross the image, lesion included."""
    n_hairs = int(rng.choice([0, 0, 1, 2, 3, 4, 6, 8, 10]))
    scale = 4  # draw at 4x then downsample: sub-pixel, anti-aliased hairs of varied width
    canvas = np.zeros((size * scale, size * scale), dtype=np.uint8)
    for _ in range(n_hairs):
        # A cubic Bezier curve from one random border-ish point to another.
        pts = rng.uniform(-0.2, 1.2, size=(4, 2)) * size * scale
        t = np.linspace(0.0, 1.0, 40)[:, None]
        curve = (
            (1 - t) ** 3 * pts[0]
            + 3 * (1 - t) ** 2 * t * pts[1]
            + 3 * (1 - t) * t**2 * pts[2]
            + t**3 * pts[3]
        )
        thickness = int(rng.integers(2, 6))
        shade = int(rng.integers(150, 256))
        cv2.polylines(
            canvas, [np.round(curve).astype(np.int32)], False, shade, thickness, cv2.LINE_AA
        )
    small = cv2.resize(canvas, (size, size), interpolation=cv2.INTER_AREA)
    return small.astype(np.float32) / 255.0


def render_case(rng: np.random.Generator, size: int, small: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Draw one synthetic dermoscopy image and its lesion mask.

    `small`: 1-`SMALL_MAX_LESIONS` lesions of `SMALL_AREA_RANGE` each instead of one large one
    (the default draws exactly as before, so the demo data stay byte-identical).

    Returns `(image, mask)`: `image` is `[size, size, 3]` uint8 in **BGR** order (what cv2
    writes), `mask` is `[size, size]` uint8 with values 0/1 and is exactly the lesion region,
    hairs excluded. All randomness comes from `rng`, so a seeded generator gives the same case.
    """
    # --- skin: per-image tone, low-frequency illumination, fine mottling
    skin = _random_mix(rng, _SKIN_TONES) * rng.uniform(0.85, 1.05)
    light = 1.0 + rng.uniform(0.04, 0.12) * _smooth_noise(rng, size, int(rng.integers(3, 6)))
    mottle = 1.0 + 0.03 * _smooth_noise(rng, size, size // 6)
    img = skin[None, None, :] * (light * mottle)[..., None]

    # --- lesion: shape, pigment and contrast
    if small:
        mask = _lesion_mask(rng, size, SMALL_AREA_RANGE)
        for _ in range(int(rng.integers(1, SMALL_MAX_LESIONS + 1)) - 1):
            mask |= _lesion_mask(rng, size, SMALL_AREA_RANGE)
    else:
        mask = _lesion_mask(rng, size)
    pigment = _random_mix(rng, _PIGMENT_TONES)
    # ~1 in 4 lesions is faint: only a small step in colour from the skin around it.
    contrast = rng.uniform(0.12, 0.3) if rng.random() < 0.25 else rng.uniform(0.4, 0.95)
    lesion = (1 - contrast) * skin + contrast * pigment
    # Mottled darker blobs inside the lesion.
    blobs = np.clip(_smooth_noise(rng, size, int(rng.integers(6, 14))), 0.0, 1.0)
    # Reticular network: thin dark lines along the level set of two warped, rotated waves,
    # present only in patches of the lesion (real networks are rarely uniform).
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    freq, rot = rng.uniform(0.3, 0.6), rng.uniform(0.0, np.pi)
    u = xx * np.cos(rot) + yy * np.sin(rot)
    v = -xx * np.sin(rot) + yy * np.cos(rot)
    waves = np.sin(freq * u + 4.0 * _smooth_noise(rng, size, 10)) + np.sin(
        freq * v + 4.0 * _smooth_noise(rng, size, 10)
    )
    network = np.exp(-((waves / 0.35) ** 2)).astype(np.float32)
    network *= np.clip(0.5 + _smooth_noise(rng, size, 5), 0.0, 1.0)
    # Dark globules: a few small dots scattered over the lesion.
    dots = np.zeros((size, size), dtype=np.float32)
    ys, xs = np.nonzero(mask)
    for j in rng.choice(len(ys), size=int(rng.integers(0, 15)), replace=True):
        cv2.circle(dots, (int(xs[j]), int(ys[j])), int(rng.integers(1, 3)), 1.0, -1)
    dots = cv2.GaussianBlur(dots, (0, 0), 0.8)
    darken = (
        1.0
        - rng.uniform(0.1, 0.4) * blobs
        - rng.uniform(0.0, 0.3) * network
        - rng.uniform(0.2, 0.5) * dots
    )
    # Lesions are often darker towards the centre: distance to the border, normalised.
    depth = cv2.distanceTransform(mask, cv2.DIST_L2, 3)
    depth = depth / max(float(depth.max()), 1.0)
    darken *= 1.0 - rng.uniform(0.0, 0.25) * depth
    lesion_img = lesion[None, None, :] * (light * darken)[..., None]
    # Blurred border: the alpha ramps across the true edge; the mask stays the hard region.
    alpha = cv2.GaussianBlur(mask.astype(np.float32), (0, 0), rng.uniform(0.8, 3.0))
    img = img * (1 - alpha[..., None]) + lesion_img * alpha[..., None]

    # --- hairs: dark, over everything, never in the mask
    hair = _hair_layer(rng, size)[..., None]
    hair_colour = rng.uniform(0.05, 0.2) * np.array([1.0, 0.85, 0.75], dtype=np.float32)
    img = img * (1 - hair) + hair_colour * hair

    # --- vignetting: the dark, roughly circular fall-off of a dermatoscope's field
    c = (size - 1) / 2 + rng.uniform(-0.08, 0.08, size=2) * size
    r = np.hypot(xx - c[0], yy - c[1]) / (size / np.sqrt(2))
    vignette = 1.0 - rng.uniform(0.25, 0.75) * np.clip(r, 0, 1.2) ** rng.uniform(2.5, 5.0)
    img = img * vignette[..., None]

    img = img + rng.normal(0.0, 0.012, size=img.shape).astype(np.float32)  # sensor noise
    rgb = np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(rgb[..., ::-1]), mask


def case_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator for one image: independent per (seed, split, index), so any single case
    can be regenerated alone and changing one split's count never changes the others."""
    return np.random.default_rng([seed, SPLITS.index(split), index])


def make_synthetic(
    root: str | Path,
    counts: tuple[int, int, int] = (240, 40, 40),
    size: int = 128,
    seed: int = 0,
    small: bool = False,
) -> dict[str, int]:
    """Write a train/val/test synthetic lesion dataset under `root` in ISIC layout.

    `small=True` writes the small-lesion variant (`render_case(..., small=True)`), whose
    structures vanish at 64x64: the case `dsal plan`'s size rule is for.

    `counts` is images per split (train, val, test). Same seed -> byte-identical files.
    Returns the number of images written per split, e.g. `{"train": 240, "val": 40, "test": 40}`.
    """
    if len(counts) != 3 or any(int(n) < 0 for n in counts):
        raise DsalError(
            f"SYNTHETIC_COUNTS={tuple(counts)!r} is invalid; give three non-negative "
            "image counts (train, val, test), e.g. (240, 40, 40)"
        )
    if int(size) < 16:
        raise DsalError(f"SYNTHETIC_SIZE={size} is too small; use at least 16 (e.g. 128)")
    root = Path(root)
    written: dict[str, int] = {}
    for split, n in zip(SPLITS, counts, strict=True):
        img_dir, gt_dir = root / f"{split}Img", root / f"{split}GT"
        img_dir.mkdir(parents=True, exist_ok=True)
        gt_dir.mkdir(parents=True, exist_ok=True)
        for i in range(int(n)):
            image, mask = render_case(case_rng(seed, split, i), int(size), small)
            name = f"SYN_{i + 1:06d}"
            cv2.imwrite(
                str(img_dir / f"{name}.jpg"), image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]
            )
            cv2.imwrite(str(gt_dir / f"{name}_segmentation.png"), mask * np.uint8(255))
        written[split] = int(n)
    return written
