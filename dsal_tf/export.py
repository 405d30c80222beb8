"""A trained round as a deployable model (`dsal export`): the main head only, built for the run's
space (`space.run_space`) by its entry of `SERVING`.

A 2D run: resizing and normalization inside the graph, so the exported model takes raw uint8 images.
Input `image`: uint8 [N,h,w,C] (C = 3 RGB or 1 gray, NHWC), any h and w; it is resized inside
(bilinear) to the trained size, so images of the trained size give exactly the run's probabilities.
Output `probability`: float32 [N,H,W,1] at the trained size; threshold it at 0.5.

A volume run (`volume_serving`): the network on windows. Input `window`:
float32 [N,d,h,w,1] (NDHWC) of a volume normalised and resampled as `preprocessing` in the sidecar
says, each side a multiple of 2**DEPTH (the trained patch is one); output `probability` float32
[N,d,h,w,1]. Normalising, resampling and the Gaussian sliding windows stay outside the graph (they
depend on the whole volume and its header); the sidecar records every setting they need.

Written with Keras' own `Model.export` (TensorFlow SavedModel, or ONNX through tf2onnx, extra `[onnx]`),
plus `dsal_export.json` describing the input, the output and the run it came from.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .config import Config
from .errors import DsalError
from .files import atomic_write_text
from .predict import THRESHOLD, load_round
from .sliding import OVERLAP, SIGMA_SCALE
from .space import ImageSpace, VolumeSpace, run_space

FORMATS = {"savedmodel": "tf_saved_model", "onnx": "onnx"}
SIDECAR = "dsal_export.json"


def serving_model(unet, normalizer, rows: int, cols: int, channels: int):
    """uint8 image -> resize -> /255 -> z-score -> U-Net -> main head, as one Keras model."""
    import keras
    from keras import layers, ops

    mean = np.asarray(normalizer.mean, np.float32)
    std = np.asarray(normalizer.std, np.float32)

    class Preprocess(layers.Layer):
        """Bilinear resize to the trained size (`ops.image.resize`: the identity at that size; Keras'
        `Resizing` layer is not, on inputs of unknown size, in Keras 3.15), then the run's normalization
        with its statistics as constants (an ONNX graph then has one input)."""

        def call(self, x):
            x = ops.image.resize(ops.cast(x, "float32"), (rows, cols), interpolation="bilinear")
            return (x / 255.0 - mean) / std

        def compute_output_shape(self, shape):
            return (shape[0], rows, cols, shape[-1])

    image = keras.Input((None, None, channels), dtype="uint8", name="image")
    prob = layers.Identity(name="probability")(unet(Preprocess(name="preprocess")(image))["main"])
    return keras.Model(image, prob, name="dsal_serving")


def image_serving(space: ImageSpace, unet, normalizer) -> tuple[object, np.ndarray, dict]:
    """A 2D run's serving model, an example input to build it, and its sidecar entries."""
    cfg = space.cfg
    model = serving_model(unet, normalizer, cfg.img_rows, cfg.img_cols, cfg.channels)
    example = np.zeros((1, cfg.img_rows, cfg.img_cols, cfg.channels), np.uint8)
    sidecar = {
        "input": {"name": "image", "dtype": "uint8", "layout": "NHWC", "channels": cfg.channels,
                  "color": cfg.color, "trained_size": [cfg.img_rows, cfg.img_cols],
                  "resize": "bilinear inside the model; any size is accepted"},
        "output": {"name": "probability", "dtype": "float32", "shape": ["N", cfg.img_rows, cfg.img_cols, 1],
                   "threshold": THRESHOLD},
        "normalization": {"mode": cfg.normalization, "mean": normalizer.mean, "std": normalizer.std},
    }
    return model, example, sidecar


def volume_serving(space: VolumeSpace, unet, normalizer) -> tuple[object, np.ndarray, dict]:
    """A volume run's serving model (the main head on windows of the preprocessed volume), an example
    window, and its sidecar entries. Normalising and resampling need the whole volume and its header,
    and the windows are a loop, so they stay outside the graph; the sidecar records every setting."""
    import keras
    from keras import layers

    window = keras.Input((None, None, None, 1), dtype="float32", name="window")
    model = keras.Model(window, layers.Identity(name="probability")(unet(window)["main"]), name="dsal_serving")
    patch = [int(p) for p in normalizer.patch_size]
    ct = normalizer.normalization == "ct"
    sidecar = {
        "input": {"name": "window", "dtype": "float32", "layout": "NDHWC", "channels": 1, "patch_size": patch,
                  "multiple_of": 2 ** int(space.cfg.depth),
                  "content": "a window of the preprocessed volume; each side a multiple of multiple_of"},
        "output": {"name": "probability", "dtype": "float32", "shape": ["N", "d", "h", "w", 1],
                   "threshold": THRESHOLD},
        "preprocessing": {"normalization": normalizer.normalization,
                          "ct_window": list(normalizer.ct_window) if ct else None,
                          "spacing": [float(s) for s in normalizer.spacing],
                          "steps": "normalise the whole volume as read (zscore: its own mean and std; ct: clip to "
                                   "ct_window, scale to [0, 1]), then resample it linearly to spacing (mm per "
                                   "voxel axis, the file's own axes, never reoriented)"},
        "sliding_window": {"patch_size": patch, "overlap": OVERLAP, "blend": "gaussian", "sigma_scale": SIGMA_SCALE,
                           "region": "the box of non-zero voxels of the preprocessed volume; 0 outside"},
        "postprocessing": "resample the probabilities linearly back to the input's grid, then threshold; write "
                          "the mask with the input's affine",
    }
    return model, np.zeros((1, *patch, 1), np.float32), sidecar


SERVING = {ImageSpace: image_serving, VolumeSpace: volume_serving}  # the run's space -> its serving model


def export_model(cfg: Config, out_dir: str | Path, fmt: str = "savedmodel", which: str | int = "best",
                 log: Callable[[str], None] = print) -> Path:
    """Write the export of a finished round into `out_dir`; returns the model's path."""
    import tensorflow as tf
    if fmt not in FORMATS:
        raise DsalError(f"--format {fmt!r} is not one of {sorted(FORMATS)}")
    run_cfg, r, unet, normalizer = load_round(cfg, which)
    space = run_space(run_cfg, normalizer)
    model, example, entries = SERVING[type(space)](space, unet, normalizer)
    model(example)  # built before export
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / ("model.onnx" if fmt == "onnx" else "savedmodel")
    eager = tf.config.functions_run_eagerly()
    tf.config.run_functions_eagerly(False)  # an export is a traced graph, even where functions run eagerly
    try:
        model.export(str(target), format=FORMATS[fmt], verbose=False)
    except ImportError as exc:
        raise DsalError(f"ONNX export needs tf2onnx: pip install 'dsal-tf[onnx]' ({exc})") from None
    finally:
        tf.config.run_functions_eagerly(eager)
    sidecar = {"format": fmt, "model": target.name, **entries,
               "source": {"exp": run_cfg.name, "round": r, "config": run_cfg.to_dict()}}
    atomic_write_text(out_dir / SIDECAR, json.dumps(sidecar, indent=2))
    log(f"exported round {r} of {run_cfg.name} as {fmt}: {target} (+ {SIDECAR})")
    return target
