"""Issue 20: batch Dice, BCE from logits, foreground sampling, warm-up and collapse detection, on
tiny hand-made cases."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from dsal_tf.config import resolve
from dsal_tf.data import Normalizer, all_foreground_dice, forced_foreground, foreground_rows, make_dataset
from dsal_tf.errors import DsalError
from dsal_tf.losses import batch_soft_dice_loss, bce_loss, deep_supervision, dice, soft_dice_loss
from dsal_tf.train import (
    StopOnCollapse,
    WarmUp,
    _callbacks,
    all_foreground_references,
    collapse_advice,
    collapsed,
    foreground_collapse_advice,
    warmup_lr,
)

# two 2x2 images: A has foreground on its top row, B none
Y = np.array([[[1, 1], [0, 0]], [[0, 0], [0, 0]]], np.float32)[..., None]
P = np.array([[[1.0, 0.5], [0, 0]], [[0.5, 0], [0, 0]]], np.float32)[..., None]


def test_batch_dice_on_a_batch_with_an_empty_image():
    # over the batch: overlap 1.5, |y| 2, |p| 2 -> 1 - (3 + 1) / (4 + 1) = 0.2, the same for both images
    np.testing.assert_allclose(np.asarray(batch_soft_dice_loss(Y, P)), [0.2, 0.2], rtol=1e-6)
    # per image: A 1 - 4 / 4.5, B (empty) 1 - 1 / 1.5
    np.testing.assert_allclose(np.asarray(soft_dice_loss(Y, P)), [1 - 4 / 4.5, 1 / 3], rtol=1e-6)
    # compiled with the deep-supervision weights, Keras' batch mean returns the batch value per head
    inp = keras.Input((2, 2, 1))
    heads = {h: keras.layers.Activation("linear", name=h)(inp) for h in ("main", "side_1", "side_2")}
    model = keras.Model(inp, heads)
    model.compile(loss=deep_supervision("dice", batch_dice=True)[0], loss_weights={"main": 0.6, "side_1": 0.3,
                                                                                  "side_2": 0.1})
    logs = model.evaluate(P, {h: Y for h in heads}, batch_size=2, verbose=0, return_dict=True)
    assert logs["main_loss"] == pytest.approx(0.2, rel=1e-5) and logs["loss"] == pytest.approx(0.2, rel=1e-5)
    assert deep_supervision("dice")[0]["main"] is soft_dice_loss


def test_bce_keeps_its_gradient_when_a_head_saturates():
    logits = tf.Variable(np.full((1, 1, 1, 1), -30.0, np.float32))  # p = 9e-14, below the old 1e-7 clip
    with tf.GradientTape() as tape:
        loss = bce_loss(np.ones((1, 1, 1, 1), np.float32), keras.activations.sigmoid(logits))
    assert float(loss[0]) == pytest.approx(30.0, rel=1e-4)  # -log sigmoid(-30), not -log 1e-7 = 16.1
    assert float(tape.gradient(loss, logits)[0, 0, 0, 0]) == pytest.approx(-1.0, abs=1e-6)  # p - y
    zero = bce_loss(np.ones((1, 1, 1, 1), np.float32), np.zeros((1, 1, 1, 1), np.float32))
    assert np.isfinite(float(zero[0]))  # p = 0 exactly: -log 1e-30, no inf


def test_collapse_rule():
    assert collapsed([0.0, 0.0, 0.0], 0.01, 3)
    assert not collapsed([0.0, 0.0], 0.01, 3)  # too few epochs
    assert not collapsed([0.0, 0.0, 0.01], 0.01, 3)  # the floor met
    assert not collapsed([0.0] * 5, 0.01, 0)  # off


def test_collapse_callback_raises_on_constant_zero_dice_only():
    cb = StopOnCollapse("round 0", 0.01, 3, advice="BATCH_DICE=True")
    cb.on_train_begin()
    cb.on_epoch_end(0, {"val_main_dice": 0.0})
    cb.on_epoch_end(1, {"val_main_dice": 0.0})
    with pytest.raises(DsalError, match=r"round 0, epoch 3: the model collapsed .* try BATCH_DICE=True"):
        cb.on_epoch_end(2, {"val_main_dice": 0.0})
    ok = StopOnCollapse("round 0", 0.01, 3, advice="")
    ok.on_train_begin()
    for epoch, value in enumerate([0.0, 0.0, 0.02, 0.0, 0.0, 0.5]):
        ok.on_epoch_end(epoch, {"val_main_dice": value})


def test_all_foreground_dice_is_the_metric_of_a_mask_that_is_foreground_everywhere():
    # A: 2 of 4 pixels foreground, (2*2 + 1) / (2 + 4 + 1); B: none, 1 / (0 + 4 + 1)
    expected = (5 / 7 + 1 / 5) / 2
    assert all_foreground_dice(Y) == pytest.approx(expected)
    assert all_foreground_dice(Y, chunk=1) == pytest.approx(expected)
    assert float(np.mean(dice(Y, np.ones_like(Y)))) == pytest.approx(expected)


def test_collapse_callback_raises_on_a_constant_all_foreground_dice():
    """ISIC's seed-1 case (val Dice 0.2557 three times, 0.2517 for a mask that is foreground everywhere: a
    few pixels stayed background) stops; a value that moves, or stays still far from it, does not."""
    cb = StopOnCollapse("round 0", 0.01, 3, advice="X", all_foreground=0.2517, foreground_advice="LR_WARMUP_EPOCHS=1")
    cb.on_train_begin()
    cb.on_epoch_end(0, {"val_main_dice": 0.2557})
    cb.on_epoch_end(1, {"val_main_dice": 0.2559})
    with pytest.raises(DsalError, match=r"epoch 3: the model collapsed to all-foreground .* try LR_WARMUP_EPOCHS=1"):
        cb.on_epoch_end(2, {"val_main_dice": 0.2557})
    for values in ([0.2557, 0.2517, 0.2600, 0.2557, 0.2530, 0.2580], [0.30] * 6):
        ok = StopOnCollapse("round 0", 0.01, 3, advice="", all_foreground=0.2517)
        ok.on_train_begin()
        for epoch, value in enumerate(values):
            ok.on_epoch_end(epoch, {"val_main_dice": value})
    # validated every 10 epochs, patience 5: one validation is the whole window of the all-background rule,
    # but the all-foreground rule waits for 3
    sparse = StopOnCollapse("round 0", 0.01, 5, advice="", every=10, all_foreground=0.2517)
    sparse.on_train_begin()
    sparse.on_epoch_end(9, {"val_main_dice": 0.2557})
    sparse.on_epoch_end(19, {"val_main_dice": 0.2557})
    with pytest.raises(DsalError, match="all-foreground"):
        sparse.on_epoch_end(29, {"val_main_dice": 0.2557})
    # small structures: a mask that is foreground everywhere scores 0.015, inside the floor's reach; a model
    # steady at 0.016 is not called all-foreground
    small = StopOnCollapse("round 0", 0.01, 3, advice="", all_foreground=0.015)
    small.on_train_begin()
    for epoch in range(6):
        small.on_epoch_end(epoch, {"val_main_dice": 0.016})


def padded_volumes():
    """Two 4x4x4 volumes in their padding: A's tissue a 2x2x1 box (4 voxels) holding 2 foreground voxels,
    B's a 2x2x2 box (8 voxels) holding 1."""
    from dsal_tf.data import Split

    images = np.zeros((2, 4, 4, 4, 1), np.float32)
    masks = np.zeros_like(images)
    images[0, 1:3, 1:3, 2] = 1.5
    masks[0, 1, 1:3, 2] = 1
    images[1, :2, 2:, 2:] = -0.5
    masks[1, 0, 2, 2] = 1
    return Split(["a", "b"], images, masks)


