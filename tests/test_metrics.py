"""Tiny hand-checkable cases for the per-image metrics."""

import math

import numpy as np
import pytest

from dsal_tf.metrics import asd, batch_metrics, boundary, dice, hd95, iou, surface_distances


def _mask(shape, *pixels):
    m = np.zeros(shape, dtype=np.uint8)
    for r, c in pixels:
        m[r, c] = 1
    return m


def _square(shape, top, left, side):
    m = np.zeros(shape, dtype=np.uint8)
    m[top : top + side, left : left + side] = 1
    return m


EMPTY = np.zeros((5, 5), dtype=np.uint8)
DOT_A = _mask((5, 7), (2, 1))
DOT_B = _mask((5, 7), (2, 4))  # same row, 3 columns to the right
SQ = _square((6, 7), 1, 1, 4)  # rows 1-4, cols 1-4
SQ_SHIFT = _square((6, 7), 1, 2, 4)  # rows 1-4, cols 2-5

# (name, a, b, dice, iou, hd95, asd)
CASES = [
    # Identical masks: perfect overlap, no border distance.
    ("identical squares", SQ, SQ, 1.0, 1.0, 0.0, 0.0),
    # Two single pixels 3 apart: no overlap; each boundary is the pixel itself, d = 3 both ways.
    ("dots 3 apart", DOT_A, DOT_B, 0.0, 0.0, 3.0, 3.0),
    # 4x4 square vs the same shifted one column: overlap 4 rows x 3 cols = 12.
    #   dice = 2*12 / (16+16) = 0.75, iou = 12 / (16+16-12) = 12/20 = 0.6.
    # Each 12-pixel ring: the 6 pixels on the shared top/bottom rows (cols 2-4 for SQ) lie on
    # the other ring (d=0); the other 6 (left column + right column rows 2-3) are 1 away (d=1).
    # Pooled both ways: 12 zeros + 12 ones -> asd = 0.5; 95th pct of that = 1.
    ("square shifted 1 col", SQ, SQ_SHIFT, 0.75, 0.6, 1.0, 0.5),
    # Both empty: a perfect prediction by convention.
    ("both empty", EMPTY, EMPTY, 1.0, 1.0, 0.0, 0.0),
    # Exactly one empty: no border to measure against -> nan surface distances.
    ("gt empty", EMPTY, _square((5, 5), 1, 1, 2), 0.0, 0.0, math.nan, math.nan),
    ("pred empty", _square((5, 5), 1, 1, 2), EMPTY, 0.0, 0.0, math.nan, math.nan),
]


@pytest.mark.parametrize("name,a,b,d,j,h,s", CASES, ids=[c[0] for c in CASES])
def test_metric_table(name, a, b, d, j, h, s):
    assert dice(a, b) == pytest.approx(d)
    assert iou(a, b) == pytest.approx(j)
    assert hd95(a, b) == pytest.approx(h, nan_ok=True)
    assert asd(a, b) == pytest.approx(s, nan_ok=True)
    # All four are symmetric.
    assert hd95(b, a) == pytest.approx(h, nan_ok=True)
    assert asd(b, a) == pytest.approx(s, nan_ok=True)


def test_boundary_of_3x3_square_is_its_ring():
    # 3x3 square in 5x5: erosion leaves only the centre, so the boundary is the 8-pixel ring.
    ring = boundary(_square((5, 5), 1, 1, 3))
    assert ring.sum() == 8 and not ring[2, 2]


def test_boundary_touches_image_edge():
    # A mask filling the image: erosion treats outside as background (border_value=0), so the
    # image-edge pixels are boundary and only the centre survives.
    ring = boundary(np.ones((3, 3)))
    assert ring.sum() == 8 and not ring[1, 1]


def test_surface_distances_directed_and_hd95_percentile():
    # a: one pixel at col 0; b: pixels at cols 0 and 10 (1x11 image).
    a = _mask((1, 11), (0, 0))
    b = _mask((1, 11), (0, 0), (0, 10))
    np.testing.assert_allclose(surface_distances(a, b), [0.0])
    np.testing.assert_allclose(surface_distances(b, a), [0.0, 10.0])
    # Pooled [0, 0, 10]: asd = 10/3; 95th pct (linear): rank 0.95*2 = 1.9 -> 0 + 0.9*10 = 9.
    assert asd(a, b) == pytest.approx(10 / 3)
    assert hd95(a, b) == pytest.approx(9.0)


def test_spacing_scales_distances():
    # Dots 3 columns apart with 2 units per column -> 6.
    assert hd95(DOT_A, DOT_B, spacing=(1.0, 2.0)) == pytest.approx(6.0)
    assert asd(DOT_A, DOT_B, spacing=0.5) == pytest.approx(1.5)


