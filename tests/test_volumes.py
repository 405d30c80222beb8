"""3D building blocks on tiny synthetic volumes: NIfTI reading and its errors, resampling round
trips, per-volume metrics in mm, the 3D U-Net, sliding-window inference and patch sampling."""

from __future__ import annotations

import gzip
import math

import nibabel as nib
import numpy as np
import pytest

from dsal_tf import volumes as V
from dsal_tf.errors import DsalError
from dsal_tf.metrics import volume_metrics
from dsal_tf.sliding import (
    PatchSampler,
    gaussian_importance,
    sliding_window_predict,
    window_starts,
)

SHAPE = (16, 16, 16)


def _cube(lo, size=4, shape=SHAPE):
    m = np.zeros(shape, np.uint8)
    m[tuple(slice(a, a + size) for a in lo)] = 1
    return m


def _ball(radius, shape=SHAPE):
    grid = np.indices(shape) - (np.asarray(shape) - 1)[:, None, None, None] / 2
    return (np.sqrt((grid**2).sum(0)) <= radius).astype(np.uint8)


def _affine(spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)):
    a = np.diag([*spacing, 1.0])
    a[:3, 3] = origin
    return a


def _save(path, array, affine=None, **header):
    img = nib.Nifti1Image(np.asarray(array), _affine() if affine is None else affine)
    if "slope" in header:
        img.header.set_slope_inter(header["slope"], 0.0)
    nib.save(img, str(path))
    return path


def _one_line_naming(exc: pytest.ExceptionInfo, path) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and str(path) in msg, msg
    return msg


# --- metrics in mm ---------------------------------------------------------------------------------

def test_cube_shifted_one_voxel_along_a_2mm_axis():
    # Two 4x4x4 cubes, the second one voxel further along axis 0 (2 mm there, 1 mm elsewhere).
    # Overlap 3x4x4 = 48: dice = 96/128 = 0.75, iou = 48/80 = 0.6.
    # Each surface has 64 - 8 (the 2x2x2 core) = 56 voxels. A -> B: the 16 on A's far face are
    # 2 mm from B's face; the 4 inner voxels of A's near face are 1 mm (in-plane) from B's ring;
    # the other 36 lie on B's surface. Same B -> A. Pooled: 72 zeros, 8 ones, 32 twos:
    # hd95 = 2 mm (position 105.45 of 112 is a two), asd = (8 + 64) / 112.
    a, b = _cube((4, 4, 4)), _cube((5, 4, 4))
    got = volume_metrics(a, b, spacing=(2.0, 1.0, 1.0))
    assert got["dice"] == pytest.approx(0.75) and got["iou"] == pytest.approx(0.6)
    assert got["hd95"] == pytest.approx(2.0) and got["hd95_penalized"] == pytest.approx(2.0)
    assert got["asd"] == pytest.approx(72 / 112)
    # At 1 mm isotropic the 20 nonzero distances per side are all 1 mm.
    iso = volume_metrics(a[..., None], b[..., None], spacing=1.0)
    assert iso["hd95"] == pytest.approx(1.0) and iso["asd"] == pytest.approx(40 / 112)
    assert iso["dice"] == got["dice"]


def test_spheres_in_mm():
    big, small = _ball(5.0), _ball(3.0)
    same = volume_metrics(big, big, spacing=(1.5, 1.5, 1.5))
    assert same == {"dice": 1.0, "iou": 1.0, "hd95": 0.0, "asd": 0.0, "hd95_penalized": 0.0}
    # Concentric spheres: small inside big, so dice = 2|small| / (|big| + |small|); the radii differ
    # by 2 voxels, so every surface distance is about 2 voxels, and twice that at 2 mm spacing.
    one, two = volume_metrics(big, small, 1.0), volume_metrics(big, small, 2.0)
    assert one["dice"] == pytest.approx(2 * small.sum() / (big.sum() + small.sum()))
    assert 1.5 <= one["hd95"] <= 2.5
    assert two["hd95"] == pytest.approx(2 * one["hd95"]) and two["asd"] == pytest.approx(2 * one["asd"])
    assert two["dice"] == one["dice"]
    # A missed sphere: hd95 undefined, the penalised score is the diagonal in mm.
    missed = volume_metrics(big, np.zeros(SHAPE), spacing=(2.0, 1.0, 1.0))
    assert math.isnan(missed["hd95"]) and missed["dice"] == 0.0
    assert missed["hd95_penalized"] == pytest.approx(math.sqrt(32**2 + 16**2 + 16**2))


# --- reading, resampling, writing -----------------------------------------------------------------