def test_all_foreground_inside_the_volumes_by_hand():
    """Foreground on every voxel of the grid: A (2*2 + 1) / (2 + 64 + 1), B (2 + 1) / (1 + 64 + 1); on every
    voxel inside the padding and none outside: A 5 / (2 + 4 + 1), B 3 / (1 + 8 + 1)."""
    from dsal_tf.volume_space import box_sizes

    val = padded_volumes()
    np.testing.assert_array_equal(box_sizes(val.images), [4, 8])
    refs = all_foreground_references(val)
    assert refs["everywhere"] == pytest.approx((5 / 67 + 3 / 66) / 2)
    assert refs["everywhere inside the volumes (not on their padding)"] == pytest.approx((5 / 7 + 3 / 10) / 2)
    assert all_foreground_dice(val.masks, chunk=1, sizes=[4, 8]) == pytest.approx((5 / 7 + 3 / 10) / 2)
    assert list(all_foreground_references(images_2d())) == ["everywhere"]  # images: no padding reading


def images_2d():
    from dsal_tf.data import Split

    return Split(["a", "b"], np.zeros((2, 2, 2, 1), np.uint8), Y)


def test_collapse_callback_names_the_reading_of_everywhere_it_matched():
    """A volume net foreground on the tissue and background on the padding stays near the second value and
    is stopped with it named; a reference within the floor's reach is dropped."""
    refs = {"everywhere": 0.06, "everywhere inside the volumes (not on their padding)": 0.5071}
    cb = StopOnCollapse("round 0", 0.01, 3, advice="X", all_foreground=refs)
    cb.on_train_begin()
    cb.on_epoch_end(0, {"val_main_dice": 0.5080})
    cb.on_epoch_end(1, {"val_main_dice": 0.5079})
    with pytest.raises(DsalError, match=r"near the 0\.5071 of a mask that is foreground everywhere inside the "
                                        r"volumes \(not on their padding\)"):
        cb.on_epoch_end(2, {"val_main_dice": 0.5080})
    assert list(StopOnCollapse("r", 0.01, 3, advice="", all_foreground={"a": 0.015, "b": 0.3}).all_foreground) == ["b"]
    steady = StopOnCollapse("round 0", 0.01, 3, advice="", all_foreground=refs)  # far from both: learning
    steady.on_train_begin()
    for epoch in range(6):
        steady.on_epoch_end(epoch, {"val_main_dice": 0.70})