def test_surface_distances_to_empty_are_inf():
    assert np.isinf(surface_distances(DOT_A, np.zeros_like(DOT_A))).all()
    assert surface_distances(np.zeros_like(DOT_A), DOT_A).size == 0


def test_inputs_thresholded_at_half():
    # 0/255 masks and probability maps mean the same as 0/1.
    assert dice(SQ * 255, SQ_SHIFT.astype(bool)) == pytest.approx(0.75)
    assert dice(SQ * 0.9, SQ * 0.4) == 0.0  # 0.4 is background


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="shapes differ"):
        dice(np.zeros((3, 3)), np.zeros((4, 4)))


def test_batch_metrics_per_image_and_channel_axis():
    gt = np.stack([SQ, SQ, np.zeros_like(SQ)])[..., None]  # [3, 6, 7, 1]
    pred = np.stack([SQ, SQ_SHIFT, SQ])  # [3, 6, 7]
    out = batch_metrics(gt, pred)
    assert set(out) == {"dice", "iou", "hd95", "asd", "hd95_penalized"}
    np.testing.assert_allclose(out["dice"], [1.0, 0.75, 0.0])
    np.testing.assert_allclose(out["iou"], [1.0, 0.6, 0.0])
    np.testing.assert_allclose(out["hd95"], [0.0, 1.0, np.nan])
    np.testing.assert_allclose(out["asd"], [0.0, 0.5, np.nan])
    np.testing.assert_allclose(out["hd95_penalized"], [0.0, 1.0, np.hypot(6, 7)])  # 6x7 image: diagonal
    assert all(v.shape == (3,) and v.dtype == np.float64 for v in out.values())


def test_hd95_penalized_scores_an_empty_prediction_as_the_diagonal():
    from dsal_tf.metrics import hd95_penalized

    gt = np.zeros((30, 40), bool)
    gt[10:14, 10:14] = True
    assert hd95_penalized(np.zeros_like(gt), gt) == pytest.approx(50.0)  # sqrt(30^2 + 40^2)
    assert hd95_penalized(gt, np.zeros_like(gt), spacing=(2.0, 0.5)) == pytest.approx(np.hypot(60, 20))
    assert hd95_penalized(gt, gt) == 0.0 and hd95_penalized(np.zeros_like(gt), np.zeros_like(gt)) == 0.0


def test_batch_metrics_bad_shape_says_what_to_do():
    with pytest.raises(ValueError, match=r"\[N,H,W\]"):
        batch_metrics(np.zeros((2, 4, 4, 3)), np.zeros((2, 4, 4, 3)))


def test_evaluation_summary_counts_undefined_surface_distances():
    import pandas as pd

    from dsal_tf.evaluate import summarize

    # image 2: exactly one mask empty -> hd95/asd nan, Dice 0; it counts for Dice, not for HD95
    per_image = pd.DataFrame({"dice": [1.0, 0.5, 0.0], "iou": [1.0, 1 / 3, 0.0],
                              "hd95": [0.0, 2.0, np.nan], "asd": [0.0, 1.0, np.nan]})
    s = summarize(per_image)
    assert s["n_undefined"] == 1
    assert s["dice_mean"] == pytest.approx(0.5) and s["hd95_mean"] == pytest.approx(1.0)
    assert s["asd_std"] == pytest.approx(0.5)
    all_nan = summarize(per_image.assign(hd95=np.nan, asd=np.nan))
    assert np.isnan(all_nan["hd95_mean"]) and all_nan["n_undefined"] == 3


def test_pair_metrics_equal_each_metric_alone():
    """`pair_metrics` shares one set of surface distances among hd95, asd and hd95_penalized: the
    values must be those of each function alone, empty masks and anisotropic spacing included."""
    from dsal_tf.metrics import METRICS, SURFACE_METRICS, pair_metrics

    rng = np.random.default_rng(3)
    blob = np.zeros((12, 10), bool)
    blob[3:8, 2:6] = True
    pairs = [(rng.random((12, 10)) > 0.6, rng.random((12, 10)) > 0.5), (blob, np.roll(blob, 2, axis=1)),
             (blob, np.zeros_like(blob)), (np.zeros_like(blob), blob), (np.zeros_like(blob), np.zeros_like(blob))]
    for a, b in pairs:
        got = pair_metrics(a, b, (2.0, 0.5))
        for name, fn in METRICS.items():
            want = fn(a, b, (2.0, 0.5)) if name in SURFACE_METRICS else fn(a, b)
            np.testing.assert_equal(got[name], want, err_msg=name)
