"""Masks for a folder of new images with a trained run (`dsal predict`), nnU-Net style: the output
keeps every input's name and original size.

Pipeline: `tf.data` decodes files in parallel (OpenCV, area-resized to the model's size), one
compiled pass per batch gives the main head's probabilities and the side-head agreement (DSAL's
score, a per-image quality flag: low agreement = look at this one), then each probability map is
resized to the image's original size *before* thresholding at 0.5.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from .config import Config
from .data import IMAGE_EXTS, Normalizer, list_images, read_image
from .errors import DsalError
from .evaluate import saved_config
from .files import atomic_write
from .run import Run
from .space import THRESHOLD, original_size, to_original  # noqa: F401 (re-exported)


def choose_round(run: Path, which: str | int) -> int:
    """`best` (highest validation Dice), `last` (latest complete round) or a round number."""
    return Run(run).choose(which)


def load_round(cfg: Config, which: str | int = "best"):
    """(run config, round, plain U-Net, normalizer) of a finished round of `cfg`'s run."""
    cfg = saved_config(cfg)
    run = Run.of(cfg)
    r = run.choose(which)
    return cfg, r, run.load_model(r), run.normalizer()


def _check_inputs(in_dir: Path, out_dir: Path) -> list[Path]:
    if not in_dir.is_dir():
        raise DsalError(f"input folder {in_dir} not found; pass -i FOLDER with the images to segment")
    files = list_images(in_dir)
    if not files:
        raise DsalError(f"input folder {in_dir} has no images ({', '.join(IMAGE_EXTS)})")
    if out_dir.resolve() == in_dir.resolve():
        raise DsalError(f"-o {out_dir} is the input folder; write the masks to another folder")
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
    return ds.map(load, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size).prefetch(tf.data.AUTOTUNE)


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
    `probabilities/<stem>.png` (p x 255) and `overlays/<stem>.jpg` on request.

    Either `settings`, or the `PredictSettings` fields as arguments: `predict_folder(cfg, in_dir, out_dir,
    which, probabilities, overlays, flag_below, batch_size, progress)`, any of them by keyword."""
    if settings is None:
        settings = PredictSettings(*args, **options)
    elif args or options:
        raise TypeError("predict_folder takes either settings= or the PredictSettings fields, not both")
    return predict_images(cfg, in_dir, out_dir, settings, log)


def predict_images(cfg: Config, in_dir: str | Path, out_dir: str | Path, settings: PredictSettings,
                   log=print) -> pd.DataFrame:
    """`predict_folder` with its options in `settings`."""
    from tqdm.auto import tqdm

    s = settings
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    files = _check_inputs(in_dir, out_dir)
    cfg, r, model, normalizer = load_round(cfg, s.which)
    batch_size = s.batch_size or cfg.batch_size
    out_dir.mkdir(parents=True, exist_ok=True)
    for sub, wanted in (("probabilities", s.probabilities), ("overlays", s.overlays)):
        if wanted:
            (out_dir / sub).mkdir(exist_ok=True)
    step = predict_step(model, normalizer)
    rows, failed = [], []
    t0 = time.perf_counter()
    i = 0
    bar = tqdm(total=len(files), desc="predicting", unit="img", disable=not s.progress, leave=False)
    for x, shapes, ok in image_dataset(files, cfg.img_rows, cfg.img_cols, cfg.color, batch_size):
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
                         "foreground_fraction": round(float(mask.mean()), 6), "agreement": round(float(a), 6),
                         "check": bool(a < s.flag_below)})
        bar.update(len(prob))
    bar.close()
    seconds = time.perf_counter() - t0
    table = pd.DataFrame(rows, columns=["name", "file", "height", "width", "foreground_fraction", "agreement",
                                        "check"])
    atomic_write(out_dir / "predictions.csv", lambda tmp: table.to_csv(tmp, index=False))
    log(f"{len(table)} masks from round {r} of {cfg.name} in {out_dir}/ ({len(files) / seconds:.1f} images/s); "
        f"{int(table['check'].sum())} with side-head agreement < {s.flag_below} are flagged in predictions.csv")
    if failed:
        raise DsalError(f"{len(failed)} image(s) could not be decoded, e.g. {failed[0]}; "
                        f"replace or remove them (the other masks are written)")
    return table


def _write_overlay(path: Path, mask: np.ndarray, out: Path, color: str) -> None:
    img = read_image(path, color)
    img = img if img.ndim == 3 else cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    img = np.ascontiguousarray(img)
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(img, contours, -1, (255, 0, 0), max(1, round(max(img.shape[:2]) / 300)))
    cv2.imwrite(str(out), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
