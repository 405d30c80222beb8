"""Pure ranking rules over per-image scores (numpy only): top-n, CEAL's histogram, scheduled power
sampling (on the rank, and ClaSP PE's on the score itself), top-n within foreground-size strata and
k-center greedy. `selection.py` wraps them as named, configurable rules."""

from __future__ import annotations

import numpy as np


def k_center_greedy(features: np.ndarray, n: int, centers=(), rng: np.random.Generator | None = None) -> np.ndarray:
    """`n` new indices by k-center greedy (Sener & Savarese 2018): each pick is the point farthest
    (Euclidean) from every center so far; ties go to the lower index, so with candidates given in
    priority order the more uncertain one wins. Without `centers` the first pick is index 0 (the most
    uncertain candidate), or drawn with `rng`. Exact duplicates are at distance 0: they come last."""
    f = np.asarray(features, np.float64).reshape(len(features), -1)
    n = min(n, len(f) - len(centers))
    if n <= 0:
        return np.zeros(0, np.int64)
    chosen: list[int] = []
    if len(centers) == 0:
        chosen.append(int(rng.integers(len(f))) if rng is not None else 0)
        centers = chosen
    nearest = np.full(len(f), np.inf)
    for c in centers:
        nearest = np.minimum(nearest, np.linalg.norm(f - f[c], axis=1))
    nearest[list(centers)] = -1.0
    while len(chosen) < n:
        pick = int(np.argmax(nearest))
        chosen.append(pick)
        nearest = np.minimum(nearest, np.linalg.norm(f - f[pick], axis=1))
        nearest[pick] = -1.0
    return np.array(chosen, np.int64)


def schedule_fraction(round_: int, nb_rounds: int) -> float:
    """How far round `round_` (1-based) is through `nb_rounds`: t / (T - 1) with t = round_ - 1, clipped
    to [0, 1]; 0 when there is a single round."""
    if nb_rounds <= 1:
        return 0.0
    return min(max(round_ - 1, 0), nb_rounds - 1) / (nb_rounds - 1)


def power_beta(start: float, end: float, round_: int, nb_rounds: int) -> float:
    """The exponent of round `round_` (1-based): `start` at round 1, `end` at the last round
    (`nb_rounds`), linear between."""
    return start + schedule_fraction(round_, nb_rounds) * (end - start)


def power_select(scores: np.ndarray, n: int, beta: float, rng: np.random.Generator) -> np.ndarray:
    """`n` positions drawn without replacement with probability proportional to s**beta, where
    s = rank / N is the score's rank made positive (the highest score has s = 1, the lowest 1/N), so
    only the order of the scores matters. beta = 0 is a uniform draw, a large beta the top n.

    Sequential draws without replacement are sampled exactly by the Gumbel top-k trick:
    the n largest `beta * log(s) + Gumbel` keys, returned in draw order (largest key first)."""
    scores = np.asarray(scores, np.float64)
    n = min(n, len(scores))
    ranks = np.empty(len(scores), np.float64)
    ranks[np.argsort(scores, kind="stable")] = np.arange(1, len(scores) + 1)
    keys = beta * np.log(ranks / len(scores)) + rng.gumbel(size=len(scores))
    return np.argsort(-keys, kind="stable")[:n]


def geometric_beta(start: float, end: float, round_: int, nb_rounds: int) -> float:
    """ClaSP PE's exponent of round `round_` (1-based): `start` at round 1, `end` at the last round
    (`nb_rounds`), geometric between: with t = round_ - 1 and T = nb_rounds, start * (end/start)**(t/(T-1)).
    A single round (T = 1) uses `start`, as `power_beta` does."""
    return start * (end / start) ** schedule_fraction(round_, nb_rounds)


def score_power_select(scores: np.ndarray, n: int, beta: float, rng: np.random.Generator) -> np.ndarray:
    """`n` positions drawn without replacement with probability proportional to score**beta (power
    acquisition, Kirsch et al. 2023; ClaSP PE's power noising): the top n of log(score) + Gumbel(0, 1/beta),
    computed as the same order of beta * log(score) + Gumbel(0, 1), returned in draw order.

    Scores must be >= 0; a zero counts as the smallest positive float (drawn last, but drawn). beta = 0
    gives exactly `argsort(-rng.gumbel(size=N))[:n]`, a uniform draw; a large beta gives the top n."""
    scores = np.asarray(scores, np.float64)
    if np.any(scores < 0):
        raise ValueError(f"a draw with p ~ score**beta needs scores >= 0, got a minimum of {scores.min():g}")
    n = min(n, len(scores))
    log_s = np.log(np.maximum(scores, np.finfo(np.float64).tiny))
    keys = beta * log_s + rng.gumbel(size=len(scores))
    return np.argsort(-keys, kind="stable")[:n]


