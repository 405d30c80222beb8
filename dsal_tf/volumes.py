"""NIfTI volumes in the orgData layout: reading, checking, resampling, normalising and writing back.

Layout: a volume is `[D, H, W]`, the file's voxel axes (i, j, k) in nibabel's order, never
reoriented: the affine carries the orientation, so a mask written with the input's affine lands
where the image was. `spacing` is one value per array axis, in mm, from the header.

The pipeline follows nnU-Net: normalise each volume (z-score for MRI, a clipped window for CT),
resample to a target spacing (by default the pool's median: linear for images, nearest for
labels), and for predictions the inverse, back to the input's grid and affine (`restore`).

Bad input gets one line naming the file and the fix (`DsalError`): a 4D file, a 2D file in a 3D
dataset, a corrupt file, image and label shapes or affines that differ, a non-binary label.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from .errors import DsalError
from .files import atomic_write
from .folders import NIFTI_EXTS, dataset_rank, is_nifti, list_volumes  # noqa: F401 (re-exported)

NORMALIZATIONS = ("zscore", "ct")
DEFAULT_CT_WINDOW = (-160.0, 240.0)  # soft-tissue window (level 40, width 400 HU)
AFFINE_TOL = 1e-3  # mm: image and label affines may differ by float rounding, not more
Spacing = tuple[float, float, float]


@dataclass
class Volume:
    """One NIfTI volume as read: the voxels `[D,H,W]`, its affine (voxel -> world mm), its header
    (kept to write masks the viewer aligns with the image) and the spacing per axis in mm."""

    path: Path
    array: np.ndarray
    affine: np.ndarray
    header: object
    spacing: Spacing

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.array.shape)


@dataclass
class Case:
    """A preprocessed pair: `image` float32 `[D,H,W]` normalised and resampled to `spacing`,
    `label` uint8 `[D,H,W]` in {0,1} on the same grid (None without a label), `affine` of that
    grid, and `source`, the volume as read, for `restore` and `write_mask`."""

    name: str
    image: np.ndarray
    label: np.ndarray | None
    spacing: Spacing
    affine: np.ndarray
    source: Volume


def volume_stem(path: str | Path) -> str:
    """The name without `.nii.gz` / `.nii`: `hippocampus_001.nii.gz` -> `hippocampus_001`."""
    name = Path(path).name
    for ext in NIFTI_EXTS:
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return Path(name).stem


def _label_candidates(img: Path, gt_dir: Path, naming: str) -> list[Path]:
    stem = volume_stem(img)
    isic = [gt_dir / f"{stem}_segmentation{ext}" for ext in NIFTI_EXTS]
    same = [gt_dir / f"{stem}{ext}" for ext in NIFTI_EXTS]
    return isic if naming == "isic" else same if naming == "same" else [*same, *isic]


def find_volume_pairs(
    data_path: str | Path, split: str, naming: str = "auto", require_masks: bool = True
) -> list[tuple[Path, Path | None]]:
    """(image, label) paths of a split of NIfTI volumes, sorted by name. The label shares the
    image's name (`X.nii.gz`) or follows the `_segmentation` rule (`X_segmentation.nii.gz`),
    decided once from the first label found. A 2D image among the volumes is an error."""
    from .data import IMAGE_EXTS, list_images

    root = Path(data_path)
    img_dir, gt_dir = root / f"{split}Img", root / f"{split}GT"
    if not img_dir.is_dir():
        raise DsalError(f"folder {img_dir} not found; put the {split} volumes there (see README, Data)")
    flat = list_images(img_dir)
    if flat:
        raise DsalError(f"{flat[0]} is a 2D image in a 3D dataset ({img_dir} holds NIfTI volumes); "
                        "remove it or convert it to .nii.gz")
    images = list_volumes(img_dir)
    if not images:
        raise DsalError(f"folder {img_dir} has no volumes ({', '.join(NIFTI_EXTS)}) "
                        f"nor images ({', '.join(IMAGE_EXTS)}); add the {split} volumes")
    if naming == "auto":
        found = next((p for img in images for p in _label_candidates(img, gt_dir, "auto") if p.is_file()), None)
        naming = "isic" if found is not None and volume_stem(found).endswith("_segmentation") else "same"
    pairs = []
    for img in images:
        candidates = _label_candidates(img, gt_dir, naming)
        label = next((p for p in candidates if p.is_file()), None)
        if label is None and require_masks:
            raise DsalError(f"missing label for {img}: expected {candidates[0]}; add it or remove the volume")
        pairs.append((img, label))
    return pairs


def _load(path: Path):
    """The nibabel image of `path`, or a one-line error if it is missing, empty or unreadable."""
    import nibabel as nib

    if not path.is_file():
        raise DsalError(f"{path} not found; check the path")
    if path.stat().st_size == 0:
        raise DsalError(f"{path} is empty (0 bytes); replace or remove it")
    try:
        return nib.load(str(path))
    except Exception as e:  # noqa: BLE001 - nibabel raises many kinds for one cause: a bad file
        raise DsalError(f"cannot read {path} as NIfTI ({type(e).__name__}); it is corrupt, "
                        "replace it (re-export or re-download)") from None


def _spatial(array: np.ndarray, path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """The array as `[D,H,W]`: trailing singleton axes dropped (x,y,z,1 is 3D); 4D and 2D rejected."""
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    dims = "x".join(str(n) for n in shape)
    if array.ndim > 3:
        raise DsalError(f"{path} is {array.ndim}D ({dims}); save one 3D volume per file "
                        "(split the 4th axis, e.g. with fslsplit)")
    if array.ndim < 3 or min(array.shape) == 1:
        raise DsalError(f"{path} is a 2D image ({dims}) in a 3D dataset; "
                        "use a 3D volume or put 2D images in a 2D dataset")
    return array


def read_volume(path: str | Path, dtype=np.float32) -> Volume:
    """Read and check one NIfTI volume: the voxels as `dtype` (header scaling applied), affine,
    header and spacing. Reads the whole file, so a truncated `.nii.gz` fails here, on one line."""
    path = Path(path)
    img = _load(path)
    try:
        array = np.asarray(img.dataobj, dtype=dtype) if dtype is not None else np.asanyarray(img.dataobj)
    except Exception as e:  # noqa: BLE001 - gzip/zlib/EOF errors surface while the voxels are read
        raise DsalError(f"cannot read the voxels of {path} ({type(e).__name__}: truncated or corrupt); "
                        "replace it (re-export or re-download)") from None
    array = _spatial(array, path, img.shape)
    spacing = tuple(float(z) for z in img.header.get_zooms()[:3])
    if len(spacing) < 3 or not all(np.isfinite(spacing)) or min(spacing) <= 0:
        raise DsalError(f"{path} has voxel spacing {spacing} in its header; set positive pixdim values")
    return Volume(path, array, np.asarray(img.affine, np.float64), img.header, spacing)


def read_header(path: str | Path) -> Volume:
    """One NIfTI file's geometry without its voxels: shape, affine, header and spacing, checked like
    `read_volume` (a 4D or 2D file, a bad spacing: one line naming the file). `array` is a
    zero-stride placeholder of the file's shape (no memory), enough for `write_mask`'s reference."""
    path = Path(path)
    img = _load(path)
    placeholder = _spatial(np.broadcast_to(np.float32(0), img.shape), path, img.shape)
    zooms = img.header.get_zooms()
    spacing = tuple(float(z) for z in zooms[:3])
    if len(spacing) < 3 or not all(np.isfinite(spacing)) or min(spacing) <= 0:
        raise DsalError(f"{path} has voxel spacing {spacing} in its header; set positive pixdim values")
    return Volume(path, placeholder, np.asarray(img.affine, np.float64), img.header, spacing)


def check_label(label: np.ndarray, path: Path) -> np.ndarray:
    """{0,1} uint8 from a label volume whose values are a subset of {0,1} or of {0,255}."""
    values = np.unique(label)
    if not (set(values.tolist()) <= {0, 1} or set(values.tolist()) <= {0, 255}):
        shown = ", ".join(f"{v:g}" for v in values[:6]) + (", ..." if len(values) > 6 else "")
        raise DsalError(f"label {path} has values {{{shown}}}, expected {{0,1}} or {{0,255}}; "
                        "merge the classes into one foreground (e.g. fslmaths X -bin X)")
    return (label > 0).astype(np.uint8)


def read_label(path: str | Path, image: Volume) -> np.ndarray:
    """Read one label volume and check it against its image: same shape, same affine, binary."""
    path = Path(path)
    label = read_volume(path, dtype=None)
    if label.shape != image.shape:
        raise DsalError(f"label {path} is {'x'.join(map(str, label.shape))} but its image {image.path} is "
                        f"{'x'.join(map(str, image.shape))}; re-export the label on the image's grid")
    if not np.allclose(label.affine, image.affine, rtol=0, atol=AFFINE_TOL):
        raise DsalError(f"label {path} has a different affine (origin, spacing or orientation) from its image "
                        f"{image.path}; re-export the label on the image's grid")
    return check_label(label.array, path)


def median_spacing(spacings: Iterable[Sequence[float]]) -> Spacing:
    """The target spacing nnU-Net picks by default: the median over the pool, per axis."""
    arr = np.asarray(list(spacings), np.float64)
    if arr.ndim != 2 or arr.shape[1] != 3 or len(arr) == 0:
        raise ValueError("median_spacing needs one (d, h, w) spacing per volume")
    return tuple(float(v) for v in np.median(arr, axis=0))


def pool_spacing(paths: Iterable[str | Path]) -> Spacing:
    """The median spacing of NIfTI files, from their headers only (no voxels are read)."""
    return median_spacing(tuple(float(z) for z in _load(Path(p)).header.get_zooms()[:3]) for p in paths)


def resampled_shape(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]) -> tuple[int, ...]:
    """The grid that keeps the field of view at `target` spacing: round(shape * spacing / target), >= 1."""
    return tuple(max(1, round(n * s / t)) for n, s, t in zip(shape, spacing, target, strict=True))


def resize(array: np.ndarray, shape: Sequence[int], order: int) -> np.ndarray:
    """`array` on a grid of `shape` with the same field of view (voxel edges aligned, half-pixel
    centres): order 1 (linear) for images and probabilities, 0 (nearest) for labels."""
    shape = tuple(int(n) for n in shape)
    if tuple(array.shape) == shape:
        return array.copy()
    zoom = [n / m for n, m in zip(shape, array.shape, strict=True)]
    out = ndimage.zoom(array, zoom, order=order, mode="nearest", grid_mode=True)
    if out.shape != shape:  # float rounding of zoom * size; never more than one voxel
        raise AssertionError(f"resize gave {out.shape}, wanted {shape}")
    return out


def resampled_affine(affine: np.ndarray, shape: Sequence[int], new_shape: Sequence[int]) -> np.ndarray:
    """The affine of the resized grid: new voxel j sits at old voxel coordinate (j + 0.5) f - 0.5,
    f = shape / new_shape, the mapping `resize` uses, so world positions are kept."""
    f = np.asarray(shape, np.float64) / np.asarray(new_shape, np.float64)
    step = np.eye(4)
    step[:3, :3] = np.diag(f)
    step[:3, 3] = 0.5 * f - 0.5
    return np.asarray(affine, np.float64) @ step


def zscore(array: np.ndarray) -> np.ndarray:
    """Per-volume z-score (MRI: intensities have no fixed scale), float32; a constant volume gives 0."""
    a = np.asarray(array, np.float32)
    std = float(a.std())
    return ((a - float(a.mean())) / (std if std > 1e-8 else 1.0)).astype(np.float32)


def ct_window(array: np.ndarray, window: Sequence[float] = DEFAULT_CT_WINDOW) -> np.ndarray:
    """CT: Hounsfield units clipped to `window` (low, high) and scaled to [0, 1], as MONAI's
    ScaleIntensityRange with clip; the same HU means the same value in every volume."""
    low, high = float(window[0]), float(window[1])
    if not high > low:
        raise DsalError(f"CT_WINDOW {tuple(window)} must be (low, high) with high > low, e.g. (-160, 240)")
    return ((np.clip(np.asarray(array, np.float32), low, high) - low) / (high - low)).astype(np.float32)


def normalize(array: np.ndarray, mode: str = "zscore", window: Sequence[float] | None = None) -> np.ndarray:
    """`zscore` (MRI) or `ct` (a clipped window, `window` or `DEFAULT_CT_WINDOW`)."""
    if mode == "zscore":
        return zscore(array)
    if mode == "ct":
        return ct_window(array, DEFAULT_CT_WINDOW if window is None else window)
    raise DsalError(f"volume normalisation {mode!r} is unknown; use one of {', '.join(NORMALIZATIONS)}")


def load_case(image_path: str | Path, label_path: str | Path | None = None, spacing: Sequence[float] | None = None,
              mode: str = "zscore", window: Sequence[float] | None = None) -> Case:
    """Read, check, normalise and resample one pair to `spacing` (None: keep the file's own).
    Normalising comes first, on the voxels as acquired, as nnU-Net does."""
    source = read_volume(image_path)
    label = None if label_path is None else read_label(label_path, source)
    target = source.spacing if spacing is None else tuple(float(s) for s in spacing)
    shape = resampled_shape(source.shape, source.spacing, target)
    image = resize(normalize(source.array, mode, window), shape, order=1).astype(np.float32)
    if label is not None:
        label = resize(label, shape, order=0).astype(np.uint8)
    actual = tuple(s * n / m for s, n, m in zip(source.spacing, source.shape, shape, strict=True))
    return Case(volume_stem(source.path), image, label, actual, resampled_affine(source.affine, source.shape, shape),
                source)


def restore(pred: np.ndarray, case: Case, order: int = 1) -> np.ndarray:
    """A prediction on the case's grid `[D,H,W]` (probabilities: order 1; a mask: order 0) put back
    onto the input's grid, whose affine is `case.source.affine`. Threshold probabilities after this."""
    pred = np.asarray(pred)
    if pred.ndim == 4 and pred.shape[-1] == 1:
        pred = pred[..., 0]
    if pred.shape != case.image.shape:
        raise ValueError(f"prediction {pred.shape} is not on the case's grid {case.image.shape}")
    return resize(pred, case.source.shape, order)


def write_mask(path: str | Path, mask: np.ndarray, reference: Volume) -> Path:
    """Write a {0,1} uint8 mask `[D,H,W]` as NIfTI (`.nii.gz` or `.nii` from the name) with the
    reference volume's affine and header, so ITK-SNAP or 3D Slicer overlays it on the image.
    Written atomically: the file appears whole or not at all."""
    import nibabel as nib

    path = Path(path)
    if not is_nifti(path):
        raise DsalError(f"mask path {path} must end in .nii.gz or .nii")
    mask = np.asarray(mask)
    if mask.ndim == 4 and mask.shape[-1] == 1:
        mask = mask[..., 0]
    if mask.shape != reference.shape:
        raise ValueError(f"mask {mask.shape} is not on {reference.path}'s grid {reference.shape}; restore it first")
    header = reference.header.copy()
    header.set_data_dtype(np.uint8)
    img = nib.Nifti1Image((mask > 0.5).astype(np.uint8), reference.affine, header=header)
    img.header.set_slope_inter(1.0, 0.0)  # the image's intensity scaling must not rescale a mask
    data = img.to_bytes()
    if path.name.lower().endswith(".gz"):
        data = gzip.compress(data, compresslevel=6, mtime=0)
    atomic_write(path, lambda tmp: tmp.write_bytes(data))
    return path
