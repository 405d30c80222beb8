"""Loaders under hostile files: the result is a correct array or the one-line DsalError, never a traceback.

Also the lossy-mask rule (JPEG-like masks binarized at 127, label maps refused) and the streaming
normalizer against exact statistics.
"""

import io

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from dsal_tf.data import Normalizer, binarize_mask, read_image, read_mask, read_pair
from dsal_tf.errors import DsalError

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def check_pair(img_path, mask_path, color="rgb"):
    try:
        img, mask, _ = read_pair(img_path, mask_path, 16, 24, color)
    except DsalError as exc:
        assert "\n" not in str(exc) and str(exc)
        return None
    assert img.shape == (16, 24, 3 if color == "rgb" else 1) and img.dtype == np.uint8
    assert mask.shape == (16, 24, 1) and set(np.unique(mask)) <= {0, 1}
    return img, mask


@FUZZ
@given(data=st.binary(max_size=600), suffix=st.sampled_from([".png", ".jpg", ".bmp", ".tif"]))
def test_random_bytes_never_crash(tmp_path, data, suffix):
    path = tmp_path / f"x{suffix}"
    path.write_bytes(data)
    check_pair(path, None)
    with pytest.raises(DsalError):
        read_mask(path)


def encode(array, mode, fmt, exif_orientation=None):
    img = Image.fromarray(array)
    if mode == "P":
        img = img.convert("P")
    elif mode in ("RGBA", "L", "RGB"):
        img = img.convert(mode)
    buf = io.BytesIO()
    kwargs = {}
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        kwargs["exif"] = exif.tobytes()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


@FUZZ
@given(h=st.integers(4, 40), w=st.integers(4, 40), mode=st.sampled_from(["RGB", "RGBA", "L", "P", "I16"]),
       fmt=st.sampled_from(["PNG", "JPEG"]), cut=st.floats(0.0, 1.0), seed=st.integers(0, 2**16),
       color=st.sampled_from(["rgb", "gray"]))
def test_real_image_kinds_and_truncations(tmp_path, h, w, mode, fmt, cut, seed, color):
    rng = np.random.default_rng(seed)
    if mode == "I16":
        if fmt == "JPEG":
            return
        data_arr = rng.integers(0, 65535, (h, w), dtype=np.uint16)
        ok, buf = cv2.imencode(".png", data_arr)
        blob = buf.tobytes()
    else:
        src = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        if fmt == "JPEG" and mode in ("RGBA", "P"):
            mode = "RGB"
        blob = encode(src, mode, fmt)
    mask = np.zeros((h, w), np.uint8)
    mask[: h // 2] = 255
    img_path, mask_path = tmp_path / f"im.{fmt.lower()}", tmp_path / "im.png"
    img_path.write_bytes(blob[: max(1, int(len(blob) * cut))] if cut < 0.98 else blob)
    cv2.imwrite(str(mask_path), mask)
    out = check_pair(img_path, mask_path, color)
    if out is not None and cut >= 0.98:
        assert out[1].sum() > 0  # the top half is foreground


def test_exif_rotated_jpeg_and_its_mask_agree(tmp_path):
    img = np.zeros((10, 30, 3), np.uint8)
    (tmp_path / "im.jpg").write_bytes(encode(img, "RGB", "JPEG", exif_orientation=6))  # 90 degrees
    assert read_image(tmp_path / "im.jpg", "rgb").shape[:2] == (30, 10)  # decoded upright
    cv2.imwrite(str(tmp_path / "ok.png"), np.zeros((30, 10), np.uint8))
    cv2.imwrite(str(tmp_path / "wrong.png"), np.zeros((10, 30), np.uint8))
    assert read_pair(tmp_path / "im.jpg", tmp_path / "ok.png", 8, 8, "rgb")[1].shape == (8, 8, 1)
    with pytest.raises(DsalError, match="size mismatch"):
        read_pair(tmp_path / "im.jpg", tmp_path / "wrong.png", 8, 8, "rgb")


def test_16_bit_and_palette_masks(tmp_path):
    m = np.zeros((6, 6), np.uint16)
    m[:3] = 1  # a 0/1 16-bit mask must not lose its foreground to 8-bit scaling
    cv2.imwrite(str(tmp_path / "m16.png"), m)
    mask, lossy = read_mask(tmp_path / "m16.png")
    assert mask[:3].all() and not mask[3:].any() and not lossy
    Image.fromarray((m * 255).astype(np.uint8)).convert("P").save(tmp_path / "pal.png")
    mask, _ = read_mask(tmp_path / "pal.png")
    assert mask[:3].all() and not mask[3:].any()


# ------------------------------------------------------------------ the lossy-mask rule
def test_lossy_rule_hand_made_cases(tmp_path):
    p = tmp_path / "m.png"
    jpeg_like = np.zeros((40, 40), np.uint8)
    jpeg_like[:20] = 255
    jpeg_like[0, :3] = (3, 251, 140)  # a few compression greys (each far below 1% of the pixels)
    jpeg_like[30, :2] = (100, 20)
    mask, lossy = binarize_mask(jpeg_like, p)
    assert lossy and mask[:20].sum() == 799 and mask[20:].sum() == 0  # 3 -> 0, 251 -> 1, 140 -> 1, 100 -> 0
    assert not binarize_mask(np.where(jpeg_like > 127, 255, 0).astype(np.uint8), p)[1]
    too_grey = jpeg_like.copy()
    too_grey[20:22, :] = 100 + np.arange(40, dtype=np.uint8)  # 5% + 2 px of scattered mid-greys: refused
    with pytest.raises(DsalError, match="mid-grey"):
        binarize_mask(too_grey, p)
    labels = np.repeat(np.array([0, 1, 2, 2, 0], np.uint8), 320).reshape(40, 40)  # a 0/1/2 label map
    with pytest.raises(DsalError, match="several labels"):
        binarize_mask(labels, p)
    tri = np.repeat(np.array([0, 128, 255, 255, 0], np.uint8), 320).reshape(40, 40)
    with pytest.raises(DsalError, match="several labels"):
        binarize_mask(tri, p)


def test_lossy_masks_are_counted_in_one_warning(tmp_path, capsys):
    from dsal_tf.config import resolve
    from dsal_tf.data import load_split

    for split in ("train",):
        (tmp_path / f"{split}Img").mkdir()
        (tmp_path / f"{split}GT").mkdir()
    for i in range(3):
        cv2.imwrite(str(tmp_path / "trainImg" / f"a{i}.png"), np.full((20, 20, 3), 90, np.uint8))
        m = np.zeros((20, 20), np.uint8)
        m[:10] = 255
        if i < 2:
            m[0, 0] = 250  # saved lossy
        cv2.imwrite(str(tmp_path / "trainGT" / f"a{i}.png"), m)
    cfg = resolve(dict(data_path=str(tmp_path), img_rows=16, img_cols=16, cache_dir=str(tmp_path / "c")))
    split = load_split(cfg, "train")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "2 train mask(s) were saved lossy" in err
    assert split.masks[:, :8].all() and not split.masks[:, 8:].any()


def test_streaming_normalizer_matches_exact_statistics():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (37, 5, 7, 3), dtype=np.uint8)
    norm = Normalizer.fit(images, "zscore", chunk=8)
    x = images.reshape(-1, 3).astype(np.float64) / 255.0
    np.testing.assert_allclose(norm.mean, x.mean(0), rtol=1e-10)
    np.testing.assert_allclose(norm.std, x.std(0), rtol=1e-8)
