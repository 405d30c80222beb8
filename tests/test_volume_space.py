"""The volume space on tiny synthetic NIfTI datasets: loading and caching, the mask round trip to
the input's grid and affine, seeded training patches with a foreground share, whole-volume
validation, sliding-window scoring checked by hand, and bad input on one line."""

from __future__ import annotations

import json
import os

import cv2
import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from dsal_tf.config import resolve
from dsal_tf.errors import DsalError
from dsal_tf.volume_space import (
    VolumeNormalizer,
    VolumeSettings,
    VolumeSpace,
    area_downsample,
    content_box,
    rotation_plane,
)

PATCH = (16, 24, 16)
# (name, shape, spacing): most volumes at 1 x 1 x 2 mm; v4 is coarser along its first axis, so it
# is resampled (14 slices of 1.5 mm -> 21 of 1 mm), and the grids differ in size.
TRAIN = [("v0", (20, 24, 9), (1.0, 1.0, 2.0)), ("v1", (18, 22, 8), (1.0, 1.0, 2.0)),
         ("v2", (20, 26, 9), (1.0, 1.0, 2.0)), ("v3", (22, 24, 9), (1.0, 1.0, 2.0)),
         ("v4", (14, 24, 9), (1.5, 1.0, 2.0)), ("v5", (20, 24, 8), (1.0, 1.0, 2.0))]
VAL = [("w0", (20, 24, 9), (1.0, 1.0, 2.0)), ("w1", (19, 23, 9), (1.0, 1.0, 2.0))]
TEST = [("t0", (20, 24, 9), (1.0, 1.0, 2.0)), ("t1", (21, 24, 8), (1.0, 1.0, 2.0))]
GRID = (24, 32, 16)  # the largest resampled shape (22, 26, 9), up to multiples of 2**3 and at least PATCH


def _affine(spacing, origin=(4.0, -3.0, 7.0)):
    a = np.diag([*spacing, 1.0])
    a[:3, 3] = origin
    return a


def _sphere(shape, spacing, radius_mm=5.0, shift=(0.0, 0.0, 0.0)):
    """A ball of `radius_mm` in world space (an ellipsoid in voxels when the spacing is anisotropic)."""
    idx = np.indices(shape).astype(np.float64)
    centre = (np.asarray(shape) - 1) / 2 + np.asarray(shift)
    d = sum(((idx[a] - centre[a]) * spacing[a]) ** 2 for a in range(3))
    return (np.sqrt(d) <= radius_mm).astype(np.uint8)


def _write_volume(root, split, name, shape, spacing, seed):
    rng = np.random.default_rng(seed)
    label = _sphere(shape, spacing, shift=tuple(rng.uniform(-1.5, 1.5, 3)))
    image = 100.0 + 80.0 * label + rng.normal(0, 3, shape)
    nib.save(nib.Nifti1Image(image.astype(np.float32), _affine(spacing)), str(root / f"{split}Img" / f"{name}.nii.gz"))
    nib.save(nib.Nifti1Image(label, _affine(spacing)), str(root / f"{split}GT" / f"{name}.nii.gz"))


def make_volumes(root):
    for split, items in (("train", TRAIN), ("val", VAL), ("test", TEST)):
        (root / f"{split}Img").mkdir(parents=True)
        (root / f"{split}GT").mkdir(parents=True)
        for k, (name, shape, spacing) in enumerate(items):
            _write_volume(root, split, name, shape, spacing, seed=100 * len(split) + k)
    return root


@pytest.fixture(scope="module")
def volume_data(tmp_path_factory):
    return make_volumes(tmp_path_factory.mktemp("vol_orgData"))


def _cfg(data, tmp_path, **settings):
    values = dict(data_path=str(data), exp_dir=str(tmp_path / "exp"), exp_name="vol", depth=3, base_filters=2,
                  batch_size=2, progress=False, **{"patch_size": PATCH, **settings})
    return resolve(values)


def _space(data, tmp_path, **settings):
    return VolumeSpace.from_config(_cfg(data, tmp_path, **settings))


def _one_line_naming(exc, path) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and str(path) in msg, msg
    return msg


