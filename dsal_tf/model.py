"""Deeply supervised U-Net, 2D or 3D (docs/methods.md#network).

Layout: NHWC for images, NDHWC for volumes (the rank comes from `input_shape`). Outputs are
named: `main` (full resolution), `side_1` (the decoder block at 1/4 resolution, upsampled x4) and
`side_2` (the 1/2 block, upsampled x2). Each head is a 1x1 conv producing logits (layers
`<head>_logits`) followed by a float32 sigmoid, so mixed precision keeps the probabilities in
float32.

Matched to the reference code: dropout only at the bottleneck, and side-head logits upsampled by
nearest neighbour (each coarse pixel becomes a block; bilinear would smooth the side masks and
raise their agreement with the main head). `with_features` adds the bottleneck features of the
same forward pass as a named output for diversity-aware selection.

The 3D graph is the 2D one with Conv3D / MaxPooling3D / Conv3DTranspose / UpSampling3D and the
same layer and head names, so losses, deep-supervision weights and strategies serve both ranks.
"""

from __future__ import annotations

import keras
from keras import layers

HEADS = ("main", "side_1", "side_2")


NORMS = ("none", "batch", "instance")


@keras.saving.register_keras_serializable(package="dsal_tf")
class LinearUpSampling3D(layers.Layer):
    """Trilinear upsampling of NDHWC by an integer factor: the 3D twin of
    `UpSampling2D(interpolation="bilinear")` (half-pixel centres, edges clamped), done one axis at
    a time, since Keras has no 3D resize."""

    def __init__(self, size: int = 2, **kwargs):
        super().__init__(**kwargs)
        self.size = int(size)

    def call(self, x):
        for axis in (1, 2, 3):
            x = _linear_up_axis(x, self.size, axis)
        return x

    def compute_output_shape(self, input_shape):
        return (input_shape[0], *(None if d is None else d * self.size for d in input_shape[1:4]), input_shape[4])

    def get_config(self):
        return {**super().get_config(), "size": self.size}


def _linear_up_axis(x, s: int, axis: int):
    """Upsample `x` by `s` along `axis`: output i*s + k samples input coordinate i + (k + 0.5)/s - 0.5."""
    from keras import ops

    def part(start, stop):
        return x[(slice(None),) * axis + (slice(start, stop),)]

    prev = ops.concatenate([part(0, 1), part(None, -1)], axis=axis)
    nxt = ops.concatenate([part(1, None), part(-1, None)], axis=axis)
    parts = []
    for k in range(s):
        f = (k + 0.5) / s - 0.5
        parts.append(x * (1.0 + f) - prev * f if f < 0 else x * (1.0 - f) + nxt * f)
    y = ops.stack(parts, axis=axis + 1)
    shape = list(ops.shape(x))
    shape[axis] = shape[axis] * s
    return ops.reshape(y, [-1, *shape[1:]])


# The layer classes of each spatial rank; names stay the same, so the two graphs read alike.
_RANK_LAYERS = {
    2: {"conv": layers.Conv2D, "pool": layers.MaxPooling2D, "up": layers.Conv2DTranspose,
        "gap": layers.GlobalAveragePooling2D},
    3: {"conv": layers.Conv3D, "pool": layers.MaxPooling3D, "up": layers.Conv3DTranspose,
        "gap": layers.GlobalAveragePooling3D},
}


def _upsample(scale: int, interpolation: str, rank: int, name: str) -> layers.Layer:
    """The side heads' logit upsampling: nearest or (bi/tri)linear, by `scale` on every spatial axis."""
    if rank == 2:
        return layers.UpSampling2D(scale, interpolation=interpolation, name=name)
    if interpolation == "nearest":
        return layers.UpSampling3D(scale, name=name)
    if interpolation in ("bilinear", "trilinear"):
        return LinearUpSampling3D(scale, name=name)
    raise ValueError(f"side_upsampling {interpolation!r} has no 3D form; use 'nearest' or 'bilinear'")


def _block(x, filters: int, name: str, norm: str = "none", rank: int = 2):
    """Two 3x3 (3x3x3) convs with ReLU; with `norm` a batch or instance norm sits between conv and ReLU."""
    conv = _RANK_LAYERS[rank]["conv"]
    for i in (1, 2):
        if norm == "none":
            x = conv(filters, 3, padding="same", activation="relu",
                     kernel_initializer="he_normal", name=f"{name}_conv{i}")(x)
            continue
        x = conv(filters, 3, padding="same", use_bias=False,
                 kernel_initializer="he_normal", name=f"{name}_conv{i}")(x)
        if norm == "batch":
            x = layers.BatchNormalization(name=f"{name}_bn{i}")(x)
        else:  # instance norm = group norm with one group per channel
            x = layers.GroupNormalization(groups=-1, name=f"{name}_in{i}")(x)
        x = layers.Activation("relu", name=f"{name}_relu{i}")(x)
    return x


