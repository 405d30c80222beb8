"""A trained round as a deployable model (`dsal export`): the main head only, with resizing and
normalization inside the graph, so the exported model takes raw uint8 images.

Input `image`: uint8 [N,h,w,C] (C = 3 RGB or 1 gray, NHWC), any h and w; it is resized inside
(bilinear) to the trained size, so images of the trained size give exactly the run's probabilities.
Output `probability`: float32 [N,H,W,1] at the trained size; threshold it at 0.5.
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


def export_model(cfg: Config, out_dir: str | Path, fmt: str = "savedmodel", which: str | int = "best",
                 log: Callable[[str], None] = print) -> Path:
    """Write the export of a finished round into `out_dir`; returns the model's path."""
    if fmt not in FORMATS:
        raise DsalError(f"--format {fmt!r} is not one of {sorted(FORMATS)}")
    run_cfg, r, unet, normalizer = load_round(cfg, which)
    model = serving_model(unet, normalizer, run_cfg.img_rows, run_cfg.img_cols, run_cfg.channels)
    model(np.zeros((1, run_cfg.img_rows, run_cfg.img_cols, run_cfg.channels), np.uint8))  # built before export
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / ("model.onnx" if fmt == "onnx" else "savedmodel")
    try:
        model.export(str(target), format=FORMATS[fmt], verbose=False)
    except ImportError as exc:
        raise DsalError(f"ONNX export needs tf2onnx: pip install 'dsal-tf[onnx]' ({exc})") from None
    sidecar = {
        "format": fmt, "model": target.name,
        "input": {"name": "image", "dtype": "uint8", "layout": "NHWC", "channels": run_cfg.channels,
                  "color": run_cfg.color, "trained_size": [run_cfg.img_rows, run_cfg.img_cols],
                  "resize": "bilinear inside the model; any size is accepted"},
        "output": {"name": "probability", "dtype": "float32", "shape": ["N", run_cfg.img_rows, run_cfg.img_cols, 1],
                   "threshold": THRESHOLD},
        "normalization": {"mode": run_cfg.normalization, "mean": normalizer.mean, "std": normalizer.std},
        "source": {"exp": run_cfg.name, "round": r, "config": run_cfg.to_dict()},
    }
    atomic_write_text(out_dir / SIDECAR, json.dumps(sidecar, indent=2))
    log(f"exported round {r} of {run_cfg.name} as {fmt}: {target} (+ {SIDECAR})")
    return target
