"""ClaSP PE: class-stratified, scheduled power predictive entropy (docs/methods.md#clasp-pe).

Per item (image or volume), from the main head's probabilities p of one forward pass:
`uncertainty` = PE, the mean over the item's pixels (voxels) of H(p); `fg_entropy` = PE * mean(p), the
class-specific score of a binary mask (PE weighted by the mean foreground probability). A query of n
takes `split_query(n)[0]` items by `fg_entropy` first, then the rest by `uncertainty` among the items
not yet taken, each part with the selection rule: by default `score_power`, a seeded draw with
p ~ score**beta_t where beta_t grows geometrically from 1 to 100 over the rounds (noisy and diverse early,
nearly greedy late).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..settings import Settings, in_range
from .base import QueryStrategy, keep_features, mean_over_pixels, register_query
from .entropy import binary_entropy


def foreground_weighted_entropy(prob):
    """(PE, PE * mean p) per item of probabilities [N,*spatial,1]: the image's mean binary entropy,
    and that entropy times its mean foreground probability. Rank-generic (2D images, 3D volumes)."""
    pe = mean_over_pixels(binary_entropy(prob))
    return pe, pe * mean_over_pixels(prob)


def split_query(n: int, share: float) -> tuple[int, int]:
    """(first, second) part sizes of a query of `n`: first = share * n rounded half up (0.66 of 10 is
    7, of 5 is 3), second the rest."""
    first = min(n, int(np.floor(share * n + 0.5)))
    return first, n - first


def stratified_select(first_key: np.ndarray, second_key: np.ndarray, n: int, share: float,
                      choose: Callable[[np.ndarray, int], np.ndarray]) -> np.ndarray:
    """`n` distinct positions: `split_query(n, share)[0]` by `choose(first_key, k)`, then the rest by
    `choose` over `second_key` among the positions not yet taken; first part first."""
    n = min(n, len(first_key))
    n_first, n_second = split_query(n, share)
    first = np.asarray(choose(first_key, n_first), np.int64) if n_first else np.zeros(0, np.int64)
    rest = np.setdiff1d(np.arange(len(second_key)), first)
    second = rest[np.asarray(choose(second_key[rest], n_second), np.int64)] if n_second else np.zeros(0, np.int64)
    return np.concatenate([first, second])


@register_query("claspe")
class ClaspeQuery(QueryStrategy):
    """ClaSP PE: entropy and foreground-weighted entropy, stratified, with scheduled power noising."""

    default_selection = "score_power"

    @dataclass(frozen=True)
    class Settings(Settings):
        claspe_class_share: float = 0.66  # share of each query picked by foreground-weighted entropy (half up)

        def check(self):
            in_range("claspe_class_share", self.claspe_class_share, 0.0, 1.0, high_open=False)

    def batch_scores(self, model, x):
        out = model(x, training=False)
        prob = out["main"]
        pe, fg = foreground_weighted_entropy(prob)
        return keep_features(out, {"uncertainty": pe, "fg_entropy": fg, "prob": prob})

    def pick(self, scores, n, rng: np.random.Generator, round_: int = 1) -> np.ndarray:
        rule = self.base_selection
        return stratified_select(scores["fg_entropy"], scores["uncertainty"], n, self.settings.claspe_class_share,
                                 lambda key, k: rule.choose(key, k, rng, round_))