def test_pairs_under_both_naming_rules(tmp_path):
    for rule, label_name in (("same", "v1.nii.gz"), ("isic", "v1_segmentation.nii")):
        root = tmp_path / rule
        (root / "trainImg").mkdir(parents=True)
        (root / "trainGT").mkdir()
        _save(root / "trainImg" / "v1.nii.gz", np.zeros((4, 4, 4), np.float32))
        _save(root / "trainGT" / label_name, np.zeros((4, 4, 4), np.uint8))
        [(img, label)] = V.find_volume_pairs(root, "train")
        assert label.name == label_name and V.volume_stem(img) == "v1"
        assert V.dataset_rank(root) == 3
    _save(tmp_path / "same" / "trainImg" / "v2.nii", np.zeros((4, 4, 4), np.float32))
    with pytest.raises(DsalError) as e:
        V.find_volume_pairs(tmp_path / "same", "train")
    assert "v2" in _one_line_naming(e, tmp_path / "same" / "trainImg" / "v2.nii")


def test_spacing_round_trip_keeps_grid_and_world_positions(tmp_path):
    # 8 slices at 2 mm resampled to 1 mm: 16 slices; an identity "prediction" (the resampled
    # label as probabilities) restored to the input grid is the input label again.
    label = np.zeros((8, 16, 16), np.uint8)
    label[2:6, 5:11, 4:9] = 1
    affine = _affine((2.0, 1.0, 1.0), (10.0, -5.0, 3.0))
    image = np.where(label, 300.0, 100.0).astype(np.float32) + np.arange(8)[:, None, None]
    _save(tmp_path / "img.nii.gz", image, affine)
    _save(tmp_path / "lab.nii.gz", label, affine)
    case = V.load_case(tmp_path / "img.nii.gz", tmp_path / "lab.nii.gz", spacing=(1.0, 1.0, 1.0))
    assert case.image.shape == case.label.shape == (16, 16, 16) and case.spacing == (1.0, 1.0, 1.0)
    # z-scored before resampling (as nnU-Net): linear interpolation keeps the mean, smooths the spread
    assert abs(case.image.mean()) < 1e-4 and 0.9 < case.image.std() <= 1.0

    def world_centre(mask, aff):
        return aff[:3, :3] @ np.argwhere(mask > 0).mean(0) + aff[:3, 3]

    np.testing.assert_allclose(world_centre(case.label, case.affine), world_centre(label, affine))
    np.testing.assert_allclose(np.diag(case.affine)[:3], (1.0, 1.0, 1.0))
    back = V.restore(case.label.astype(np.float32)[..., None], case) > 0.5
    np.testing.assert_array_equal(back, label.astype(bool))
    out = V.write_mask(tmp_path / "pred.nii.gz", back, case.source)
    written = V.read_volume(out, dtype=None)
    np.testing.assert_array_equal(written.affine, affine)
    assert written.spacing == (2.0, 1.0, 1.0) and written.array.dtype == np.uint8
    np.testing.assert_array_equal(written.array, label)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left


def test_write_mask_ignores_the_images_intensity_scaling(tmp_path):
    ref = V.read_volume(_save(tmp_path / "scaled.nii", np.ones((4, 4, 4), np.int16), slope=2.0))
    assert ref.array.max() == 2.0
    mask = _cube((1, 1, 1), 2, (4, 4, 4))
    written = nib.load(str(V.write_mask(tmp_path / "mask.nii", mask, ref)))
    np.testing.assert_array_equal(np.asarray(written.dataobj), mask)
    np.testing.assert_array_equal(written.affine, ref.affine)


def test_median_spacing_from_headers(tmp_path):
    paths = [_save(tmp_path / f"{i}.nii.gz", np.zeros((4, 4, 4), np.float32), _affine(s))
             for i, s in enumerate([(1, 1, 1), (2, 1, 1), (3, 1, 2)])]
    assert V.pool_spacing(paths) == (2.0, 1.0, 1.0)
    assert V.resampled_shape((35, 51, 35), (1.0, 1.0, 1.0), (2.0, 1.0, 0.5)) == (18, 51, 70)


def test_normalisations():
    ct = np.array([-1000.0, -160.0, 40.0, 240.0, 3000.0]).reshape(1, 1, 5)
    np.testing.assert_allclose(V.normalize(ct, "ct").ravel(), [0, 0, 0.5, 1, 1])
    z = V.normalize(np.arange(8.0).reshape(2, 2, 2), "zscore")
    assert abs(z.mean()) < 1e-6 and z.std() == pytest.approx(1.0)
    np.testing.assert_array_equal(V.zscore(np.full((2, 2, 2), 7.0)), 0.0)
    with pytest.raises(DsalError):
        V.normalize(ct, "hu")


