"""Pseudo-label policies: who the weak labeler labels (METHODS.md section 1)."""

from __future__ import annotations

import numpy as np

from .base import PseudoPolicy, register_pseudo


def confidence_select(confidence: np.ndarray, certainty: np.ndarray, n: int, use_histogram: bool = True) -> np.ndarray:
    """DSAL's rule. Candidates: images whose confidence lies in the top bin of a 10-bin histogram,
    filled up with the most certain others if too few; then the `n` most certain candidates."""
    n = min(n, len(certainty))
    order = np.argsort(-certainty, kind="stable")
    if not use_histogram:
        return order[:n]
    edges = np.histogram_bin_edges(confidence, bins=10)
    in_top = confidence >= edges[-2]
    cand = [i for i in order if in_top[i]]
    if len(cand) < n:
        cand += [i for i in order if not in_top[i]][: n - len(cand)]
    cand = np.array(cand, np.int64)
    return cand[np.argsort(-certainty[cand], kind="stable")][:n]


def with_foreground(scores: dict[str, np.ndarray], available: np.ndarray, min_foreground: float) -> np.ndarray:
    """The pseudo-label candidates among `available` whose predicted mask covers at least
    `min_foreground` of the image (`PSEUDO_MIN_FOREGROUND`; 0 keeps all, the reference rule).

    Soft Dice with smoothing gives Dice(empty, empty) = 1, so an image where every head predicts
    nothing looks the most certain of all; on data where every image holds a structure its empty
    pseudo mask is always wrong."""
    if min_foreground <= 0:
        return available
    return available[scores["foreground"][available] >= min_foreground]


@register_pseudo("confidence")
class ConfidencePolicy(PseudoPolicy):
    def select(self, scores, available, n, rng):
        conf = scores["confidence"][available]
        cert = -scores["uncertainty"][available]
        return available[confidence_select(conf, cert, n, self.cfg.conf_thres)]


@register_pseudo("random")
class RandomPolicy(PseudoPolicy):
    def select(self, scores, available, n, rng):
        return rng.permutation(available)[:n]


@register_pseudo("none")
class NoPseudo(PseudoPolicy):
    def select(self, scores, available, n, rng):
        return np.zeros(0, np.int64)
