"""Shared core of query strategies and pseudo-label policies.

A query strategy overrides one method, `batch_scores(model, x)`, which runs on the graph and
returns per-image tensors: `uncertainty` [N] (higher = more uncertain = sent to the oracle) and
`prob` [N,H,W,1], the main head's probabilities. The base class runs the batched pass over the
pool, adds the main head's confidence `mean|p - 0.5|`, the binary prediction and the true Dice
against the ground truth (for analysis only), and ranks. Layout: NHWC; MC passes stack on a
trailing axis, [N,H,W,C,T].
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from ..config import Config

QUERY_STRATEGIES: dict[str, type[QueryStrategy]] = {}
PSEUDO_POLICIES: dict[str, type[PseudoPolicy]] = {}


def _registrar(registry: dict):
    def register(name: str):
        def deco(cls):
            cls.name = name
            registry[name] = cls
            return cls

        return deco

    return register


register_query = _registrar(QUERY_STRATEGIES)
register_pseudo = _registrar(PSEUDO_POLICIES)


def binary_dice(a, b):
    """Dice of two boolean NHWC batches, per image: (2|a b| + 1) / (|a| + |b| + 1)."""
    a = tf.cast(a, tf.float32)
    b = tf.cast(b, tf.float32)
    inter = tf.reduce_sum(a * b, axis=[1, 2, 3])
    return (2.0 * inter + 1.0) / (tf.reduce_sum(a, axis=[1, 2, 3]) + tf.reduce_sum(b, axis=[1, 2, 3]) + 1.0)


def mean_over_pixels(pixel_map):
    """The default reduction: one score per image from an [N,H,W,C] map."""
    return tf.reduce_mean(pixel_map, axis=[1, 2, 3])


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

    def __init__(self, cfg: Config):
        self.cfg = cfg

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
        key = (id(model), *map(id, getattr(self, "members", ())))
        if getattr(self, "_traced_for", None) != key:  # one graph per model, reused each round
            self._traced = tf.function(lambda x, y: self._step(model, x, y), reduce_retracing=True)
            self._traced_for = key
        step = self._traced
        parts: dict[str, list] = {}
        ds = make_dataset(images, masks, normalizer, batch_size)
        total = -(-len(images) // batch_size)
        for x, y in tqdm(ds, total=total, desc=f"scoring ({self.name})", disable=not progress, leave=False):
            for k, v in step(x, y).items():
                parts.setdefault(k, []).append(v.numpy())
        return {k: np.concatenate(v) for k, v in parts.items()}

    def select(self, scores: dict[str, np.ndarray], n: int, rng: np.random.Generator) -> np.ndarray:
        """Positions (into the scored arrays) of the `n` images for the oracle."""
        u = scores["uncertainty"]
        if self.cfg.ds_ascend:
            u = -u
        selection = self.default_selection if self.cfg.selection == "auto" else self.cfg.selection
        if selection == "histogram":
            return histogram_select(u, n, rng)
        return np.argsort(-u, kind="stable")[:n]


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
