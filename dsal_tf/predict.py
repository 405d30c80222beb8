"""Masks for a folder of new images or volumes with a trained run (`dsal predict`), nnU-Net style:
the output keeps every input's name and original size (a volume's grid and affine).

The run's space (`space.run_space`: 2D images or NIfTI volumes, from what the run recorded) picks
its `Predictor` from `PREDICTORS`, which lists and checks the inputs, then writes their masks; a
file of the other kind is one line. (The spaces cannot hold this themselves: the 2D pass needs the
DSAL agreement from `strategies`, which import `space`.)

Images: `tf.data` decodes files in parallel (OpenCV, area-resized to the model's size), one
compiled pass per batch gives the main head's probabilities and the side-head agreement (DSAL's
score, a per-image quality flag: low agreement = look at this one), then each probability map is
resized to the image's original size *before* thresholding at 0.5.

Volumes: one file at a time through `volume_space.predict_file` (normalised and resampled as the
run's volumes were, Gaussian sliding windows, probabilities resampled back to the file's grid
before thresholding, written with its affine and header).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from .config import Config
from .data import IMAGE_EXTS, Normalizer, list_images, read_image, steady
from .errors import DsalError
from .evaluate import saved_config
from .files import atomic_write
from .run import Run
from .space import THRESHOLD, ImageSpace, VolumeSpace, original_size, run_space, to_original  # noqa: F401
from .volume_space import predict_file
from .volumes import NIFTI_EXTS, list_volumes, read_header, volume_stem


def choose_round(run: Path, which: str | int) -> int:
    """`best` (highest validation Dice), `last` (latest complete round) or a round number."""
    return Run(run).choose(which)


def load_round(cfg: Config, which: str | int = "best"):
    """(run config, round, plain U-Net, normalizer) of a finished round of `cfg`'s run."""
    cfg = saved_config(cfg)
    run = Run.of(cfg)
    r = run.choose(which)
    return cfg, r, run.load_model(r), run.normalizer()


def _check_folders(in_dir: Path, out_dir: Path) -> None:
    if not in_dir.is_dir():
        raise DsalError(f"input folder {in_dir} not found; pass -i FOLDER with the images to segment")
    if out_dir.resolve() == in_dir.resolve():
        raise DsalError(f"-o {out_dir} is the input folder; write the masks to another folder")


def _check_inputs(in_dir: Path, out_dir: Path) -> list[Path]:
    _check_folders(in_dir, out_dir)
    return image_inputs(in_dir)


def image_inputs(in_dir: Path, run_name: str | None = None) -> list[Path]:
    """The images of `in_dir` for a 2D run, checked: a NIfTI file among them (with `run_name`), two
    images writing the same mask, an empty or undecodable file: one line naming the file."""
    volumes = list_volumes(in_dir)
    if volumes and run_name is not None:
        raise DsalError(f"{volumes[0]} is a NIfTI volume but run {run_name} was trained on 2D images; "
                        f"predict volumes with a run trained on volumes, or remove it from {in_dir}")
    files = list_images(in_dir)
    if not files:
        raise DsalError(f"input folder {in_dir} has no images ({', '.join(IMAGE_EXTS)})")
    stems: dict[str, Path] = {}
    for f in files:
        if f.stem in stems:
            raise DsalError(f"{stems[f.stem].name} and {f.name} would both write {f.stem}.png; rename one")
        stems[f.stem] = f
        if os.path.getsize(f) == 0 or not cv2.haveImageReader(str(f)):
            raise DsalError(f"{f} is empty or not an image; replace or remove it")
    return files


def image_dataset(files: list[Path], rows: int, cols: int, color: str, batch_size: int):
    """Batches of (uint8 images at the model size, original (rows, cols), decoded-ok flag)."""
    import tensorflow as tf

    channels = 3 if color == "rgb" else 1

    def decode(path):
        try:
            img = read_image(Path(path.decode()), color)
        except DsalError:
            return np.zeros((rows, cols, channels), np.uint8), np.zeros(2, np.int32), np.int32(0)
        shape = np.array(img.shape[:2], np.int32)
        img = cv2.resize(img, (cols, rows), interpolation=cv2.INTER_AREA).reshape(rows, cols, channels)
        return img, shape, np.int32(1)

    def load(path):
        img, shape, ok = tf.numpy_function(decode, [path], [tf.uint8, tf.int32, tf.int32])
        img.set_shape((rows, cols, channels))
        shape.set_shape((2,))
        ok.set_shape(())
        return img, shape, ok

    ds = tf.data.Dataset.from_tensor_slices([str(f) for f in files])
    return steady(ds.map(load, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size).prefetch(tf.data.AUTOTUNE))


def predict_step(model, normalizer: Normalizer):
    """A compiled step: uint8 batch -> main-head probabilities and side-head agreement per image."""
    import tensorflow as tf

    from .strategies.dsal import agreement

    @tf.function(reduce_retracing=True)
    def step(x):
        out = model(normalizer(x), training=False)
        return out["main"], agreement(out["main"], out["side_1"], out["side_2"])

    return step