def test_all_foreground_advice_leads_with_what_brought_the_net_back():
    assert foreground_collapse_advice(resolve(dict(learning_rate=1e-3, loss="dice"))) == (
        'LOSS="bce_dice", LR_WARMUP_EPOCHS=1, LEARNING_RATE=0.0001, MIXED_PRECISION=off')
    assert foreground_collapse_advice(resolve(dict(learning_rate=1e-3, loss="bce_dice", lr_warmup_epochs=1,
                                                   mixed_precision="off"))) == "LEARNING_RATE=0.0001"


@pytest.mark.slow
def test_a_fit_stuck_at_all_foreground_stops_with_one_line(tiny_cfg, tmp_path):
    """A real U-Net whose heads are saturated at foreground (logit bias +40) under soft Dice: the gradient
    through the sigmoid vanishes, so it stays there; the fit ends with the all-foreground error."""
    from dsal_tf import train
    from dsal_tf.data import load_splits

    cfg = tiny_cfg.replace(loss="dice", collapse_patience=3, learning_rate=1e-6)
    splits = load_splits(cfg, ("train", "val"))
    pool, val = splits["train"], splits["val"]
    model = train.new_model(cfg, 0)
    for head in ("main", "side_1", "side_2"):
        kernel, bias = model.get_layer(f"{head}_logits").get_weights()
        model.get_layer(f"{head}_logits").set_weights([kernel * 0, bias + 40.0])
    x, y = np.asarray(pool.images[:8]), np.asarray(pool.masks[:8])
    job = train.FitJob(model, cfg, x, y, np.zeros(8, bool), val, Normalizer.fit(pool.images, cfg.normalization),
                       tmp_path / "round_00", 4, seed=0)
    with pytest.raises(DsalError, match="round 00, epoch 3: the model collapsed to all-foreground"):
        train.fit(job)


def test_collapse_callback_only_with_foreground_and_patience(tmp_path):
    def kinds(cfg, fg):
        return {type(c).__name__ for c in _callbacks(cfg, tmp_path / "round_00", 5, fg, 4)}

    on = resolve(dict(collapse_patience=3))
    assert "StopOnCollapse" in kinds(on, 2) and "StopOnCollapse" not in kinds(on, 0)
    assert "StopOnCollapse" in kinds(resolve({}), 2)  # on by default (COLLAPSE_PATIENCE = 5)
    assert "StopOnCollapse" not in kinds(resolve(dict(collapse_patience=0)), 2)
    assert "WarmUp" in kinds(resolve(dict(lr_warmup_epochs=1)), 0) and "WarmUp" not in kinds(resolve({}), 0)