def test_binary_labels_accepted(tmp_path):
    img = V.read_volume(_save(tmp_path / "i.nii.gz", np.zeros((4, 4, 4), np.float32)))
    lab255 = _cube((0, 0, 0), 2, (4, 4, 4)) * 255
    got = V.read_label(_save(tmp_path / "l.nii.gz", lab255), img)
    np.testing.assert_array_equal(got, lab255 // 255)
    assert got.dtype == np.uint8


# --- bad input: one line naming the file ----------------------------------------------------------

def _bad_inputs(tmp_path):
    """(name, path named in the message, call that must raise, word in the message)."""
    vol = np.zeros((8, 8, 8), np.float32)
    img = _save(tmp_path / "img.nii.gz", vol)
    four_d = _save(tmp_path / "four_d.nii.gz", np.zeros((8, 8, 8, 2), np.float32))
    flat = _save(tmp_path / "flat.nii.gz", np.zeros((16, 16), np.float32))
    slab = _save(tmp_path / "slab.nii.gz", np.zeros((16, 16, 1), np.float32))
    short = _save(tmp_path / "short.nii.gz", np.zeros((8, 8, 6), np.uint8))
    moved = _save(tmp_path / "moved.nii.gz", np.zeros((8, 8, 8), np.uint8), _affine(origin=(1.0, 0, 0)))
    multi = _save(tmp_path / "multi.nii.gz", (np.arange(512).reshape(8, 8, 8) % 3).astype(np.uint8))
    raw = (tmp_path / "img.nii.gz").read_bytes()
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(raw[: len(raw) // 2])
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(gzip.compress(b"not a nifti header" * 40))
    empty = tmp_path / "empty.nii"
    empty.write_bytes(b"")
    source = V.read_volume(img)
    return [
        ("4D", four_d, lambda: V.read_volume(four_d), "4D"),
        ("2D file", flat, lambda: V.read_volume(flat), "2D"),
        ("one-slice file", slab, lambda: V.load_case(slab), "2D"),
        ("shape mismatch", short, lambda: V.read_label(short, source), "8x8x6"),
        ("affine mismatch", moved, lambda: V.load_case(img, moved), "affine"),
        ("label values", multi, lambda: V.load_case(img, multi), "{0, 1, 2}"),
        ("truncated gz", truncated, lambda: V.read_volume(truncated), "corrupt"),
        ("garbage", garbage, lambda: V.read_volume(garbage), "corrupt"),
        ("empty", empty, lambda: V.read_volume(empty), "empty"),
    ]


def test_each_bad_input_is_one_line_naming_the_file(tmp_path):
    for name, path, call, word in _bad_inputs(tmp_path):
        with pytest.raises(DsalError) as e:
            call()
        assert word in _one_line_naming(e, path), name


def test_a_2d_image_in_a_3d_dataset(tmp_path):
    import cv2

    (tmp_path / "trainImg").mkdir()
    (tmp_path / "trainGT").mkdir()
    _save(tmp_path / "trainImg" / "v1.nii.gz", np.zeros((4, 4, 4), np.float32))
    cv2.imwrite(str(tmp_path / "trainImg" / "slice.png"), np.zeros((4, 4), np.uint8))
    with pytest.raises(DsalError) as e:
        V.find_volume_pairs(tmp_path, "train")
    assert "2D" in _one_line_naming(e, tmp_path / "trainImg" / "slice.png")


# --- the 3D U-Net ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def unet3d():
    from dsal_tf.model import build_unet

    return build_unet((16, 16, 16, 1), base_filters=2, depth=3, dropout=0.5)


def test_3d_unet_heads_shapes_and_names(unet3d):
    from dsal_tf.model import build_unet, with_features

    out = unet3d(np.zeros((2, 16, 16, 16, 1), np.float32))
    assert set(out) == {"main", "side_1", "side_2"}
    assert all(v.shape == (2, 16, 16, 16, 1) for v in out.values())
    assert unet3d.get_layer("main_logits").kernel.shape == (1, 1, 1, 2, 1)
    assert unet3d.get_layer("side_1_logits").kernel.shape == (1, 1, 1, 8, 1)  # 1/4 block: 4x base
    assert unet3d.get_layer("side_2_logits").kernel.shape == (1, 1, 1, 4, 1)
    flat = build_unet((16, 16, 1), base_filters=2, depth=3, dropout=0.5)
    assert [layer.name for layer in unet3d.layers] == [layer.name for layer in flat.layers]
    feats = with_features(unet3d)(np.zeros((2, 16, 16, 16, 1), np.float32))["features"]
    assert feats.shape == (2, 16)  # bottleneck: 2 * 2**3 channels
    for norm in ("batch", "instance"):
        m = build_unet((8, 8, 8, 1), base_filters=2, depth=3, dropout=0.0, norm=norm, side_upsampling="bilinear",
                       dropout_at="bottleneck+deepest")
        assert m(np.zeros((1, 8, 8, 8, 1), np.float32))["side_1"].shape == (1, 8, 8, 8, 1)


def test_trilinear_upsampling_matches_bilinear_2d():
    from keras import layers

    from dsal_tf.model import LinearUpSampling3D

    # Constant along D, trilinear is the 2D bilinear resize of every slice.
    x = np.random.default_rng(0).random((1, 1, 3, 5, 2)).astype(np.float32).repeat(3, axis=1)
    y = np.asarray(LinearUpSampling3D(2)(x))
    flat = np.asarray(layers.UpSampling2D(2, interpolation="bilinear")(x[:, 0]))
    assert y.shape == (1, 6, 6, 10, 2)
    np.testing.assert_allclose(y, np.repeat(flat[:, None], 6, axis=1), atol=1e-6)
    # 1D by hand: [0, 1] -> samples at -0.25 (clamped), 0.25, 0.75, 1.25 (clamped).
    line = np.asarray(LinearUpSampling3D(2)(np.array([0.0, 1.0], np.float32).reshape(1, 2, 1, 1, 1)))
    np.testing.assert_allclose(line[0, :, 0, 0, 0], [0, 0.25, 0.75, 1])


# --- sliding windows and patches ------------------------------------------------------------------

def test_window_starts_and_gaussian():
    assert window_starts(20, 8) == [0, 4, 8, 12]
    assert window_starts(10, 8) == [0, 2]
    assert window_starts(8, 8) == [0] and window_starts(5, 8) == [0]
    g = gaussian_importance((8, 8, 8))
    assert g.max() == 1.0 and g.min() > 0 and g[3, 3, 3] == g[4, 4, 4] == 1.0
    np.testing.assert_array_equal(g, g[::-1, ::-1, ::-1])


def test_sliding_window_is_a_single_pass_on_a_patch_sized_volume(unet3d):
    vol = np.random.default_rng(1).normal(size=(16, 16, 16, 1)).astype(np.float32)
    heads = ("main", "side_1", "side_2")
    got = sliding_window_predict(unet3d, vol, (16, 16, 16), heads=heads)
    once = unet3d(vol[None])
    for h in heads:
        np.testing.assert_allclose(got[h], np.asarray(once[h])[0, ..., 0], rtol=1e-5, atol=1e-6)


def test_sliding_window_blends_windows_back_onto_the_volume():
    # A voxel-wise "model" (probability = first channel): any blend of windows returns the input,
    # so this checks the window bookkeeping, the padding of a short axis and the crop.
    vol = np.random.default_rng(2).random((20, 6, 12, 2)).astype(np.float32)
    calls = []

    def pointwise(batch):
        calls.append(len(batch))
        return {"main": batch[..., :1], "side_1": 1 - batch[..., :1]}

    got = sliding_window_predict(pointwise, vol, (8, 8, 8), heads=("main", "side_1"), batch_size=3)
    np.testing.assert_allclose(got["main"], vol[..., 0], rtol=1e-6)
    np.testing.assert_allclose(got["side_1"], 1 - vol[..., 0], rtol=1e-5, atol=1e-6)
    assert sum(calls) == 4 * 1 * 2 and max(calls) == 3  # windows: 4 along D, 1 padded, 2 along W
    with pytest.raises(KeyError):
        sliding_window_predict(pointwise, vol, (8, 8, 8), heads=("side_2",))


def test_patch_sampler_foreground_share_and_seed():
    images = [np.random.default_rng(3).random(SHAPE).astype(np.float32), np.zeros((6, 16, 16), np.float32)]
    labels = [_cube((10, 10, 10), 2), np.zeros((6, 16, 16), np.uint8)]
    x, y = PatchSampler(images, labels, (8, 8, 8), foreground=1.0, seed=0).batch(6)
    assert x.shape == (6, 8, 8, 8, 1) and y.shape == (6, 8, 8, 8, 1)
    assert all(p.sum() > 0 for p in y)  # every patch forced onto foreground
    sampler = PatchSampler(images, labels, (8, 8, 8), foreground=0.33, seed=5)
    for _ in range(5):
        _, y = sampler.batch(3)
        assert y[2].sum() > 0  # 0.33 of 3: the last patch of each batch
    a = PatchSampler(images, labels, (8, 8, 8), seed=7).batch(4)
    b = PatchSampler(images, labels, (8, 8, 8), seed=7).batch(4)
    np.testing.assert_array_equal(a[0], b[0])
    ds = PatchSampler(images, labels, (8, 8, 8), seed=7).dataset(2, heads=("main", "side_1"))
    bx, by = next(iter(ds))
    assert bx.shape == (2, 8, 8, 8, 1) and set(by) == {"main", "side_1"} and by["main"].shape == (2, 8, 8, 8, 1)