def build_unet(
    input_shape: tuple[int | None, ...],
    base_filters: int = 32,
    depth: int = 4,
    dropout: float = 0.5,
    name: str = "ds_unet",
    side_upsampling: str = "nearest",
    dropout_at: str = "bottleneck",
    norm: str = "none",
) -> keras.Model:
    """U-Net with `depth` down and up blocks and two deep-supervision side heads.

    Dropout (rate `dropout`) follows the bottleneck block only, as in the reference code; with
    `training=True` it gives CEAL's MC-dropout passes. `dropout_at = "bottleneck+deepest"` and
    `side_upsampling = "bilinear"` give the pre-issue-8 variant (dropout also after the deepest
    encoder block, feeding its skip and its pooling; smooth side heads). With `norm = "none"` (the
    reference) `training=True` changes nothing but dropout; with "batch" it also switches batch
    statistics, so MC passes see them.

    `input_shape` is (H, W, C) for images or (D, H, W, C) for volumes (patches); each spatial size
    must divide by 2**depth. In 3D, `side_upsampling = "bilinear"` (or "trilinear") is trilinear.
    """
    if depth < 3:
        raise ValueError("depth must be >= 3: the side heads sit on the 1/4 and 1/2 decoder blocks")
    rank = len(input_shape) - 1
    if rank not in _RANK_LAYERS:
        raise ValueError(f"input_shape {tuple(input_shape)} must be (H, W, C) or (D, H, W, C)")
    kinds = _RANK_LAYERS[rank]
    inputs = keras.Input(shape=input_shape, name="image")
    skips = []
    x = inputs
    for level in range(depth):
        x = _block(x, base_filters * 2**level, f"enc{level}", norm, rank)
        if level == depth - 1 and dropout > 0 and dropout_at == "bottleneck+deepest":
            x = layers.Dropout(dropout, name=f"enc{level}_dropout")(x)
        skips.append(x)
        x = kinds["pool"](2, name=f"enc{level}_pool")(x)
    x = _block(x, base_filters * 2**depth, "bottleneck", norm, rank)
    if dropout > 0:
        x = layers.Dropout(dropout, name="bottleneck_dropout")(x)

    decoded = {}  # scale divisor -> decoder features
    for level in reversed(range(depth)):
        filters = base_filters * 2**level
        x = kinds["up"](filters, 2, strides=2, padding="same", name=f"dec{level}_up")(x)
        x = layers.Concatenate(name=f"dec{level}_concat")([x, skips[level]])
        x = _block(x, filters, f"dec{level}", norm, rank)
        decoded[2**level] = x

    def head(features, scale: int, head_name: str):
        logits = kinds["conv"](1, 1, name=f"{head_name}_logits")(features)
        if scale > 1:
            logits = _upsample(scale, side_upsampling, rank, f"{head_name}_up")(logits)
        return layers.Activation("sigmoid", dtype="float32", name=head_name)(logits)

    outputs = {
        "main": head(decoded[1], 1, "main"),
        "side_1": head(decoded[4], 4, "side_1"),
        "side_2": head(decoded[2], 2, "side_2"),
    }
    return keras.Model(inputs, outputs, name=name)


FEATURES_LAYER = "bottleneck_conv2"


def with_features(model: keras.Model) -> keras.Model:
    """The same graph and weights with one more named output, `features` [N, C]: the bottleneck
    block's activations, global-average-pooled (taken before the dropout, so MC passes agree);
    2D or 3D, following the model's rank."""
    bottleneck = model.get_layer(FEATURES_LAYER).output
    feats = _RANK_LAYERS[len(bottleneck.shape) - 2]["gap"](name="features")(bottleneck)
    outputs = {name: model.get_layer(name).output for name in HEADS}
    return keras.Model(model.inputs, {**outputs, "features": feats}, name=f"{model.name}_features")


def unet_for(cfg, input_shape: tuple | None = None) -> keras.Model:
    """The run's U-Net from its `Config` (filters, depth and the variant switches); `input_shape` is the
    space's `model_input_shape` (default: IMG_ROWS x IMG_COLS x channels, the 2D space's)."""
    shape = input_shape or (cfg.img_rows, cfg.img_cols, cfg.channels)
    return build_unet(tuple(shape), cfg.base_filters, cfg.depth, cfg.dropout,
                      side_upsampling=cfg.side_upsampling, dropout_at=cfg.dropout_at, norm=cfg.norm)


def _computes_in(model: keras.Model) -> set[str]:
    return {layer.dtype_policy.compute_dtype for layer in model.layers if layer.weights}


_FLOAT32_COPIES: dict[int, tuple] = {}  # id(model) -> (weakref to the model, its float32 twin)


def float32_copy(model: keras.Model) -> keras.Model:
    """The same graph computing in float32, holding `model`'s current weights and dropout-generator
    states: what scoring uses where bf16 moves a strategy's picks (CEAL's MC-dropout variance) while
    training stays in bf16. Mixed-precision models keep their variables in float32, so the copy is
    exact. A float32 model is returned as it is. The twin is built once per model and refreshed on
    every call, so a scoring pass traced on it is reused round after round."""
    import weakref

    if _computes_in(model) <= {"float32"}:
        return model
    entry = _FLOAT32_COPIES.get(id(model))
    twin = entry[1] if entry is not None and entry[0]() is model else None
    if twin is None:
        config = model.get_config()
        for layer in config["layers"]:
            if layer["class_name"] != "InputLayer":
                layer["config"]["dtype"] = "float32"
        twin = model.__class__.from_config(config)
        for key in [k for k, (ref, _) in _FLOAT32_COPIES.items() if ref() is None]:
            del _FLOAT32_COPIES[key]
        _FLOAT32_COPIES[id(model)] = (weakref.ref(model), twin)
    for layer in model.layers:  # layer by layer: weights and dropout seed states, in each layer's order
        for dst, src in zip(twin.get_layer(layer.name).variables, layer.variables, strict=True):
            dst.assign(src)
    return twin
