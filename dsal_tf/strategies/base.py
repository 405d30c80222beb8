"""Shared core of query strategies and pseudo-label policies.

A query strategy overrides one method, `batch_scores(model, x)`, which runs on the graph and
returns per-image tensors: `uncertainty` [N] (higher = more uncertain = sent to the oracle) and
`prob` [N,H,W,1], the main head's probabilities. The base class runs the batched pass over the
pool, adds the main head's confidence `mean|p - 0.5|`, the binary prediction and the true Dice
against the ground truth (for analysis only), and ranks. Layout: NHWC; MC passes stack on a
trailing axis, [N,H,W,C,T].

With `SELECTION = "diverse"` the pool is scored by `model.with_features(model)`, the same graph
with one more output, so a strategy's own forward pass also returns the bottleneck `features`
[N,C]; strategies pass them on with `keep_features`.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from ..config import Config
from ..registry import registrar

QUERY_STRATEGIES: dict[str, type[QueryStrategy]] = {}
PSEUDO_POLICIES: dict[str, type[PseudoPolicy]] = {}


register_query = registrar(QUERY_STRATEGIES)
register_pseudo = registrar(PSEUDO_POLICIES)


def binary_dice(a, b):
    """Dice of two boolean NHWC batches, per image: (2|a b| + 1) / (|a| + |b| + 1)."""
    a = tf.cast(a, tf.float32)
    b = tf.cast(b, tf.float32)
    inter = tf.reduce_sum(a * b, axis=[1, 2, 3])
    return (2.0 * inter + 1.0) / (tf.reduce_sum(a, axis=[1, 2, 3]) + tf.reduce_sum(b, axis=[1, 2, 3]) + 1.0)


def keep_features(out: dict, result: dict) -> dict:
    """`result` plus the model's `features` output when the model has one (diverse selection)."""
    if "features" in out:
        result["features"] = out["features"]
    return result


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


def disk_array(shape: tuple[int, ...], dtype) -> np.ndarray:
    """A writable array backed by an anonymous temporary file (deleted when the array is)."""
    import tempfile

    with tempfile.TemporaryFile() as f:  # the mapping keeps the data after the file is closed
        return np.memmap(f, dtype=dtype, mode="w+", shape=shape)


def mean_over_pixels(pixel_map):
    """The default reduction: one score per image from an [N,H,W,C] map."""
    return tf.reduce_mean(pixel_map, axis=[1, 2, 3])


def power_beta(cfg: Config, round_: int) -> float:
    """The exponent of round `round_` (1-based): POWER_BETA_START at round 1, POWER_BETA_END at the
    last round (NB_ITERATIONS), linear between."""
    if cfg.nb_iterations <= 1:
        return cfg.power_beta_start
    t = min(max(round_ - 1, 0), cfg.nb_iterations - 1) / (cfg.nb_iterations - 1)
    return cfg.power_beta_start + t * (cfg.power_beta_end - cfg.power_beta_start)


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


