"""Foreground-aware random: a uniform draw among the items the model predicts foreground in
(docs/methods.md#foreground-aware-random).

nnActive's improved random baseline, for whole items: `RANDOM_FG_SHARE` of the query (0.67, nnActive's two
foreground thirds) is drawn uniformly among the images (volumes) whose predicted foreground share exceeds
`RANDOM_FG_MIN_FOREGROUND`; plain random over every item not taken yet fills the rest (also when fewer
qualify). Scored like `random` (DSAL's pass), so the weak labeler is the same. On data where every image
holds the structure and the model finds it (ISIC), it is plain random.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..settings import in_range
from .base import register_query
from .random_query import RandomQuery


def foreground_random_select(foreground: np.ndarray, n: int, min_foreground: float, rng: np.random.Generator,
                             share: float = 1.0) -> np.ndarray:
    """`n` distinct positions: `share * n` (rounded half up) from a seeded permutation of the items with `foreground >
    min_foreground` (all of them if fewer qualify), then a seeded permutation of all the items not taken yet
    fills the rest. `share = 1`: every eligible item before any other."""
    foreground = np.asarray(foreground)
    n = min(n, len(foreground))
    first = rng.permutation(np.flatnonzero(foreground > min_foreground))[:int(np.floor(share * n + 0.5))]
    if len(first) == n:
        return first
    rest = np.setdiff1d(np.arange(len(foreground)), first)
    return np.concatenate([first, rng.permutation(rest)[:n - len(first)]])


@register_query("random_fg")
class ForegroundRandomQuery(RandomQuery):
    """Random among the items with predicted foreground for a share of the query; plain random for the rest."""

    @dataclass(frozen=True)
    class Settings(RandomQuery.Settings):
        random_fg_min_foreground: float = 0.001  # random_fg: eligible when the predicted foreground share exceeds this
        random_fg_share: float = 0.67  # random_fg: of the query, from eligible items (nnActive: 2 of 3 thirds)

        def check(self):
            in_range("random_fg_min_foreground", self.random_fg_min_foreground, 0.0, 1.0)
            in_range("random_fg_share", self.random_fg_share, 0.0, 1.0, high_open=False)

    def pick(self, scores, n, rng: np.random.Generator, round_: int = 1) -> np.ndarray:
        s = self.settings
        return foreground_random_select(scores["foreground"], n, s.random_fg_min_foreground, rng, s.random_fg_share)