# ------------------------------------------------------------------ settings
def test_settings_coerce_and_check(volume_data, tmp_path):
    s = VolumeSettings.from_values({"spacing": "1, 1, 2", "patch_size": "(16, 24, 16)", "ct_window": [-100, 200]})
    assert s.spacing == (1.0, 1.0, 2.0) and s.patch_size == PATCH and s.ct_window == (-100.0, 200.0)
    for empty in ((), [], "()", "", None):  # config.json stores () as []
        assert VolumeSettings.from_values({"spacing": empty}).spacing == ()
    for name, value, word in (("patch_size", (16, 16), "PATCH_SIZE"), ("spacing", (1.0, 0.0, 1.0), "SPACING"),
                              ("volume_normalization", "zcore", "'zscore'"), ("ct_window", (10, -10), "CT_WINDOW"),
                              ("steps_per_epoch", -1, "STEPS_PER_EPOCH"), ("patch_size", "a,b,c", "PATCH_SIZE")):
        with pytest.raises(DsalError) as e:
            VolumeSettings.from_values({name: value})
        assert word in str(e.value) and "\n" not in str(e.value), (name, str(e.value))
    with pytest.raises(DsalError) as e:
        _space(volume_data, tmp_path, patch_size=(16, 20, 16))
    assert "PATCH_SIZE" in str(e.value) and "2**DEPTH = 8" in str(e.value)
    space = _space(volume_data, tmp_path)
    assert space.input_shape == (*PATCH, 1) and space.model_input_shape == (None, None, None, 1)
    assert space.rank == 3 and space.mask_file(tmp_path, "v0") == tmp_path / "v0.nii.gz"


# ------------------------------------------------------------------ data
def test_load_splits_shapes_padding_and_cache(volume_data, tmp_path):
    space = _space(volume_data, tmp_path)
    splits = space.load_splits()
    assert space.layout.spacing == (1.0, 1.0, 2.0) and space.layout.shape == GRID
    for split, items in (("train", TRAIN), ("val", VAL), ("test", TEST)):
        s = splits[split]
        assert s.names == [n for n, _, _ in items] and s.has_mask.all()
        assert isinstance(s.images, np.memmap) and isinstance(s.masks, np.memmap)
        assert s.images.shape == s.masks.shape == (len(items), *GRID, 1)
        assert s.images.dtype == np.float16 and s.masks.dtype == np.uint8
        for i, (_name, shape, _spacing) in enumerate(items):
            geo = space.geometry(s.files[i])
            assert geo.shape == shape
            outside = np.ones(GRID, bool)
            outside[geo.box] = False
            assert not np.any(s.images[i][..., 0][outside]) and not np.any(s.masks[i][..., 0][outside])
            inside = s.images[i][..., 0][geo.box].astype(np.float32)
            assert abs(inside.mean()) < 0.05 and 0.9 < inside.std() < 1.05  # z-scored per volume
            lo, hi = content_box(s.images[i])
            assert tuple(lo) == geo.offset and tuple(hi - lo) == geo.resampled
    from dsal_tf.data import Rows
    from dsal_tf.volume_space import stored_boxes

    train = splits["train"]
    boxes = [content_box(train.images[i]) for i in range(len(train))]
    for got, want in zip(stored_boxes(train.images), boxes, strict=True):
        np.testing.assert_array_equal(got, want)
    picked = stored_boxes(Rows(train.images, np.array([4, 1])))
    np.testing.assert_array_equal(picked[0][0], boxes[4][0])
    np.testing.assert_array_equal(picked[1][1], boxes[1][1])
    assert stored_boxes(train.images[1:3]) is None and stored_boxes(np.asarray(train.images)) is None
    # v4: 14 slices of 1.5 mm -> 21 of 1 mm, centred in the 24-slice grid
    v4 = space.geometry(splits["train"].files[4])
    assert v4.resampled == (21, 24, 9) and v4.offset == (1, 4, 3)
    folder = os.path.dirname(splits["train"].images.filename)
    meta = json.loads(open(os.path.join(folder, "meta.json")).read())
    assert meta["shape"] == list(GRID) and meta["volumes"][4]["resampled"] == [21, 24, 9]
    # reused: the same folder, not rewritten
    stamp = os.stat(os.path.join(folder, "images.npy")).st_mtime_ns
    again = _space(volume_data, tmp_path).load_splits(("train",))["train"]
    assert os.path.dirname(again.images.filename) == folder
    assert os.stat(os.path.join(folder, "images.npy")).st_mtime_ns == stamp
    # a setting that changes the voxels, and a changed file, each give a new cache
    ct = _space(volume_data, tmp_path, volume_normalization="ct", ct_window=(50.0, 250.0)).load_splits(("train",))
    assert os.path.dirname(ct["train"].images.filename) != folder
    assert float(ct["train"].images.max()) <= 1.0 and float(ct["train"].images.min()) >= 0.0
    caches = sorted(p.name for p in (tmp_path / "exp" / ".cache").iterdir())
    assert not any(".tmp" in c for c in caches)


