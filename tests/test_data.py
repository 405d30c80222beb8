import shutil

import cv2
import numpy as np
import pytest

from dsal_tf.config import resolve
from dsal_tf.data import Normalizer, find_pairs, load_split, make_dataset
from dsal_tf.errors import DsalError


def write_set(root, naming="isic", n=3, size=(20, 24), split="train"):
    (root / f"{split}Img").mkdir(parents=True, exist_ok=True)
    (root / f"{split}GT").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        img = rng.integers(0, 255, size + (3,), dtype=np.uint8)
        mask = np.zeros(size, np.uint8)
        mask[4:12, 5 + i:15] = 255
        ext = ".jpg" if naming == "isic" else ".png"
        cv2.imwrite(str(root / f"{split}Img" / f"im{i}{ext}"), img)
        gt = f"im{i}_segmentation.png" if naming == "isic" else f"im{i}.png"
        cv2.imwrite(str(root / f"{split}GT" / gt), mask)
    return root


def cfg_for(root, tmp_path, **kw):
    return resolve(dict(data_path=str(root), cache_dir=str(tmp_path / "cache"), img_rows=16, img_cols=16, **kw))


@pytest.mark.parametrize("naming", ["isic", "same"])
def test_both_naming_styles_load(tmp_path, naming):
    root = write_set(tmp_path / "d", naming)
    pairs = find_pairs(root, "train")
    assert [p[1].name for p in pairs][0] == ("im0_segmentation.png" if naming == "isic" else "im0.png")
    split = load_split(cfg_for(root, tmp_path), "train")
    assert split.images.shape == (3, 16, 16, 3) and split.images.dtype == np.uint8
    assert split.masks.shape == (3, 16, 16, 1)
    assert set(np.unique(split.masks)) == {0, 1}


def test_gray_input_has_one_channel(tmp_path):
    root = write_set(tmp_path / "d")
    assert load_split(cfg_for(root, tmp_path, color="gray"), "train").images.shape == (3, 16, 16, 1)


def test_cache_is_reused_and_invalidated(tmp_path):
    root = write_set(tmp_path / "d")
    cfg = cfg_for(root, tmp_path)
    first = load_split(cfg, "train")
    assert isinstance(first.images, np.memmap) and not first.images.flags.writeable  # never fully resident
    assert len(list((tmp_path / "cache").glob("train-*"))) == 1
    load_split(cfg, "train")  # same files and settings: same cache entry
    assert len(list((tmp_path / "cache").glob("train-*"))) == 1
    load_split(cfg.replace(img_rows=32), "train")  # new setting: new entry
    assert len(list((tmp_path / "cache").glob("train-*"))) == 2
    mask = np.zeros((20, 24), np.uint8)
    cv2.imwrite(str(root / "trainGT" / "im0_segmentation.png"), mask)  # changed file: new entry
    split = load_split(cfg, "train")
    assert len(list((tmp_path / "cache").glob("train-*"))) == 3
    assert split.masks[0].sum() == 0


def corrupt(root, case):
    if case == "missing mask":
        (root / "trainGT" / "im1_segmentation.png").unlink()
        return "missing mask for .*im1.jpg"
    if case == "size mismatch":
        cv2.imwrite(str(root / "trainGT" / "im1_segmentation.png"), np.zeros((10, 10), np.uint8))
        return "size mismatch: .*im1.jpg is 24x20 .* is 10x10"
    if case == "zero-byte image":
        (root / "trainImg" / "im2.jpg").write_bytes(b"")
        return "im2.jpg is empty"
    if case == "corrupt image":
        (root / "trainImg" / "im2.jpg").write_bytes(b"not a jpeg at all")
        return "cannot decode image .*im2.jpg"
    if case == "non-binary mask":
        cv2.imwrite(str(root / "trainGT" / "im0_segmentation.png"),
                    np.arange(480, dtype=np.uint8).reshape(20, 24))
        return "mask .*im0_segmentation.png is not binary"
    if case == "empty folder":
        shutil.rmtree(root / "trainImg")
        (root / "trainImg").mkdir()
        return "trainImg has no images"


