"""What a data folder holds, by file names alone: the split names, image and NIfTI extensions, the
sorted listings, and whether a dataset is 2D or 3D. A leaf module (it imports nothing of the package but
its errors), so that the configuration can ask for the rank (`LOSS = "auto"`) without an import cycle."""

from __future__ import annotations

from pathlib import Path

from .errors import DsalError

SPLITS = ("train", "val", "test")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
NIFTI_EXTS = (".nii.gz", ".nii")


def list_images(folder: Path) -> list[Path]:
    """Image files of a folder, sorted by name (hidden files skipped); [] if it does not exist."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS and not p.name.startswith("."))


def is_nifti(path: str | Path) -> bool:
    return str(path).lower().endswith(NIFTI_EXTS)


def list_volumes(folder: Path) -> list[Path]:
    """NIfTI files of a folder, sorted by name (hidden files skipped); [] if it does not exist."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if is_nifti(p) and not p.name.startswith("."))


def dataset_rank(data_path: str | Path) -> int:
    """3 when the split folders (`trainImg`, `valImg`, `testImg`) hold NIfTI volumes, 2 otherwise
    (images, or nothing yet: the 2D loader names what is missing). A dataset that mixes the two,
    in one folder or across folders, is one line naming a file of each kind."""
    volumes, images = [], []
    for split in SPLITS:
        folder = Path(data_path) / f"{split}Img"
        volumes += list_volumes(folder)[:1]
        images += list_images(folder)[:1]
    if volumes and images:
        raise DsalError(f"{images[0]} is a 2D image but {volumes[0]} is a NIfTI volume; a dataset holds one kind: "
                        "convert the images to .nii.gz or move the volumes to their own dataset")
    return 3 if volumes else 2
