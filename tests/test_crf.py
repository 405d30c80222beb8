import numpy as np
import pytest

pytest.importorskip("pydensecrf.densecrf", reason="pydensecrf2 is the optional [crf] extra")

from dsal_tf.crf import crf_refine, refine_pseudo_labels  # noqa: E402


def edge_case():
    """A dark square on bright skin, and a prediction one pixel too wide on the right."""
    img = np.full((24, 24, 3), 220, np.uint8)
    img[6:18, 6:18] = 40
    truth = np.zeros((24, 24, 1), np.uint8)
    truth[6:18, 6:18] = 1
    pred = np.zeros_like(truth)
    pred[6:18, 6:19] = 1
    return img, truth, pred


def test_crf_snaps_the_mask_to_the_image_edge():
    img, truth, pred = edge_case()
    refined = crf_refine(img, pred)
    assert np.array_equal(refined, truth)


def test_refinement_is_kept_only_above_the_threshold():
    img, truth, pred = edge_case()
    # Dice(pred, truth) = 2*144 / (156 + 144) = 0.96
    out, kept = refine_pseudo_labels(img[None], pred[None], threshold=0.95)
    assert kept == 1 and np.array_equal(out[0], truth)
    out, kept = refine_pseudo_labels(img[None], pred[None], threshold=0.98)
    assert kept == 0 and np.array_equal(out[0], pred)