@pytest.mark.parametrize("case", ["missing mask", "size mismatch", "zero-byte image", "corrupt image",
                                  "non-binary mask", "empty folder"])
def test_bad_input_is_one_clear_error(tmp_path, case):
    root = write_set(tmp_path / "d")
    match = corrupt(root, case)
    with pytest.raises(DsalError, match=match) as info:
        load_split(cfg_for(root, tmp_path), "train")
    assert "\n" not in str(info.value)


def test_normalizer_zscore_and_unit():
    imgs = np.array([[[[0, 255]]], [[[255, 255]]]], np.uint8).reshape(2, 1, 1, 2)
    z = Normalizer.fit(imgs, "zscore")
    assert np.allclose(z.mean, (0.5, 1.0)) and np.allclose(z.std[0], 0.5)
    out = z.numpy(imgs)
    assert np.allclose(out[..., 0].ravel(), [-1, 1])
    u = Normalizer.fit(imgs, "unit")
    assert np.allclose(u.numpy(imgs), imgs / 255.0)


def test_augmentation_moves_image_and_mask_together():
    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 255, (16, 8, 8, 1), dtype=np.uint8)
    masks = (imgs > 127).astype(np.uint8)  # the mask is a function of the image
    ds = make_dataset(imgs, masks, Normalizer.fit(imgs, "unit"), 16, augment=True, seed=5)
    x, y = next(iter(ds))
    x, y = x.numpy(), y.numpy()
    assert np.array_equal((x * 255 > 127.5).astype(np.float32), y)
    assert not np.array_equal(x, imgs / 255.0)  # something moved


def test_multi_head_targets():
    imgs = np.zeros((4, 8, 8, 3), np.uint8)
    ds = make_dataset(imgs, imgs[..., :1], Normalizer.fit(imgs, "unit"), 2, heads=("main", "side_1"))
    _, y = next(iter(ds))
    assert set(y) == {"main", "side_1"} and y["main"].shape == (2, 8, 8, 1)


def _fit_reference(images, chunk=512):
    """The statistics as first written (float64 copy / 255, squares in a new array), for bit-identity."""
    channels = images.shape[-1]
    total, squares = np.zeros(channels), np.zeros(channels)
    for start in range(0, len(images), chunk):
        part = np.asarray(images[start:start + chunk], np.float64).reshape(-1, channels) / 255.0
        total += part.sum(0)
        squares += np.square(part).sum(0)
    n = max(images.size // channels, 1)
    mean = total / n
    std = np.sqrt(np.maximum(squares / n - mean**2, 0.0))
    return tuple(mean.tolist()), tuple(np.maximum(std, 1e-6).tolist())


@pytest.mark.parametrize("channels", [3, 1])
def test_normalizer_holds_one_float_chunk_of_a_memmapped_pool_and_is_bit_identical(tmp_path, channels):
    """Issue 17: the statistics pass held three float64 chunks at once (the previous chunk alive while
    the next was converted), a step of 1 GiB at 192x240 above 512 images. Now one reused buffer,
    the same at 600 and 3000 images, with bit-identical statistics."""
    import tracemalloc

    rng = np.random.default_rng(0)
    peaks = {}
    for n in (600, 3000):
        path = tmp_path / f"images{n}_{channels}.npy"
        out = np.lib.format.open_memmap(path, "w+", np.uint8, (n, 16, 16, channels))
        out[:] = rng.integers(0, 256, out.shape, dtype=np.uint8)
        out.flush()
        del out
        images = np.load(path, mmap_mode="r")
        tracemalloc.start()
        norm = Normalizer.fit(images, "zscore")
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert (norm.mean, norm.std) == _fit_reference(images)
    chunk_bytes = 512 * 16 * 16 * channels * 8  # one float64 chunk of 512 images
    assert peaks[3000] < 1.25 * chunk_bytes, peaks
    assert peaks[3000] < 1.1 * peaks[600], peaks
    small = rng.integers(0, 256, (37, 5, 7, channels), dtype=np.uint8)
    assert (lambda z: (z.mean, z.std))(Normalizer.fit(small, "zscore", chunk=8)) == _fit_reference(small, 8)
