"""Pseudo-label policies: who the weak labeler labels (docs/methods.md#dsal)."""

from __future__ import annotations

from dataclasses import dataclass

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


@register_pseudo("confidence")
class ConfidencePolicy(PseudoPolicy):
    """DSAL's weak labeler: the most agreeing of the most confident images."""

    @dataclass(frozen=True)
    class Settings(PseudoPolicy.Settings):
        conf_thres: bool = True  # confidence-histogram filter on pseudo-label candidates

    def select(self, scores, available, n, rng):
        conf = scores["confidence"][available]
        cert = -scores["uncertainty"][available]
        return available[confidence_select(conf, cert, n, self.settings.conf_thres)]


@register_pseudo("random")
class RandomPolicy(PseudoPolicy):
    def select(self, scores, available, n, rng):
        return rng.permutation(available)[:n]


@register_pseudo("none")
class NoPseudo(PseudoPolicy):
    def select(self, scores, available, n, rng):
        return np.zeros(0, np.int64)