def test_cache_invalidated_by_a_changed_file(tmp_path):
    data = make_volumes(tmp_path / "data")
    space = _space(data, tmp_path)
    first = space.load_split("val")
    before = np.array(first.images[0], np.float32)
    path = data / "valImg" / "w0.nii.gz"
    img = nib.load(str(path))
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[::-1].copy(), img.affine), str(path))
    second = _space(data, tmp_path).load_split("val")
    assert os.path.dirname(second.images.filename) != os.path.dirname(first.images.filename)
    assert not np.array_equal(np.array(second.images[0], np.float32), before)


def test_masks_written_back_on_the_input_grid_and_affine(volume_data, tmp_path):
    space = _space(volume_data, tmp_path)
    train = space.load_split("train")
    idx = np.arange(len(train))
    space.write_masks(tmp_path / "pseudo", idx, np.asarray(train.masks), train)
    for name, shape, _spacing in TRAIN:
        written = nib.load(str(space.mask_file(tmp_path / "pseudo", name)))
        source = nib.load(str(volume_data / "trainGT" / f"{name}.nii.gz"))
        assert written.shape == shape and written.get_data_dtype() == np.uint8
        np.testing.assert_array_equal(written.affine, source.affine)
        # the round trip (resample to 1 x 1 x 2 mm, pad, crop, resample back) gives the label back
        np.testing.assert_array_equal(np.asarray(written.dataobj), np.asarray(source.dataobj), err_msg=name)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("pseudo")) == ["pseudo"]


# ------------------------------------------------------------------ training patches
def _batches(ds, n=None):
    out = []
    for k, (x, y) in enumerate(ds):
        if n is not None and k >= n:
            break
        out.append((x.numpy(), {h: v.numpy() for h, v in y.items()} if isinstance(y, dict) else y.numpy()))
    return out


