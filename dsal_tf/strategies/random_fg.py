"""Foreground-aware random: a uniform draw among the items the model predicts foreground in
(docs/methods.md#foreground-aware-random).

nnActive's improved random baseline, for whole items: images (volumes) whose predicted foreground share
exceeds `RANDOM_FG_MIN_FOREGROUND` are drawn first, uniformly; when fewer qualify than the query asks,
plain random over the rest fills it. Scored like `random` (DSAL's
pass), so the weak labeler is the same. On data where every image holds the structure and the model
finds it (ISIC), it is plain random.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..settings import in_range
from .base import register_query
from .random_query import RandomQuery


def foreground_random_select(foreground: np.ndarray, n: int, min_foreground: float,
                             rng: np.random.Generator) -> np.ndarray:
    """`n` distinct positions: a seeded permutation of the items with `foreground > min_foreground`,
    cut to `n`; if fewer qualify, all of them, then a seeded permutation of the others."""
    foreground = np.asarray(foreground)
    n = min(n, len(foreground))
    first = rng.permutation(np.flatnonzero(foreground > min_foreground))[:n]
    if len(first) == n:
        return first
    rest = np.setdiff1d(np.arange(len(foreground)), first)
    return np.concatenate([first, rng.permutation(rest)[:n - len(first)]])


@register_query("random_fg")
class ForegroundRandomQuery(RandomQuery):
    """Random among the items with predicted foreground; plain random fills the rest of the query."""

    @dataclass(frozen=True)
    class Settings(RandomQuery.Settings):
        random_fg_min_foreground: float = 0.001  # random_fg: eligible when the predicted foreground share exceeds this

        def check(self):
            in_range("random_fg_min_foreground", self.random_fg_min_foreground, 0.0, 1.0)

    def pick(self, scores, n, rng: np.random.Generator, round_: int = 1) -> np.ndarray:
        return foreground_random_select(scores["foreground"], n, self.settings.random_fg_min_foreground, rng)