@dataclass(frozen=True)
class PredictSettings:
    """The options of `dsal predict`: `which` round (`best`, `last` or a number); also write `probabilities`
    and `overlays`; flag images whose side-head agreement is below `flag_below`; `batch_size` (None: the
    run's); show a `progress` bar. The positional order is `predict_folder`'s."""

    which: str | int = "best"
    probabilities: bool = False
    overlays: bool = False
    flag_below: float = 0.8
    batch_size: int | None = None
    progress: bool = True


def predict_folder(cfg: Config, in_dir: str | Path, out_dir: str | Path, *args,
                   settings: PredictSettings | None = None, log=print, **options) -> pd.DataFrame:
    """Write `<stem>.png` (0/255, original size) for every image of `in_dir` into `out_dir`, plus
    `predictions.csv` (size, foreground fraction, agreement, `check` where agreement < `flag_below`);
    `probabilities/<stem>.png` (p x 255) and `overlays/<stem>.jpg` on request. A volume run writes a
    {0,1} NIfTI mask under each volume's own file name, on its grid with its affine, and
    `probabilities/<file>` (uint8 p x 255, scl_slope 1/255) on request.

    Either `settings`, or the `PredictSettings` fields as arguments: `predict_folder(cfg, in_dir, out_dir,
    which, probabilities, overlays, flag_below, batch_size, progress)`, any of them by keyword."""
    if settings is None:
        settings = PredictSettings(*args, **options)
    elif args or options:
        raise TypeError("predict_folder takes either settings= or the PredictSettings fields, not both")
    return predict_images(cfg, in_dir, out_dir, settings, log)


def predict_images(cfg: Config, in_dir: str | Path, out_dir: str | Path, settings: PredictSettings,
                   log=print) -> pd.DataFrame:
    """`predict_folder` with its options in `settings`; images or volumes, as the run's space decides."""
    from tqdm.auto import tqdm

    s = settings
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    _check_folders(in_dir, out_dir)
    cfg, r, model, normalizer = load_round(cfg, s.which)
    space = run_space(cfg, normalizer)
    predictor = PREDICTORS[type(space)]
    files = predictor.inputs(space, in_dir, s)
    t0 = time.perf_counter()
    with tqdm(total=len(files), desc="predicting", unit=predictor.item, disable=not s.progress, leave=False) as bar:
        rows, failed = predictor.write(space, model, normalizer, files, out_dir, s, bar.update)
    seconds = time.perf_counter() - t0
    table = pd.DataFrame(rows, columns=list(rows[0]) if rows else ["name", "file", "foreground_fraction",
                                                                   "agreement"])
    table["check"] = (table["agreement"] < s.flag_below).astype(bool)
    atomic_write(out_dir / "predictions.csv", lambda tmp: table.to_csv(tmp, index=False))
    log(f"{len(table)} masks from round {r} of {cfg.name} in {out_dir}/ ({len(files) / seconds:.1f} "
        f"{predictor.item}s/s); {int(table['check'].sum())} with side-head agreement < {s.flag_below} are flagged "
        "in predictions.csv")
    if failed:
        raise DsalError(f"{len(failed)} {predictor.item}(s) could not be decoded, e.g. {failed[0]}; "
                        f"replace or remove them (the other masks are written)")
    return table


# ------------------------------------------------------------------ 2D images
def checked_images(space: ImageSpace, folder: Path, settings: PredictSettings) -> list[Path]:
    """The images of `folder` for a 2D run; a NIfTI volume among them is one line."""
    return image_inputs(folder, space.cfg.name)


def predict_image_files(space: ImageSpace, model, normalizer: Normalizer, files: list[Path], out_dir: Path,
                        settings: PredictSettings, done=lambda n: None) -> tuple[list[dict], list[Path]]:
    """`<stem>.png` masks (and probabilities, overlays) of `files`, batch by batch: one row per written
    mask, and the files that could not be decoded. `done(n)` after each batch."""
    s, cfg = settings, space.cfg
    out_dir.mkdir(parents=True, exist_ok=True)
    for sub, wanted in (("probabilities", s.probabilities), ("overlays", s.overlays)):
        if wanted:
            (out_dir / sub).mkdir(exist_ok=True)
    step = predict_step(model, normalizer)
    rows, failed = [], []
    i = 0
    for x, shapes, ok in image_dataset(files, cfg.img_rows, cfg.img_cols, cfg.color, s.batch_size or cfg.batch_size):
        prob, agree = (t.numpy() for t in step(x))
        for p, a, shape, good in zip(prob, agree, shapes.numpy(), ok.numpy()):
            f = files[i]
            i += 1
            if not good:
                failed.append(f)
                continue
            full = to_original(p, shape)
            mask = (full > THRESHOLD).astype(np.uint8)
            cv2.imwrite(str(out_dir / f"{f.stem}.png"), mask * 255)
            if s.probabilities:
                cv2.imwrite(str(out_dir / "probabilities" / f"{f.stem}.png"),
                            np.round(full * 255).astype(np.uint8))
            if s.overlays:
                _write_overlay(f, mask, out_dir / "overlays" / f"{f.stem}.jpg", cfg.color)
            rows.append({"name": f.stem, "file": f.name, "height": int(shape[0]), "width": int(shape[1]),
                         "foreground_fraction": round(float(mask.mean()), 6), "agreement": round(float(a), 6)})
        done(len(prob))
    return rows, failed