def histogram_select(scores: np.ndarray, n: int, rng: np.random.Generator, bins: int = 80) -> np.ndarray:
    """CEAL's histogram selection (docs/methods.md#ceal), scaled from its 10/15/10 split of 35.

    From an 80-bin histogram of `scores` (higher = more uncertain): the lowest scores ("no
    detections"), a random draw from bins [mode+6, 47), then the top 5 bins, least-populated bins
    first. Any shortfall is filled with the highest remaining scores.
    """
    scores = np.asarray(scores, np.float64)
    n = min(n, len(scores))
    n_low = round(n * 10 / 35)
    n_rand = round(n * 15 / 35)  # the rest (10 of 35) comes from the top bins
    counts, edges = np.histogram(scores, bins=bins)
    which = np.clip(np.digitize(scores, edges[1:-1]), 0, bins - 1)
    chosen: list[int] = []

    def take(candidates, k):
        fresh = [int(c) for c in candidates if int(c) not in chosen]
        chosen.extend(fresh[:k])

    take(np.argsort(scores, kind="stable"), n_low)
    mode = int(np.argmax(counts))
    band = np.flatnonzero((which >= mode + 6) & (which < 47))
    take(rng.permutation(band), n_rand)
    top_bins = [b for b in range(bins - 5, bins) if counts[b] > 0]
    for b in sorted(top_bins, key=lambda b: (counts[b], -b)):
        room = n - len(chosen)
        if room <= 0:
            break
        in_bin = np.flatnonzero(which == b)
        take(in_bin[np.argsort(-scores[in_bin], kind="stable")], room)
    take(np.argsort(-scores, kind="stable"), n - len(chosen))
    return np.array(chosen[:n], np.int64)


def size_strata(fg: np.ndarray, bins: int) -> np.ndarray:
    """The stratum (0 = smallest predicted foreground) of each item: quantile bins of its foreground
    fraction `fg`. The `bins - 1` edges are numpy's default (linear) quantiles at 1/bins, ..., (bins-1)/bins;
    an item lies in stratum i when edge[i-1] < fg <= edge[i], so an fg equal to an edge goes to the lower
    stratum and equal fractions always share one. Tied edges leave strata empty."""
    fg = np.asarray(fg, np.float64)
    if len(fg) == 0:
        return np.zeros(0, np.int64)
    edges = np.quantile(fg, np.arange(1, bins) / bins)
    return np.searchsorted(edges, fg, side="left").astype(np.int64)


def proportional_quota(sizes: np.ndarray, n: int) -> np.ndarray:
    """`n` split over strata in proportion to their `sizes`, summing to exactly `n` (n <= sum of sizes) by
    largest remainders: each stratum gets floor(n * size / N), then the strata with the largest remainders
    (n * size mod N; ties to the lower stratum) get one more each. No stratum gets more than its size."""
    sizes = np.asarray(sizes, np.int64)
    total = int(sizes.sum())
    if total == 0:
        return np.zeros(len(sizes), np.int64)
    quota, remainder = np.divmod(n * sizes, total)
    quota[np.argsort(-remainder, kind="stable")[:n - int(quota.sum())]] += 1
    return quota


def size_strata_select(scores: np.ndarray, fg: np.ndarray, n: int, bins: int) -> np.ndarray:
    """`n` positions: the highest `scores` within each foreground-size stratum (`size_strata`), each
    stratum taking `proportional_quota` of the picks, so the query cannot fill up from one lesion size.
    Ties in score go to the lower index; returned in priority order (highest score first), no duplicates."""
    scores = np.asarray(scores, np.float64)
    n = min(n, len(scores))
    if n <= 0:
        return np.zeros(0, np.int64)
    stratum = size_strata(fg, bins)
    sizes = np.bincount(stratum, minlength=bins)
    quota = proportional_quota(sizes, n)
    order = np.argsort(-scores, kind="stable")
    s = stratum[order]
    by_stratum = np.argsort(s, kind="stable")  # priority order kept inside each stratum
    within = np.empty(len(s), np.int64)
    within[by_stratum] = np.arange(len(s)) - np.concatenate([[0], np.cumsum(sizes)[:-1]])[s[by_stratum]]
    return order[within < quota[s]]
