import numpy as np
import pytest

from dsal_tf.losses import bce_loss, deep_supervision, dice, soft_dice_loss
from dsal_tf.model import build_unet


def test_unet_has_named_full_resolution_heads():
    model = build_unet((32, 48, 3), base_filters=2, depth=4, dropout=0.5)
    out = model(np.zeros((2, 32, 48, 3), np.float32))
    assert set(out) == {"main", "side_1", "side_2"}
    assert all(v.shape == (2, 32, 48, 1) for v in out.values())
    assert model.get_layer("main_logits").kernel.shape == (1, 1, 2, 1)
    assert model.get_layer("side_1_logits").kernel.shape == (1, 1, 8, 1)  # 1/4 block: 4x base
    assert model.get_layer("side_2_logits").kernel.shape == (1, 1, 4, 1)


def test_losses_on_hand_made_masks():
    y = np.array([[1, 1, 0, 0]], np.float32).reshape(1, 1, 4, 1)
    p = np.array([[1, 0, 0, 0]], np.float32).reshape(1, 1, 4, 1)
    # soft Dice = (2*1 + 1) / (2 + 1 + 1) = 0.75 -> loss 0.25
    np.testing.assert_allclose(np.asarray(soft_dice_loss(y, p)), [0.25], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(dice(y, p)), [0.75], rtol=1e-6)
    half = np.full((1, 1, 4, 1), 0.5, np.float32)
    np.testing.assert_allclose(np.asarray(bce_loss(y, half)), [np.log(2)], rtol=1e-5)


def test_deep_supervision_weights():
    losses, weights = deep_supervision("bce_dice", (0.6, 0.3, 0.1))
    assert weights == {"main": 0.6, "side_1": 0.3, "side_2": 0.1}
    assert set(losses) == {"main", "side_1", "side_2"}
    with pytest.raises(KeyError):
        deep_supervision("hinge")


@pytest.mark.slow  # trains (one fit): 5 s
def test_round_reset_keeps_the_mixed_precision_loss_scale():
    import keras

    from dsal_tf import train
    from dsal_tf.config import resolve
    from dsal_tf.model import HEADS

    cfg = resolve({"img_rows": 32, "img_cols": 32, "base_filters": 2, "mixed_precision": True})
    train.set_precision(cfg)
    try:
        model = train.new_model(cfg, 0)
        x = np.random.default_rng(0).random((4, 32, 32, 3)).astype("float32")
        y = (x[..., :1] > 0.5).astype("float32")
        model.fit(x, {h: y for h in HEADS}, verbose=0)
        model.optimizer.learning_rate = 0.5
        train.reset_optimizer(model, 1e-3)
        assert float(model.optimizer.dynamic_scale) > 0  # a zeroed loss scale would stop all learning
        assert int(model.optimizer.inner_optimizer.iterations) == 0
        assert float(model.optimizer.learning_rate) == pytest.approx(1e-3)
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_unet_matches_the_reference_dropout_and_nearest_side_heads():
    from keras import layers

    model = build_unet((32, 32, 3), base_filters=2, depth=4, dropout=0.5)
    drops = [layer.name for layer in model.layers if isinstance(layer, layers.Dropout)]
    assert drops == ["bottleneck_dropout"]  # the bottleneck only, as in the reference
    # side_1 comes from the 1/4 block: nearest upsampling makes every 4x4 block one value
    side_1 = np.asarray(model(np.random.default_rng(0).random((1, 32, 32, 3), np.float32))["side_1"])[0, ..., 0]
    blocks = side_1.reshape(8, 4, 8, 4)
    assert np.array_equal(blocks, np.broadcast_to(blocks[:, :1, :, :1], blocks.shape))


def test_with_features_adds_the_pooled_bottleneck_to_the_same_pass():
    from dsal_tf.model import with_features

    model = build_unet((32, 32, 3), base_filters=2, depth=4, dropout=0.5)
    scored = with_features(model)
    x = np.random.default_rng(1).random((2, 32, 32, 3), np.float32)
    out, plain = scored(x, training=False), model(x, training=False)
    assert set(out) == {"main", "side_1", "side_2", "features"}
    np.testing.assert_array_equal(np.asarray(out["main"]), np.asarray(plain["main"]))  # same weights
    bottleneck = keras_submodel(model, "bottleneck_conv2")(x)
    np.testing.assert_allclose(np.asarray(out["features"]), np.asarray(bottleneck).mean(axis=(1, 2)), rtol=1e-5)
    assert len(scored.weights) == len(model.weights)  # no new weights: the same graph


def keras_submodel(model, layer):
    import keras

    return keras.Model(model.inputs, model.get_layer(layer).output)


def test_unet_variant_switches():
    """The pre-issue-8 variant: dropout after the deepest encoder block too, bilinear side heads;
    NORM adds one normalization layer per conv; the heads and their shapes stay the same."""
    ref = build_unet((32, 32, 3), base_filters=2, depth=4)
    pre8 = build_unet((32, 32, 3), base_filters=2, depth=4, side_upsampling="bilinear",
                      dropout_at="bottleneck+deepest")
    names = {layer.name for layer in pre8.layers}
    assert "enc3_dropout" in names and "enc3_dropout" not in {layer.name for layer in ref.layers}
    assert pre8.get_layer("side_1_up").interpolation == "bilinear"
    assert ref.get_layer("side_1_up").interpolation == "nearest"
    x = np.zeros((2, 32, 32, 3), np.float32)
    for norm, kind in (("batch", "BatchNormalization"), ("instance", "GroupNormalization")):
        m = build_unet((32, 32, 3), base_filters=2, depth=4, norm=norm)
        assert sum(type(layer).__name__ == kind for layer in m.layers) == 2 * (2 * 4 + 1)  # 2 convs x 9 blocks
        assert {k: v.shape for k, v in m(x).items()} == {k: v.shape for k, v in ref(x).items()}