def test_collapse_advice_skips_what_is_in_use():
    assert collapse_advice(resolve(dict(learning_rate=1e-3))) == (
        'BATCH_DICE=True, LOSS="bce_dice", NORM="instance", FOREGROUND_OVERSAMPLE=0.33, LR_WARMUP_EPOCHS=1, '
        "LEARNING_RATE=0.0001")
    used = resolve(dict(batch_dice=True, loss="bce_dice", norm="instance", lr_warmup_epochs=1))
    assert collapse_advice(used, all_foreground=True) == "LEARNING_RATE=0.0001"


def test_warmup_learning_rates():
    assert [warmup_lr(0.6, s, 3) for s in range(4)] == pytest.approx([0.2, 0.4, 0.6, 0.6])
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.06), loss="mse")
    seen = []
    record = keras.callbacks.LambdaCallback(
        on_train_batch_begin=lambda b, logs: seen.append(float(model.optimizer.learning_rate)))
    x = np.zeros((6, 1), np.float32)
    model.fit(x, x, batch_size=2, epochs=3, verbose=0, shuffle=False, callbacks=[WarmUp(0.06, 2), record])
    # 3 steps an epoch, 2 warm-up epochs: step t of 6 at 0.06 (t + 1) / 6, then the base rate
    assert seen == pytest.approx([0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.06, 0.06, 0.06])


@pytest.mark.parametrize("batch,share,expected", [(16, 0.33, 5), (2, 0.33, 1), (16, 0.0, 0), (1, 0.33, 0), (4, 0.5, 2)])
def test_forced_foreground_per_batch(batch, share, expected):
    assert forced_foreground(batch, share) == expected


def _indexed(n=10, fg=(0, 3, 7)):
    """Image i is filled with the value i; masks of `fg` have one foreground pixel."""
    images = np.repeat(np.arange(n, dtype=np.uint8), 4).reshape(n, 2, 2, 1)
    masks = np.zeros((n, 2, 2, 1), np.uint8)
    masks[list(fg), 0, 0] = 1
    return images, masks


def _epochs(ds, k):
    """The image indices of `k` passes over `ds`, batch by batch."""
    return [[np.rint(x[:, 0, 0, 0] * 255).astype(int).tolist() for x, _ in ds] for _ in range(k)]


def test_foreground_sampling_share_and_determinism():
    images, masks = _indexed()
    assert foreground_rows(masks).tolist() == [0, 3, 7]
    unit = Normalizer((0.0,), (1.0,))
    ds = make_dataset(images, masks, unit, 4, shuffle=True, seed=5, foreground_oversample=0.5)
    epochs = _epochs(ds, 3)
    for batches in epochs:
        assert [len(b) for b in batches] == [4, 4, 2]  # the plain epoch's length
        for b in batches[:2]:
            assert set(b[2:]) <= {0, 3, 7}  # the last 2 of each full batch have foreground
    again = _epochs(make_dataset(images, masks, unit, 4, shuffle=True, seed=5, foreground_oversample=0.5), 3)
    assert again == epochs and epochs[0] != epochs[1]  # seeded, and reshuffled each epoch


def test_no_oversampling_is_the_plain_shuffle():
    images, masks = _indexed()
    unit = Normalizer((0.0,), (1.0,))
    plain = tf.data.Dataset.from_tensor_slices((images, masks)).shuffle(10, seed=5, reshuffle_each_iteration=True)
    reference = _epochs(plain.batch(4).map(lambda x, y: (tf.cast(x, tf.float32) / 255.0, y)), 2)
    assert _epochs(make_dataset(images, masks, unit, 4, shuffle=True, seed=5), 2) == reference
    everywhere = np.ones_like(masks)  # every mask has foreground: oversampling changes nothing
    assert _epochs(make_dataset(images, everywhere, unit, 4, shuffle=True, seed=5, foreground_oversample=0.5),
                   2) == reference
