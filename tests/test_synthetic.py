"""The synthetic lesion generator: seeded, binary masks, plausible statistics, ISIC layout."""

import cv2
import numpy as np
import pytest

from dsal_tf.errors import DsalError
from dsal_tf.metrics import dice
from dsal_tf.synthetic import AREA_RANGE, case_rng, make_synthetic, render_case

N_CASES = 24
SIZE = 64


@pytest.fixture(scope="module")
def cases():
    return [render_case(case_rng(0, "train", i), SIZE) for i in range(N_CASES)]


def test_render_case_shapes_and_dtypes(cases):
    image, mask = cases[0]
    assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8
    assert mask.shape == (SIZE, SIZE) and mask.dtype == np.uint8


def test_same_seed_same_arrays_different_seed_different():
    a_img, a_mask = render_case(np.random.default_rng(7), SIZE)
    b_img, b_mask = render_case(np.random.default_rng(7), SIZE)
    c_img, c_mask = render_case(np.random.default_rng(8), SIZE)
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_mask, b_mask)
    assert not np.array_equal(a_img, c_img) and not np.array_equal(a_mask, c_mask)


def test_case_rng_differs_by_seed_split_and_index():
    draws = {
        key: case_rng(*key).random()
        for key in [(0, "train", 0), (1, "train", 0), (0, "val", 0), (0, "train", 1)]
    }
    assert len(set(draws.values())) == 4


def test_masks_binary_with_area_in_range(cases):
    for _, mask in cases:
        assert set(np.unique(mask)) <= {0, 1}
        assert AREA_RANGE[0] <= mask.mean() <= AREA_RANGE[1]
    areas = [m.mean() for _, m in cases]
    assert max(areas) - min(areas) > 0.2  # sizes actually vary


def test_lesion_darker_than_skin_on_average(cases):
    # Faint lesions under strong vignetting may be lighter than the dark corners, so check
    # the average and the large majority, not every case.
    diffs = []
    for image, mask in cases:
        gray = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY).astype(float)
        diffs.append(gray[mask == 0].mean() - gray[mask == 1].mean())
    diffs = np.array(diffs)
    assert diffs.mean() > 10
    assert (diffs > 0).mean() >= 0.9


def test_not_solved_by_a_global_threshold(cases):
    # Varied skin, faint lesions, hairs and vignetting: Otsu on darkness must not be enough
    # (it reaches ~0.67 mean Dice over 200 cases at 128 px).
    scores = []
    for image, mask in cases:
        gray = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
        _, dark = cv2.threshold(gray, 0, 1, cv2.THRESH_BINARY_INV + cv2.THRESH_OTSU)
        scores.append(dice(mask, dark))
    assert np.mean(scores) < 0.85


def test_skin_tone_varies_between_images(cases):
    skin = np.array([image[mask == 0].mean(axis=0) for image, mask in cases])
    assert skin.std(axis=0).max() > 5


def test_make_synthetic_layout_naming_and_counts(tmp_path):
    counts = make_synthetic(tmp_path, counts=(3, 2, 1), size=SIZE, seed=0)
    assert counts == {"train": 3, "val": 2, "test": 1}
    for split, n in counts.items():
        imgs = sorted(p.name for p in (tmp_path / f"{split}Img").iterdir())
        gts = sorted(p.name for p in (tmp_path / f"{split}GT").iterdir())
        assert imgs == [f"SYN_{i:06d}.jpg" for i in range(1, n + 1)]
        assert gts == [f"SYN_{i:06d}_segmentation.png" for i in range(1, n + 1)]
    image = cv2.imread(str(tmp_path / "trainImg" / "SYN_000001.jpg"), cv2.IMREAD_UNCHANGED)
    mask = cv2.imread(
        str(tmp_path / "trainGT" / "SYN_000001_segmentation.png"), cv2.IMREAD_UNCHANGED
    )
    assert image.shape == (SIZE, SIZE, 3)
    assert mask.shape == (SIZE, SIZE) and mask.dtype == np.uint8
    assert set(np.unique(mask)) == {0, 255}
    # The PNG mask is exactly the rendered lesion region.
    _, expected = render_case(case_rng(0, "train", 0), SIZE)
    np.testing.assert_array_equal(mask, expected * 255)


def test_make_synthetic_same_seed_same_bytes(tmp_path):
    make_synthetic(tmp_path / "a", counts=(2, 1, 1), size=SIZE, seed=3)
    make_synthetic(tmp_path / "b", counts=(2, 1, 1), size=SIZE, seed=3)
    make_synthetic(tmp_path / "c", counts=(2, 1, 1), size=SIZE, seed=4)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.*"))
    assert len(files) == 8
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    rel = files[0]
    assert (tmp_path / "a" / rel).read_bytes() != (tmp_path / "c" / rel).read_bytes()


def test_zero_count_split_writes_empty_folders(tmp_path):
    written = make_synthetic(tmp_path, counts=(1, 0, 0), size=SIZE)
    assert written == {"train": 1, "val": 0, "test": 0}
    assert not any((tmp_path / "valImg").iterdir())


@pytest.mark.parametrize("counts", [(1, 2), (1, -1, 1)])
def test_bad_counts_name_the_setting(tmp_path, counts):
    with pytest.raises(DsalError, match="SYNTHETIC_COUNTS"):
        make_synthetic(tmp_path, counts=counts)