# ------------------------------------------------------------------ 3D volumes
def checked_volumes(space: VolumeSpace, folder: Path, settings: PredictSettings) -> list[Path]:
    """The NIfTI volumes of `folder` for a volume run, checked from their headers before any is
    predicted: a 2D image or a 2D NIfTI (the run is 3D), a 4D or unreadable file, or two files of one
    name: one line naming the file and the fix."""
    name = space.cfg.name
    images = list_images(folder)
    if images:
        raise DsalError(f"{images[0]} is a 2D image but run {name} was trained on 3D volumes; "
                        f"predict it with a run trained on 2D images, or remove it from {folder}")
    files = list_volumes(folder)
    if not files:
        raise DsalError(f"input folder {folder} has no volumes ({', '.join(NIFTI_EXTS)})")
    names: dict[str, Path] = {}
    for f in files:
        stem = volume_stem(f)
        if stem in names:
            raise DsalError(f"{names[stem].name} and {f.name} are both volume {stem}; rename or remove one")
        names[stem] = f
        flat = _flat_shape(f)
        if flat is not None:
            raise DsalError(f"{f} is a 2D NIfTI image ({'x'.join(map(str, flat))}) but run {name} was trained on "
                            f"3D volumes; predict it with a run trained on 2D images, or remove it from {folder}")
        read_header(f)
    return files


def _flat_shape(path: Path) -> tuple | None:
    """The shape of a NIfTI file with fewer than three axes longer than 1 (a 2D image), else None
    (an unreadable file included: `read_header` names it)."""
    import nibabel as nib

    try:
        shape = tuple(nib.load(str(path)).shape)
    except Exception:  # noqa: BLE001 - nibabel raises many kinds for one cause: a bad file
        return None
    return shape if sum(n > 1 for n in shape) < 3 else None


def predict_volume_files(space: VolumeSpace, model, normalizer, files: list[Path], out_dir: Path,
                         settings: PredictSettings, done=lambda n: None) -> tuple[list[dict], list[Path]]:
    """One mask per volume, named as its file (`.nii.gz` or `.nii`), on its grid with its affine and
    header (`volume_space.predict_file`), and on request `probabilities/<file>` and `overlays/<name>.jpg`
    (the mask's contour in red on three planes through its largest cross-sections): one row per written
    mask, and the files whose voxels could not be read (the others are written)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    probabilities = out_dir / "probabilities" if settings.probabilities else None
    overlays = out_dir / "overlays" if settings.overlays else None
    for folder in (probabilities, overlays):
        if folder is not None:
            folder.mkdir(exist_ok=True)
    batch_size = settings.batch_size or space.cfg.batch_size
    rows, failed = [], []
    for f in files:
        try:
            got = predict_file(model, f, out_dir / f.name, normalizer, batch_size,
                               None if probabilities is None else probabilities / f.name,
                               None if overlays is None else overlays / f"{volume_stem(f)}.jpg")
        except DsalError:  # the headers were checked: the voxels are truncated or corrupt
            failed.append(f)
        else:
            d, h, w = got["shape"]
            rows.append({"name": volume_stem(f), "file": f.name, "depth": d, "height": h, "width": w,
                         "foreground_fraction": round(got["foreground"] / (d * h * w), 6),
                         "agreement": round(float(got["agreement"]), 6)})
        done(1)
    return rows, failed


@dataclass(frozen=True)
class Predictor:
    """`dsal predict` in one space: what an input is called, `inputs(space, folder, settings)` (the files
    it reads, checked) and `write(space, model, normalizer, files, out_dir, settings, done)` -> (rows,
    files that could not be read)."""

    item: str
    inputs: Callable
    write: Callable


PREDICTORS = {ImageSpace: Predictor("image", checked_images, predict_image_files),
              VolumeSpace: Predictor("volume", checked_volumes, predict_volume_files)}


def _write_overlay(path: Path, mask: np.ndarray, out: Path, color: str) -> None:
    """The mask's contour in red over its image at the image's own size (`overlays.tile`)."""
    from .overlays import tile, write_grid

    img = read_image(path, color)
    write_grid([[tile(img, None, mask, height=None, thickness=max(1, round(max(img.shape[:2]) / 300)))]], out)
