"""Random query: the baseline every strategy must beat.

Random changes only the oracle pick, as in the reference code: the pool is scored like DSAL
(one pass, side-head agreement), so the weak labeler still ranks its pseudo labels by agreement
and DSAL vs. random measures the query alone.
"""

from __future__ import annotations

import numpy as np

from .base import register_query
from .dsal import DSALQuery


@register_query("random")
class RandomQuery(DSALQuery):
    draws_at_random = True  # SELECTION "auto" or "diverse" (random candidates thinned by k-center) only

    def pick(self, scores, n, rng: np.random.Generator, round_: int = 1) -> np.ndarray:
        return rng.permutation(len(scores["uncertainty"]))[:n]