def test_train_stream_is_seeded_and_holds_foreground(volume_data, tmp_path):
    space = _space(volume_data, tmp_path)
    train = space.load_split("train")
    norm = space.fit_normalizer(train.images)
    x, y = np.asarray(train.images), np.asarray(train.masks)
    steps = space.steps_per_epoch(len(x))
    assert steps == 6 * 2 // 2  # 6 volumes x ceil(24*32*16 / (16*24*16)) = 2 patches, 2 a step
    ds = space.train_stream(x, y, norm, seed=5, heads=("main", "side_1"), foreground_oversample=0.5)
    first, again = _batches(ds), _batches(ds)
    assert len(first) == steps
    xb, yb = first[0]
    assert xb.shape == (2, *PATCH, 1) and xb.dtype == np.float32 and set(yb) == {"main", "side_1"}
    same = _batches(space.train_stream(x, y, norm, seed=5, heads=("main", "side_1"), foreground_oversample=0.5))
    for (a, ya), (b, yb2) in zip(first, same, strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(ya["main"], yb2["main"])
    assert not all(np.array_equal(a[0], b[0]) for a, b in zip(first, again, strict=True))  # a new epoch, new patches
    # the last patch of every batch (1 of 2 at a 0.5 share) is centred on foreground
    endless = _batches(space.train_stream(x, y, norm, seed=9, repeat=True, foreground_oversample=0.5), 30)
    assert all(yy[-1].any() for _, yy in endless)
    assert all(xx.shape == (2, *PATCH, 1) for xx, _ in endless)
    # image and mask stay aligned through flips and rotations: foreground is brighter
    xs = np.concatenate([xx for xx, _ in endless])
    ys = np.concatenate([yy for _, yy in endless]) > 0.5
    assert xs[ys].mean() > xs[~ys & (xs != 0)].mean() + 1.0


def test_patch_rotation_plane_and_helpers():
    assert rotation_plane((1.0, 1.0, 1.0)) == (0, 1)
    assert rotation_plane((0.8, 0.8, 5.0)) == (0, 1)
    assert rotation_plane((4.0, 0.7, 0.7)) == (1, 2)
    vol = np.zeros((10, 12, 14), np.float32)
    vol[2:5, 3:9, 4:6] = 1.5
    lo, hi = content_box(vol[..., None])
    assert tuple(lo) == (2, 3, 4) and tuple(hi) == (5, 9, 6)
    assert tuple(content_box(np.zeros((3, 4, 5)))[1]) == (3, 4, 5)
    small = area_downsample(np.arange(16 * 8 * 4, dtype=np.float32).reshape(16, 8, 4), 4)
    assert small.shape == (4, 4, 4)
    assert small.mean() == pytest.approx(np.arange(16 * 8 * 4).mean())


# ------------------------------------------------------------------ inference and scoring
class _Pointwise:
    """A stand-in network whose heads are thresholds of its input, voxel by voxel: the windows all
    agree, so the blended maps are the thresholds exactly and the scores can be computed by hand."""

    def __call__(self, x, training=False):
        import tensorflow as tf

        main = tf.cast(x > 0.5, tf.float32)
        return {"main": main, "side_1": main, "side_2": tf.cast(x > 1.5, tf.float32)}


def test_dsal_scores_through_the_sliding_inferer_by_hand(volume_data, tmp_path):
    from dsal_tf.strategies.dsal import DSALQuery

    space = _space(volume_data, tmp_path)
    val = space.load_split("val")
    norm = space.fit_normalizer()
    scores = space.score_pool(DSALQuery(), _Pointwise(), val.images, val.masks, norm)
    assert scores["agreement"].shape == (2,) and scores["pred"].shape == (2, *GRID, 1)
    for i in range(2):
        x = np.asarray(val.images[i], np.float32)[..., 0]
        b0, b2 = x > 0.5, x > 1.5
        dice02 = (2 * np.sum(b0 & b2) + 1) / (b0.sum() + b2.sum() + 1)
        assert scores["agreement"][i] == pytest.approx(0.5 * (1.0 + dice02), rel=1e-5)
        np.testing.assert_array_equal(scores["pred"][i][..., 0], b0)
        truth = np.asarray(val.masks[i])[..., 0] > 0
        assert scores["true_dice"][i] == pytest.approx((2 * np.sum(truth & b0) + 1) / (truth.sum() + b0.sum() + 1),
                                                      rel=1e-5)


def test_predict_file_matches_the_cached_path(volume_data, tmp_path):
    from dsal_tf.volume_space import predict_file, smoothed_dice

    space = _space(volume_data, tmp_path)
    val = space.load_split("val")
    norm = space.fit_normalizer()
    cached = space.masks_at_original_size(_Pointwise(), val.images, val.files, norm)
    for i, path in enumerate(val.files):
        out = predict_file(_Pointwise(), path, tmp_path / "pred" / f"{val.names[i]}.nii.gz", norm)
        written = nib.load(str(tmp_path / "pred" / f"{val.names[i]}.nii.gz"))
        np.testing.assert_array_equal(written.affine, nib.load(str(path)).affine)
        mask = np.asarray(written.dataobj)
        assert mask.shape == cached[i].shape and out["foreground"] == mask.sum() > 0
        assert smoothed_dice(mask, cached[i]) > 0.99  # the cache keeps float16 voxels: a rare voxel may flip
        assert 0.5 < out["agreement"] <= 1.0


@pytest.fixture(scope="module")
def tiny_unet():
    import keras

    from dsal_tf.model import build_unet

    keras.utils.set_random_seed(1)
    return build_unet((None, None, None, 1), base_filters=2, depth=3, dropout=0.5)


@pytest.mark.compiled  # the traced scoring pass over volumes
def test_score_pool_over_a_3d_unet(volume_data, tmp_path, tiny_unet):
    from dsal_tf.model import with_features
    from dsal_tf.strategies.base import binary_dice
    from dsal_tf.strategies.ceal import CEALQuery
    from dsal_tf.strategies.dsal import DSALQuery
    from dsal_tf.strategies.entropy import EntropyQuery
    from dsal_tf.strategies.selection import SELECTIONS

    space = _space(volume_data, tmp_path)
    test = space.load_split("test")
    norm = space.fit_normalizer()
    scores = space.score_pool(DSALQuery(), tiny_unet, test.images, test.masks, norm)
    assert all(v.shape == (2,) for k, v in scores.items() if k != "pred")
    infer = space.inferer(tiny_unet)
    out = infer(np.asarray(test.images, np.float32), training=False)
    assert set(out) == {"main", "side_1", "side_2"} and out["main"].shape == (2, *GRID, 1)
    hand = 0.5 * (binary_dice(out["main"] > 0.5, out["side_1"] > 0.5) + binary_dice(out["main"] > 0.5,
                                                                                   out["side_2"] > 0.5))
    np.testing.assert_allclose(scores["agreement"], hand.numpy(), rtol=1e-6)
    # outside each volume's box every head says 0 (the padding adds nothing to a score)
    geo = space.geometry(test.files[0])
    outside = np.ones(GRID, bool)
    outside[geo.box] = False
    assert not np.any(out["main"].numpy()[0][..., 0][outside])
    # entropy, CEAL's MC dropout (training=True) and the features of diverse selection run unchanged
    ent = space.score_pool(EntropyQuery(), tiny_unet, test.images, test.masks, norm)
    assert ent["uncertainty"].shape == (2,) and np.all(ent["uncertainty"] > 0)
    ceal = CEALQuery(CEALQuery.Settings(mc_passes=2))
    mc = space.score_pool(ceal, tiny_unet, test.images, test.masks, norm)
    assert mc["uncertainty"].shape == (2,) and np.all(np.isfinite(mc["uncertainty"]))
    diverse = DSALQuery(selection=SELECTIONS["diverse"]())
    feats = space.score_pool(diverse, tiny_unet, test.images, test.masks, norm, with_features=with_features)
    assert feats["features"].shape == (2, 16)
    np.testing.assert_allclose(feats["agreement"], scores["agreement"], rtol=1e-6)
    # predictions back on each file's grid
    masks = space.masks_at_original_size(tiny_unet, test.images, test.files, norm)
    assert [m.shape for m in masks] == [shape for _, shape, _ in TEST] and masks[0].dtype == np.uint8
    thumbs = space.thumbnails(test.images)
    assert thumbs.shape == (2, 512) and thumbs.dtype == np.float32


def test_sliding_window_outputs_match_predict():
    from dsal_tf.sliding import sliding_window_outputs, sliding_window_predict

    rng = np.random.default_rng(0)
    vol = rng.normal(size=(20, 18, 11, 1)).astype(np.float32)

    def model(b, training=False):
        return {"main": 1 / (1 + np.exp(-b)), "side_1": b * 0.5, "features": b.reshape(len(b), -1)[:, :3]}

    a = sliding_window_outputs(model, vol, (8, 8, 8), batch_size=3)
    b = sliding_window_predict(model, vol, (8, 8, 8), heads=("main", "side_1"), batch_size=2)
    np.testing.assert_allclose(a["main"], b["main"], rtol=1e-6)
    np.testing.assert_allclose(a["side_1"], b["side_1"], rtol=1e-6, atol=1e-7)
    assert a["features"].shape == (3,)


@pytest.mark.slow
def test_fit_on_patches_validates_on_whole_volumes(volume_data, tmp_path, tiny_unet):
    import keras

    from dsal_tf import train
    from dsal_tf.model import HEADS, build_unet

    cfg = _cfg(volume_data, tmp_path)
    space = VolumeSpace.from_config(cfg)
    splits = space.load_splits(("train", "val"))
    norm = space.fit_normalizer(splits["train"].images)
    keras.utils.set_random_seed(0)
    model = train.compile_model(build_unet(space.model_input_shape, base_filters=2, depth=3), cfg)
    ds = space.train_stream(splits["train"].images, splits["train"].masks, norm, seed=1, heads=HEADS,
                            foreground_oversample=0.33)
    val = space.eval_stream(splits["val"].images, splits["val"].masks, norm, heads=HEADS)
    hist = model.fit(ds, validation_data=val, epochs=2, verbose=0).history
    assert len(hist["val_main_dice"]) == 2 and all(0.0 <= d <= 1.0 for d in hist["val_main_dice"])
    # val_main_dice is the mean per-volume Dice of one whole-volume pass
    prob = model.predict(val.map(lambda x, y: x), verbose=0)["main"]
    truth = np.asarray(splits["val"].masks) > 0.5
    per = [(2 * np.sum(t & (p > 0.5)) + 1) / (t.sum() + (p > 0.5).sum() + 1) for t, p in zip(truth, prob)]
    assert hist["val_main_dice"][-1] == pytest.approx(np.mean(per), abs=1e-4)


# ------------------------------------------------------------------ normalizer
def test_volume_normalizer_round_trip(volume_data, tmp_path):
    import tensorflow as tf

    from dsal_tf.data import Normalizer

    space = _space(volume_data, tmp_path)
    norm = space.fit_normalizer()
    assert norm.spacing == (1.0, 1.0, 2.0) and norm.patch_size == PATCH and norm.normalization == "zscore"
    x = np.array([[-1.5, 0.0, 2.25]], np.float16)
    np.testing.assert_array_equal(norm(tf.constant(x)).numpy(), x.astype(np.float32))
    np.testing.assert_array_equal(norm.numpy(x), x.astype(np.float32))
    norm.save(tmp_path / "normalizer.json")
    assert space.load_normalizer(tmp_path / "normalizer.json") == norm
    with pytest.raises(KeyError):  # the 2D loader (x / 255) refuses it
        Normalizer.load(tmp_path / "normalizer.json")
    Normalizer((0.5,), (0.2,)).save(tmp_path / "flat.json")
    with pytest.raises(DsalError):
        VolumeNormalizer.load(tmp_path / "flat.json")
    with pytest.raises(TypeError):
        space.eval_stream(np.zeros((1, *GRID, 1), np.float16), np.zeros((1, *GRID, 1), np.uint8),
                          Normalizer((0.0,), (1.0,)))


# ------------------------------------------------------------------ bad input
def test_a_2d_nifti_among_the_volumes(tmp_path):
    data = make_volumes(tmp_path / "data")
    flat = data / "trainImg" / "v9.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((20, 24), np.float32), np.eye(4)), str(flat))
    nib.save(nib.Nifti1Image(np.zeros((20, 24), np.uint8), np.eye(4)), str(data / "trainGT" / "v9.nii.gz"))
    with pytest.raises(DsalError) as e:
        _space(data, tmp_path).load_splits()
    assert "2D" in _one_line_naming(e, flat)


def test_a_label_of_another_shape(tmp_path):
    data = make_volumes(tmp_path / "data")
    label = data / "valGT" / "w1.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((19, 23, 8), np.uint8), _affine((1.0, 1.0, 2.0))), str(label))
    with pytest.raises(DsalError) as e:
        _space(data, tmp_path).load_splits()
    assert "19x23x8" in _one_line_naming(e, label)
    assert not list((tmp_path / "exp" / ".cache").glob("volumes-val-*"))  # nothing half-written is kept


def test_dataset_rank_and_a_mixed_dataset(tmp_path):
    import cv2

    from dsal_tf.volumes import dataset_rank

    data = make_volumes(tmp_path / "data")
    assert dataset_rank(data) == 3 and dataset_rank(tmp_path / "nothing") == 2
    png = data / "testImg" / "slice.png"
    cv2.imwrite(str(png), np.zeros((8, 8), np.uint8))
    with pytest.raises(DsalError) as e:
        dataset_rank(data)
    assert "v0.nii.gz" in _one_line_naming(e, png)


@pytest.mark.slow
@pytest.mark.parametrize("strategy,trainer", [("dsal", "standard"), ("entropy", "bcp")])
def test_the_active_learning_loop_runs_on_a_volume_folder(volume_data, tmp_path, strategy, trainer):
    """A folder of NIfTI volumes through `dsal run`'s loop: the space is picked from the data, the
    U-Net is 3D, rounds train on patches, the pool is scored per volume through sliding windows, and
    the weak labeler's masks are NIfTI files at the input's grid; the run resumes from its folder."""
    from dsal_tf.active import run_active_learning
    from dsal_tf.components import build, resolved
    from dsal_tf.pool import Pool
    from dsal_tf.run import Run

    cfg = _cfg(volume_data, tmp_path, nb_labeled=2, nb_iterations=1, nb_next_sample=1, pseudo_epoch=1,
               nb_pseudo_initial=1, nb_initial_epochs=1, nb_active_epochs=1, query_strategy=strategy,
               trainer=trainer, foreground_oversample=0.5, mixed_precision="off")
    assert type(build(resolved(cfg)).space).__name__ == "VolumeSpace"
    run_active_learning(cfg, log=lambda m: None)
    run = Run(cfg.run_dir)
    assert run.completed() == [0, 1]
    pool = Pool.load(run.pool_file(1))
    assert len(pool.labelled) == 3
    scores = (run.round_dir(1) / "scores.csv").read_text().splitlines()
    assert len(scores) == 1 + len(TRAIN) - 2  # one row per unlabelled volume
    pseudo = sorted((run.round_dir(1) / "pseudo").glob("*.nii.gz"))
    assert len(pseudo) == (1 if trainer == "standard" else 0)  # pool trainers take no whole-image pseudo labels
    for path in pseudo:
        written = nib.load(str(path))
        source = nib.load(str(volume_data / "trainImg" / path.name))
        assert written.shape == source.shape and np.allclose(written.affine, source.affine)
    run_active_learning(cfg.replace(nb_iterations=2), log=lambda m: None)  # resumes after round 1
    assert run.completed() == [0, 1, 2]
    from dsal_tf.evaluate import evaluate_run

    table = evaluate_run(cfg, rounds=[2], log=lambda m: None)  # `python test.py` on volumes: metrics in mm
    per_volume = pd.read_csv(run.test_metrics(2))
    assert list(per_volume["name"]) == [n for n, _, _ in TEST] and per_volume["dice"].between(0, 1).all()
    assert len(table) == 1
    picture = cv2.imread(str(run.path / "overlays" / "round_02.png"))  # a row of three planes per test volume
    assert picture is not None and picture.shape[0] == 192 * min(cfg.nb_overlays, len(TEST))


def test_a_volume_scores_the_same_whatever_the_padding_around_it(tiny_unet):
    """Per-volume scores are means over the volume's own voxels: the same volume padded into a larger
    grid (a pool with a larger volume in it) keeps its score, so small volumes are not ranked lower."""
    from dsal_tf.strategies.dsal import DSALQuery
    from dsal_tf.strategies.entropy import EntropyQuery
    from dsal_tf.volume_space import VolumeNormalizer

    rng = np.random.default_rng(0)
    volume = rng.normal(size=(12, 14, 10, 1)).astype(np.float16)
    mask = (rng.random((12, 14, 10, 1)) > 0.7).astype(np.uint8)

    def padded(grid):
        x, y = np.zeros((1, *grid, 1), np.float16), np.zeros((1, *grid, 1), np.uint8)
        x[0, 2:14, 3:17, 1:11], y[0, 2:14, 3:17, 1:11] = volume, mask
        return x, y

    space = VolumeSpace(resolve({"depth": 3, "batch_size": 2}), VolumeSettings(patch_size=(8, 8, 8)))
    norm = VolumeNormalizer(patch_size=(8, 8, 8))
    for query in (EntropyQuery(), DSALQuery()):
        small = space.score_pool(query, tiny_unet, *padded((16, 24, 16)), norm)
        large = space.score_pool(query, tiny_unet, *padded((32, 40, 24)), norm)
        for key in ("uncertainty", "confidence"):
            np.testing.assert_allclose(small[key], large[key], rtol=1e-5)
        assert small["pred"].shape == (1, 16, 24, 16, 1) and large["pred"].shape == (1, 32, 40, 24, 1)
        assert not large["pred"][0, 16:].any()  # nothing predicted in the padding


def test_auto_precision_trains_volumes_in_float32(volume_data):
    """bf16 stalled the 3D U-Net on the hippocampus (docs/gpus.md#precision): `auto` is fp32 on volumes,
    whatever the hardware; an explicit choice is kept."""
    from dsal_tf.train import resolve_precision

    assert resolve_precision(resolve({"data_path": str(volume_data)})) == "off"
    assert resolve_precision(resolve({"data_path": str(volume_data), "mixed_precision": "bfloat16"})) == "bfloat16"


@pytest.mark.slow
@pytest.mark.compiled  # the traced sliding-window inference and scoring of volumes
def test_a_volume_round_killed_after_its_pseudo_labels_resumes_bit_for_bit(volume_data, tmp_path, monkeypatch):
    """Round 2 of a volume run dies in its fit, after the pool (with its whole-volume pseudo labels) is saved;
    the next `dsal run` redoes round 2 and ends where an uninterrupted run ends: the same labelled map, the
    same pseudo-labelled volumes and masks, the same weights (a 5D pseudo mask was dropped on load before)."""
    import keras

    from dsal_tf import train
    from dsal_tf.active import run_active_learning
    from dsal_tf.pool import Pool
    from dsal_tf.run import Run

    settings = dict(nb_labeled=2, nb_iterations=2, nb_next_sample=1, pseudo_epoch=1, nb_pseudo_initial=1,
                    pseudo_rate=0, nb_initial_epochs=1, nb_active_epochs=1, query_strategy="dsal",
                    mixed_precision="off", steps_per_epoch=2)
    ref = _cfg(volume_data, tmp_path / "ref", **settings)
    run_active_learning(ref, log=lambda m: None)
    cfg = _cfg(volume_data, tmp_path / "killed", **settings)
    real_fit = train.fit

    def dies_in_round_2(job):
        if job.out_dir.name == "round_02":
            raise KeyboardInterrupt("killed in round 2's fit")
        return real_fit(job)

    monkeypatch.setattr(train, "fit", dies_in_round_2)
    with pytest.raises(KeyboardInterrupt):
        run_active_learning(cfg, log=lambda m: None)
    monkeypatch.setattr(train, "fit", real_fit)
    assert Run(cfg.run_dir).completed() == [0, 1]
    run_active_learning(cfg, log=lambda m: None)
    a, b = Run(ref.run_dir), Run(cfg.run_dir)
    assert b.completed() == [0, 1, 2]
    for r in range(3):
        pa, pb = Pool.load(a.pool_file(r)), Pool.load(b.pool_file(r))
        assert np.array_equal(pa.labelled_map, pb.labelled_map) and np.array_equal(pa.pseudo_idx, pb.pseudo_idx)
        assert (pa.pseudo_masks is None) == (pb.pseudo_masks is None)
        if pa.pseudo_masks is not None:
            assert pa.pseudo_masks.ndim == 5 and np.array_equal(pa.pseudo_masks, pb.pseudo_masks)
        wa, wb = (keras.models.load_model(run.round_dir(r) / "best.keras", compile=False).get_weights()
                  for run in (a, b))
        assert all(x.tobytes() == y.tobytes() for x, y in zip(wa, wb)), f"round {r}: other weights"
    assert len(Pool.load(b.pool_file(2)).pseudo_idx) == 1  # round 2 trained with a pseudo-labelled volume
