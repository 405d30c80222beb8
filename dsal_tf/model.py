"""Deeply supervised 2D U-Net (METHODS.md section 1).

Layout: NHWC. Outputs are named: `main` (full resolution), `side_1` (the decoder block at 1/4
resolution, upsampled x4) and `side_2` (the 1/2 block, upsampled x2). Each head is a 1x1 conv
producing logits (layers `<head>_logits`) followed by a float32 sigmoid, so mixed precision
keeps the probabilities in float32.

Matched to the reference code: dropout only at the bottleneck, and side-head logits upsampled by
nearest neighbour (each coarse pixel becomes a block; bilinear would smooth the side masks and
raise their agreement with the main head). `with_features` adds the bottleneck features of the
same forward pass as a named output for diversity-aware selection.
"""

from __future__ import annotations

import keras
from keras import layers

HEADS = ("main", "side_1", "side_2")


NORMS = ("none", "batch", "instance")


def _block(x, filters: int, name: str, norm: str = "none"):
    """Two 3x3 convs with ReLU; with `norm` a batch or instance norm sits between conv and ReLU."""
    for i in (1, 2):
        if norm == "none":
            x = layers.Conv2D(filters, 3, padding="same", activation="relu",
                              kernel_initializer="he_normal", name=f"{name}_conv{i}")(x)
            continue
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False,
                          kernel_initializer="he_normal", name=f"{name}_conv{i}")(x)
        if norm == "batch":
            x = layers.BatchNormalization(name=f"{name}_bn{i}")(x)
        else:  # instance norm = group norm with one group per channel
            x = layers.GroupNormalization(groups=-1, name=f"{name}_in{i}")(x)
        x = layers.Activation("relu", name=f"{name}_relu{i}")(x)
    return x


def build_unet(
    input_shape: tuple[int, int, int],
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
    """
    if depth < 3:
        raise ValueError("depth must be >= 3: the side heads sit on the 1/4 and 1/2 decoder blocks")
    inputs = keras.Input(shape=input_shape, name="image")
    skips = []
    x = inputs
    for level in range(depth):
        x = _block(x, base_filters * 2**level, f"enc{level}", norm)
        if level == depth - 1 and dropout > 0 and dropout_at == "bottleneck+deepest":
            x = layers.Dropout(dropout, name=f"enc{level}_dropout")(x)
        skips.append(x)
        x = layers.MaxPooling2D(2, name=f"enc{level}_pool")(x)
    x = _block(x, base_filters * 2**depth, "bottleneck", norm)
    if dropout > 0:
        x = layers.Dropout(dropout, name="bottleneck_dropout")(x)

    decoded = {}  # scale divisor -> decoder features
    for level in reversed(range(depth)):
        filters = base_filters * 2**level
        x = layers.Conv2DTranspose(filters, 2, strides=2, padding="same", name=f"dec{level}_up")(x)
        x = layers.Concatenate(name=f"dec{level}_concat")([x, skips[level]])
        x = _block(x, filters, f"dec{level}", norm)
        decoded[2**level] = x

    def head(features, scale: int, head_name: str):
        logits = layers.Conv2D(1, 1, name=f"{head_name}_logits")(features)
        if scale > 1:
            logits = layers.UpSampling2D(scale, interpolation=side_upsampling, name=f"{head_name}_up")(logits)
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
    block's activations, global-average-pooled (taken before the dropout, so MC passes agree)."""
    feats = layers.GlobalAveragePooling2D(name="features")(model.get_layer(FEATURES_LAYER).output)
    outputs = {name: model.get_layer(name).output for name in HEADS}
    return keras.Model(model.inputs, {**outputs, "features": feats}, name=f"{model.name}_features")


def unet_for(cfg) -> keras.Model:
    """The run's U-Net from its `Config` (input size, colour, filters, depth and the variant switches)."""
    return build_unet((cfg.img_rows, cfg.img_cols, cfg.channels), cfg.base_filters, cfg.depth, cfg.dropout,
                      side_upsampling=cfg.side_upsampling, dropout_at=cfg.dropout_at, norm=cfg.norm)
