"""Issue 24: bf16 by default, float32 scoring for CEAL, and less work around the training steps
(index shuffles, the NaN guard once per epoch, sparser validation in long fits, larger inference batches)."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from dsal_tf import train
from dsal_tf.config import resolve
from dsal_tf.data import Normalizer, Rows, make_dataset
from dsal_tf.errors import DsalError
from dsal_tf.model import _computes_in

UNIT = Normalizer((0.0,), (1.0,))


def _rows_seen(ds, images) -> list[list[int]]:
    """Per pass over `ds` (batches of x), the row of `images` each element came from (images are unique)."""
    keys = {int(img[0, 0, 0]): i for i, img in enumerate(images)}
    return [[keys[int(round(float(v) * 255))] for x, _ in ds for v in x.numpy()[:, 0, 0, 0]] for _ in range(3)]


def _unique_images(n: int) -> tuple[np.ndarray, np.ndarray]:
    x = np.zeros((n, 4, 4, 1), np.uint8)
    x[:, 0, 0, 0] = np.arange(n)  # row i is recognisable by its first pixel
    y = (np.arange(n) % 3 == 0).astype(np.uint8)[:, None, None, None] * np.ones((1, 4, 4, 1), np.uint8)
    return x, y


@pytest.mark.parametrize("kind", ["memory", "memmap"])
def test_index_shuffle_is_seeded_and_each_epoch_sees_every_image_once(kind, tmp_path):
    x, y = _unique_images(23)
    if kind == "memmap":
        np.save(tmp_path / "x.npy", x)
        np.save(tmp_path / "y.npy", y)
        x, y = np.load(tmp_path / "x.npy", mmap_mode="r"), np.load(tmp_path / "y.npy", mmap_mode="r")
    a = _rows_seen(make_dataset(x, y, UNIT, 5, shuffle=True, seed=7), x)
    b = _rows_seen(make_dataset(x, y, UNIT, 5, shuffle=True, seed=7), x)
    c = _rows_seen(make_dataset(x, y, UNIT, 5, shuffle=True, seed=8), x)
    assert a == b  # seeded
    assert a != c
    assert all(sorted(epoch) == list(range(23)) for epoch in a)  # every image once per pass
    assert a[0] != a[1]  # reshuffled every pass
    # the order is the one the same seeded shuffle gives the images themselves (what it was before issue 24)
    reference = tf.data.Dataset.from_tensor_slices(np.asarray(x)).shuffle(23, seed=7, reshuffle_each_iteration=True)
    keys = {int(img[0, 0, 0]): i for i, img in enumerate(x)}
    assert [keys[int(img[0, 0, 0])] for img in reference.as_numpy_iterator()] == a[0]


def test_index_shuffle_of_rows_and_foreground_mixing_keeps_the_pairs():
    x, y = _unique_images(30)
    rows = Rows(x, np.arange(4, 24))
    seen = _rows_seen(make_dataset(rows, Rows(y, np.arange(4, 24)), UNIT, 4, shuffle=True, seed=1), rows)
    assert all(sorted(epoch) == list(range(20)) for epoch in seen)
    ds = make_dataset(x, y, UNIT, 4, shuffle=True, seed=2, foreground_oversample=0.5)
    for xb, yb in ds:  # image and mask travel together; the last 2 of every batch have foreground
        rows_b = np.rint(xb.numpy()[:, 0, 0, 0] * 255).astype(int)
        assert np.array_equal(yb.numpy()[:, 0, 0, 0], (rows_b % 3 == 0).astype(np.float32))
        assert yb.numpy()[-min(2, len(rows_b)):].max() == 1.0 or len(rows_b) < 4


def test_validation_every_k_epochs_rule():
    cfg = resolve({})
    assert [train.validation_every(cfg, e) for e in (0, 1, 5, 10, 11, 12, 20, 21, 37, 100)] == \
        [1, 1, 1, 1, 2, 2, 2, 3, 4, 10]
    assert train.validation_freq(cfg, 8) == 1
    assert train.validation_freq(cfg, 12) == [2, 4, 6, 8, 10, 12]
    assert train.validation_freq(cfg, 15) == [2, 4, 6, 8, 10, 12, 14, 15]  # the last epoch always
    assert train.validation_epochs(37, 4)[-2:] == [36, 37]
    for epochs in range(1, 60):  # about 10 validations whatever the length, and never fewer than 1
        n = len(train.validation_epochs(epochs, train.validation_every(cfg, epochs)))
        assert 1 <= n <= 11 and (epochs > 10 or n == epochs)
    # epoch-counting callbacks keep every epoch; VALIDATION_FREQ pins it
    assert train.validation_every(resolve({"early_stop_patience": 3}), 30) == 1
    assert train.validation_every(resolve({"lr_schedule": "plateau"}), 30) == 1
    assert train.validation_every(resolve({"validation_freq": 1}), 30) == 1
    assert train.validation_every(resolve({"validation_freq": 3}), 5) == 3
    with pytest.raises(DsalError, match="VALIDATION_FREQ"):
        resolve({"validation_freq": -1})


def test_collapse_patience_counts_epochs_when_validating_every_k():
    from dsal_tf.train import StopOnCollapse

    cb = StopOnCollapse("round 0", 0.01, 5, advice="BATCH_DICE=True", every=2)  # 5 epochs = 3 validations
    cb.on_train_begin()
    cb.on_epoch_end(1, {"val_main_dice": 0.0})
    cb.on_epoch_end(2, {})  # not validated
    cb.on_epoch_end(3, {"val_main_dice": 0.0})
    with pytest.raises(DsalError, match=r"round 0, epoch 6: the model collapsed"):
        cb.on_epoch_end(5, {"val_main_dice": 0.0})


def test_nan_guard_reads_the_loss_once_per_epoch():
    cb = train.StopOnNaN("round 2")
    cb.on_epoch_begin(0)
    cb.on_train_batch_end(0, {"loss": tf.constant(float("nan"))})  # a device tensor is not read per batch
    cb.on_epoch_end(0, {"loss": 0.3})
    cb.on_epoch_begin(1)
    with pytest.raises(DsalError, match=r"round 2, epoch 2: the training loss became nan"):
        cb.on_epoch_end(1, {"loss": tf.constant(float("nan"))})
    with pytest.raises(DsalError, match="became inf"):
        cb.on_epoch_end(2, {"loss": np.float32("inf")})


def test_best_checkpoint_is_written_once_with_the_best_epochs_weights(tmp_path):
    """The best weights are kept in memory at each improvement and written once, when the fit ends or
    stops on an error (`flush`): the file then holds the best epoch's weights, not the last epoch's."""
    inp = keras.Input((4,))
    model = keras.Model(inp, keras.layers.Dense(1)(inp))
    cb = train.BestCheckpoint(tmp_path / "best.keras")
    cb.set_model(model)
    weights = {}
    for epoch, dice in enumerate([0.2, 0.7, 0.5]):
        model.set_weights([np.full((4, 1), epoch, np.float32), np.zeros(1, np.float32)])
        weights[epoch] = model.get_weights()
        cb.on_epoch_end(epoch, {"val_main_dice": dice})
        assert not cb.path.exists()  # nothing written during the fit
    cb.on_train_end()
    saved = keras.models.load_model(cb.path, compile=False).get_weights()
    np.testing.assert_array_equal(saved[0], weights[1][0])  # epoch 2 (Dice 0.7), not the last epoch
    mtime = cb.path.stat().st_mtime_ns
    cb.flush()  # idempotent: `fit` flushes again after the fit returns
    assert cb.path.stat().st_mtime_ns == mtime


def test_eval_batch_is_larger_and_capped():
    assert train.eval_batch_size(resolve({"batch_size": 16})) == 64
    assert train.eval_batch_size(resolve({"batch_size": 100})) == 256
    assert train.eval_batch_size(resolve({"batch_size": 300})) == 300  # never below the training batch


def _tiny_model(policy: str = "float32", seed: int = 0):
    keras.mixed_precision.set_global_policy(policy)
    try:
        cfg = resolve({"img_rows": 32, "img_cols": 32, "base_filters": 2, "mixed_precision": "off"})
        return train.new_model(cfg, seed)
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_per_image_outputs_and_validation_dice_do_not_depend_on_the_batch():
    from dsal_tf.model import HEADS

    model = _tiny_model()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(24, 32, 32, 3)).astype("float32")
    y = (rng.random((24, 32, 32, 1)) > 0.5).astype("float32")
    small = model.predict(x, batch_size=4, verbose=0)["main"]
    large = model.predict(x, batch_size=24, verbose=0)["main"]
    assert np.array_equal(small > 0.5, large > 0.5)
    np.testing.assert_allclose(small, large, rtol=0, atol=1e-6)
    dice = [model.evaluate(x, {h: y for h in HEADS}, batch_size=b, verbose=0, return_dict=True)["main_dice"]
            for b in (4, 16, 24)]  # a per-image mean over the set, not a mean of batch means
    assert dice[0] == pytest.approx(dice[1], rel=1e-6) and dice[0] == pytest.approx(dice[2], rel=1e-6)


def test_default_precision_is_auto_with_float32_heads():
    assert resolve({}).mixed_precision == "auto"
    model = _tiny_model("mixed_bfloat16")
    x = np.zeros((2, 32, 32, 3), np.float32)
    assert {keras.backend.standardize_dtype(v.dtype) for v in model(x).values()} == {"float32"}
    assert model.get_layer("main_logits").compute_dtype == "bfloat16"


def test_float32_copy_has_float32_outputs_and_the_same_weights_and_dropout_streams():
    from dsal_tf.determinism import reset_seed_generators

    model = _tiny_model("mixed_bfloat16")
    assert train.float32_copy(_tiny_model()) is not None
    plain = _tiny_model()
    assert train.float32_copy(plain) is plain  # already float32
    reset_seed_generators(model, 11)
    twin = train.float32_copy(model)
    assert _computes_in(twin) == {"float32"} and _computes_in(model) == {"bfloat16"}
    assert len(twin.variables) == len(model.variables)
    for a, b in zip(twin.variables, model.variables):
        assert np.array_equal(np.asarray(a), np.asarray(b))  # weights and seed-generator states
    x = np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype("float32")
    assert {keras.backend.standardize_dtype(v.dtype) for v in twin(x).values()} == {"float32"}
    np.testing.assert_allclose(twin(x)["main"], model(x)["main"], atol=0.05)  # same function, other rounding
    # built once per model, refreshed on every call (a traced scoring pass is reused round after round)
    model.get_layer("main_logits").kernel.assign(np.zeros(model.get_layer("main_logits").kernel.shape))
    again = train.float32_copy(model)
    assert again is twin and not np.asarray(twin.get_layer("main_logits").kernel).any()


def test_ceal_scores_with_a_float32_copy_of_a_bf16_model():
    from dsal_tf.strategies import QUERY_STRATEGIES

    cfg = resolve({"img_rows": 32, "img_cols": 32, "base_filters": 2, "mc_passes": 2, "query_strategy": "ceal"})
    assert QUERY_STRATEGIES["ceal"].score_dtype == "float32"
    assert getattr(QUERY_STRATEGIES["dsal"], "score_dtype", None) is None  # DSAL's picks do not move (97%)
    model = _tiny_model("mixed_bfloat16")
    from dsal_tf.space import space_for

    query = QUERY_STRATEGIES["ceal"].from_config(cfg)
    rng = np.random.default_rng(2)
    x = rng.integers(0, 255, (6, 32, 32, 3), dtype=np.uint8)
    y = np.zeros((6, 32, 32, 1), np.uint8)
    scores = space_for(cfg.replace(batch_size=4)).score_pool(query, model, x, y, Normalizer((0.5,) * 3, (0.2,) * 3))
    assert scores["uncertainty"].shape == (6,) and np.isfinite(scores["uncertainty"]).all()
    scored_with = query._traced_for[0]
    assert scored_with is not model and _computes_in(scored_with) == {"float32"}


@pytest.mark.slow
def test_long_fit_validates_every_k_epochs_and_keeps_the_best_validated_epoch(tiny_cfg, tmp_path):
    from dsal_tf.data import load_splits

    # the tiny net of seed 0 sits at all-foreground for all 12 epochs (val Dice 0.385, that of a mask that is
    # foreground everywhere): the collapse guard would stop it at epoch 6; this test is about the schedule
    cfg = tiny_cfg.replace(mixed_precision="off", collapse_patience=0)
    splits = load_splits(cfg, ("train", "val"))
    pool, val = splits["train"], splits["val"]
    norm = Normalizer.fit(pool.images, cfg.normalization)
    model = train.new_model(cfg, 0)
    x, y = np.asarray(pool.images[:8]), np.asarray(pool.masks[:8])
    history = train.fit(train.FitJob(model, cfg, x, y, np.zeros(8, bool), val, norm, tmp_path / "round_00", 12, seed=0))
    assert len(history["loss"]) == 12 and len(history["val_main_dice"]) == 6  # epochs 2, 4, ..., 12
    lines = (tmp_path / "round_00" / "history.csv").read_text().splitlines()
    assert len(lines) == 13 and "val_main_dice" in lines[0]  # every epoch has a row; NA where not validated
    best = keras.models.load_model(tmp_path / "round_00" / train.CHECKPOINT, compile=False)
    assert all(np.array_equal(a, b) for a, b in zip(best.get_weights(), model.get_weights()))
    assert math.isfinite(max(history["val_main_dice"]))


@pytest.mark.slow
@pytest.mark.compiled
def test_bf16_loop_is_deterministic_and_resumes_bit_for_bit(tiny_data, tmp_path):
    """The default precision on a bf16 CPU: two runs agree bit for bit, and a run resumed after round 0
    ends where the straight run ends (weights, pool)."""
    import shutil

    from dsal_tf.active import run_active_learning
    from dsal_tf.pool import Pool
    from dsal_tf.train import cpu_has_bf16

    from .conftest import tiny_values

    if not cpu_has_bf16():
        pytest.skip("auto resolves to fp32 on this CPU")
    values = tiny_values(tiny_data, tmp_path, nb_iterations=1, depth=3, mixed_precision="auto")
    runs = [run_active_learning(resolve({**values, "exp_name": name}), log=lambda m: None) for name in ("a", "b")]
    assert '"mixed_precision": "bfloat16"' in (runs[0] / "config.json").read_text()
    resumed = runs[0].parent / "c"
    shutil.copytree(runs[0], resumed, ignore=shutil.ignore_patterns("round_01"))
    saved = resumed / "config.json"
    saved.write_text(saved.read_text().replace('"exp_name": "a"', '"exp_name": "c"'))
    curve = resumed / "learning_curve.csv"
    curve.write_text("".join(curve.read_text().splitlines(keepends=True)[:2]))  # round 0's row only
    run_active_learning(resolve({**values, "exp_name": "c"}), log=lambda m: None)

    def weights(run):
        return keras.models.load_model(run / "round_01" / train.CHECKPOINT, compile=False).get_weights()

    for other in (runs[1], resumed):
        assert all(np.array_equal(a, b) for a, b in zip(weights(runs[0]), weights(other)))
        a, b = (Pool.load(r / "round_01" / "pool.npz") for r in (runs[0], other))
        assert np.array_equal(a.labelled_map, b.labelled_map)