def histogram_select(scores: np.ndarray, n: int, rng: np.random.Generator, bins: int = 80) -> np.ndarray:
    """CEAL's histogram selection (METHODS.md section 2), scaled from its 10/15/10 split of 35.

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


class QueryStrategy:
    """Ranks the unlabelled pool. Subclasses override `batch_scores`."""

    name = "base"
    default_selection = "rank"  # used when SELECTION = "auto"
    default_pseudo = "confidence"  # the weak labeler used when PSEUDO_POLICY = "auto"

    def __init__(self, cfg: Config):
        self.cfg = cfg

    @property
    def selection(self) -> str:
        return self.default_selection if self.cfg.selection == "auto" else self.cfg.selection

    def batch_scores(self, model, x) -> dict:
        raise NotImplementedError

    def prepare(self, model, round_: int, run_dir, train_member) -> None:
        """Hook run before scoring round `round_`; strategies needing more than the main model
        (ensembles) build it here. `train_member(out_dir, start_checkpoint_or_None, seed)` trains
        one extra model on the previous round's training set. Default: nothing."""

    def _step(self, model, x, y):
        out = dict(self.batch_scores(model, x))
        prob = out.pop("prob")
        pred = prob > 0.5
        out["confidence"] = mean_over_pixels(tf.abs(prob - 0.5))
        out["foreground"] = mean_over_pixels(tf.cast(pred, tf.float32))  # predicted share of the image
        out["true_dice"] = binary_dice(y > 0.5, pred)
        out["pred"] = tf.cast(pred, tf.uint8)
        return out

    def score_pool(self, model, images: np.ndarray, masks: np.ndarray, normalizer, batch_size: int,
                   progress: bool = False) -> dict[str, np.ndarray]:
        """One batched pass over `images`; returns per-image arrays (and `pred`, uint8 NHWC)."""
        from tqdm.auto import tqdm

        from ..data import make_dataset

        if len(images) == 0:
            return {}
        if getattr(self, "score_dtype", None) == "float32":  # scores that bf16 would move (CEAL)
            from ..train import float32_copy

            model = float32_copy(model)
        # one graph per set of models, reused each round; the key holds the models themselves
        # (compared by identity), so a freed model's id can never be mistaken for a new one
        key = (model, *getattr(self, "members", ()))
        cached = getattr(self, "_traced_for", ())
        if len(cached) != len(key) or any(a is not b for a, b in zip(cached, key)):
            scored = model
            if self.selection == "diverse":
                from ..model import with_features

                scored = with_features(model)
            self._traced = tf.function(lambda x, y: self._step(scored, x, y), reduce_retracing=True)
            self._traced_for = key
        step = self._traced
        parts: dict[str, list] = {}
        pred = None  # the binary masks of the whole pool go to disk: memory stays flat in pool size
        done = 0
        ds = make_dataset(images, masks, normalizer, batch_size)
        total = -(-len(images) // batch_size)
        for x, y in tqdm(ds, total=total, desc=f"scoring ({self.name})", disable=not progress, leave=False):
            out = {k: v.numpy() for k, v in step(x, y).items()}
            batch = out.pop("pred")
            if pred is None:
                pred = disk_array((len(images), *batch.shape[1:]), batch.dtype)
            pred[done:done + len(batch)] = batch
            done += len(batch)
            for k, v in out.items():
                parts.setdefault(k, []).append(v)
        return {**{k: np.concatenate(v) for k, v in parts.items()}, "pred": pred}

    def query_score(self, scores: dict[str, np.ndarray]) -> np.ndarray:
        """What the oracle pick ranks by, higher first (default: the uncertainty)."""
        return scores["uncertainty"]

    def pick(self, scores: dict[str, np.ndarray], n: int, rng: np.random.Generator, round_: int = 1) -> np.ndarray:
        """The strategy's own pick of `n` positions, in priority order."""
        u = self.query_score(scores)
        base = self.default_selection if self.selection in ("auto", "diverse") else self.selection
        if base == "histogram":
            return histogram_select(u, n, rng)
        if base == "power":
            return power_select(u, n, power_beta(self.cfg, round_), rng)
        return np.argsort(-u, kind="stable")[:n]

    def select(self, scores: dict[str, np.ndarray], n: int, rng: np.random.Generator, round_: int = 1) -> np.ndarray:
        """Positions (into the scored arrays) of the `n` images for the oracle, in round `round_`.

        "diverse": the strategy's own pick of DIVERSE_FACTOR * n candidates, thinned to `n` by
        k-center greedy on the bottleneck features of the scoring pass. "power": a seeded draw with
        probability ~ rank-score**beta, beta scheduled over the rounds (`power_select`)."""
        if self.selection != "diverse":
            return self.pick(scores, n, rng, round_)
        if "features" not in scores:
            raise ValueError("SELECTION = 'diverse' needs the scores of a model with a `features` output")
        cand = self.pick(scores, min(self.cfg.diverse_factor * n, len(scores["uncertainty"])), rng)
        return cand[k_center_greedy(scores["features"][cand], n)]


class PseudoPolicy:
    """Chooses which unlabelled images get the model's own labels. Override `select`."""

    name = "base"

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def select(self, scores: dict[str, np.ndarray], available: np.ndarray, n: int,
               rng: np.random.Generator) -> np.ndarray:
        raise NotImplementedError

    def labels(self, scores: dict[str, np.ndarray], chosen: np.ndarray, images: np.ndarray) -> np.ndarray:
        """The pseudo masks: the thresholded main head, CRF-refined where `USE_CRF` is on.

        `images` are the scored images (uint8), indexed like `scores`."""
        masks = scores["pred"][chosen]
        if self.cfg.use_crf and len(chosen):
            from ..crf import refine_pseudo_labels

            masks, _ = refine_pseudo_labels(images[chosen], masks, self.cfg.use_crf_thres)
        return masks
