"""Dense-CRF refinement of pseudo labels (docs/methods.md#dense-crf-refinement, optional).

The CRF snaps a predicted mask to image edges. A refined label is kept only if it stays close
to the prediction, Dice(B0, CRF) > USE_CRF_THRES (0.98 in the reference), so the CRF can polish
a boundary but never invent a lesion. Needs `pip install -e ".[crf]"` (pydensecrf2).
"""

from __future__ import annotations

import numpy as np

from .errors import DsalError
from .metrics import dice


def crf_refine(image: np.ndarray, mask: np.ndarray, iterations: int = 5, gt_prob: float = 0.9) -> np.ndarray:
    """image uint8 [H,W,C], mask {0,1} [H,W,1] -> refined {0,1} mask [H,W,1]."""
    try:
        import pydensecrf.densecrf as dcrf
        from pydensecrf.utils import unary_from_labels
    except ImportError:
        raise DsalError('USE_CRF = True needs pydensecrf2: pip install -e ".[crf]"') from None
    h, w = mask.shape[:2]
    rgb = image if image.shape[-1] == 3 else np.repeat(image, 3, axis=-1)
    crf = dcrf.DenseCRF2D(w, h, 2)
    crf.setUnaryEnergy(unary_from_labels(mask[..., 0].astype(np.int32).ravel(), 2, gt_prob=gt_prob, zero_unsure=False))
    crf.addPairwiseGaussian(sxy=3, compat=3)
    crf.addPairwiseBilateral(sxy=20, srgb=13, rgbim=np.ascontiguousarray(rgb, dtype=np.uint8), compat=10)
    q = np.array(crf.inference(iterations)).reshape(2, h, w)
    return q.argmax(0).astype(np.uint8)[..., None]


def refine_pseudo_labels(images: np.ndarray, masks: np.ndarray, threshold: float) -> tuple[np.ndarray, int]:
    """CRF-refine each mask; keep the refinement only where Dice(mask, refined) > threshold."""
    out = masks.copy()
    kept = 0
    for i, (img, m) in enumerate(zip(images, masks)):
        refined = crf_refine(img, m)
        if dice(m, refined) > threshold:
            out[i] = refined
            kept += 1
    return out, kept
