"""Overlays by hand: the planes of a volume go through its mask's largest cross-sections, tiles keep the
voxels' physical aspect, and contours take their colours (test.py's volume picture: test_volume_space.py)."""

import cv2
import numpy as np

from dsal_tf.overlays import GREEN, RED, TILE_HEIGHT, planes, tile, to_uint8, volume_tiles, write_grid


def _volume():
    """A 10x12x14 ramp with a 3x4x5 box at [2:5, 6:10, 1:6] and one extra voxel at (8, 1, 12)."""
    vol = np.arange(10 * 12 * 14, dtype=np.float32).reshape(10, 12, 14)
    mask = np.zeros(vol.shape, np.uint8)
    mask[2:5, 6:10, 1:6] = 1
    mask[8, 1, 12] = 1
    return vol, mask


def test_planes_go_through_the_largest_cross_sections():
    vol, mask = _volume()
    (a, [m0], px0), (b, [m1], px1), (c, [m2], px2) = planes(vol, [mask], spacing=(3.0, 1.0, 0.5))
    # axis 0: slices 2-4 hold 20 voxels each: the first of them; axis 1: rows 6-9, 15 each; axis 2: columns 1-5
    for got, want in ((a, vol[2]), (m0, mask[2]), (b, vol[:, 6]), (m1, mask[:, 6]), (c, vol[:, :, 1]),
                      (m2, mask[:, :, 1])):
        np.testing.assert_array_equal(got, want)
    assert (px0, px1, px2) == ((1.0, 0.5), (3.0, 0.5), (3.0, 1.0))
    # no foreground anywhere: the middle slices
    (a, [empty, none], _), *_ = planes(vol, [np.zeros_like(mask), None])
    np.testing.assert_array_equal(a, vol[5])
    assert none is None and not empty.any()


def test_tiles_keep_the_physical_aspect_and_the_contour_colours():
    img = np.full((20, 40), 100, np.uint8)
    gt, pred = np.zeros((20, 40), np.uint8), np.zeros((20, 40), np.uint8)
    gt[5:15, 5:15] = 1
    pred[5:15, 25:35] = 1
    t = tile(img, gt, pred)
    assert t.shape == (TILE_HEIGHT, 2 * TILE_HEIGHT, 3) and t.dtype == np.uint8
    left, right = t[:, :TILE_HEIGHT], t[:, TILE_HEIGHT:]
    assert (left == GREEN).all(-1).sum() > 100 and not (left == RED).all(-1).any()
    assert (right == RED).all(-1).sum() > 100 and not (right == GREEN).all(-1).any()
    assert tile(img, None, None, pixel=(2.0, 1.0)).shape == (TILE_HEIGHT, TILE_HEIGHT, 3)  # rows twice as tall


def test_to_uint8_stretches_mri_values_and_keeps_uint8():
    x = np.linspace(0, 3000, 1000, dtype=np.float32)
    y = to_uint8(x)
    assert y.dtype == np.uint8 and y.min() == 0 and y.max() == 255
    u = np.arange(10, dtype=np.uint8)
    assert to_uint8(u) is u


def test_write_grid_pads_rows_to_the_widest(tmp_path):
    vol, mask = _volume()
    rows = [volume_tiles(vol, mask, mask, spacing=(1, 1, 1)), [tile(np.zeros((8, 8), np.uint8), None, None)]]
    write_grid(rows, tmp_path / "o" / "g.png")
    picture = cv2.imread(str(tmp_path / "o" / "g.png"))
    widths = sum(t.shape[1] for t in rows[0])
    assert picture.shape == (2 * TILE_HEIGHT, widths, 3)
    assert (picture[TILE_HEIGHT:, TILE_HEIGHT:] == 0).all()  # the short row is padded with black
