"""BoostMIS (docs/methods.md#boostmis): the adaptive threshold rule, the VAT score, density-aware
entropy and the class-balanced union query; the `boostmis` query strategy for segmentation.

The pieces are plain functions shared with `trainers/boostmis.py` (the adaptive pseudo labels)
and `classify.py` (the same loop on feature vectors):

- learning status: `count(c)` = samples (pixels) predicted as c with confidence >= BOOSTMIS_TAU
  (fixed, as FlexMatch counts), averaged over steps (momentum 0.9; counting with the moving eps
  itself made eps flip between ~0.1 and ~0.9 from step to step);
- `eps_t = a min(1, Count_t / Count_{t-1}) + b N_A / (2K)`, a = 0.9, b = 0.05, Count = sum_c count(c),
  N_A = samples the last active round added (not all labels so far), K = queries per round;
  clipped to [0, 0.99]; or, with `cutoff="constant"` (BOOSTMIS_CUTOFF), the constant `a + b` = 0.95
  the authors' code runs (its count ratio is always 1 and its N_A = 2K);
- the cutoff, a rule from `THRESHOLDS` (BOOSTMIS_THRESHOLD): `global`, every class at eps_t (the
  authors' code, the default), or `per_class` (FlexMatch-style), `tau(c) = eps_t sigma / (2 - sigma)`,
  `sigma(c) = count(c) / max_c count`, floored at eps_t / 2 and never below 1/C + 0.05;
- VAT: `d ~ U(-.5, .5)` normalised per sample, one power iteration
  `d <- normalise(grad_d KL(p(x) || p(x + xi d)))`, score `KL(p(x) || p(x + eps d))`;
- density-aware entropy `H(p(x)) density(x)`, density = mean cosine similarity to the k nearest
  other samples in the model's feature space (the global-average-pooled bottleneck);
- the query: top-K by VAT and the class-balanced top-K by density-aware entropy (classes taken
  in turn, each its best remaining sample), merged by alternating the two rankings, among the
  samples the pseudo labeller does not take (those first ranked after all others);
- distribution alignment (ReMixMatch, the authors' option, off by default): `p <- normalise(p
  p_target / p_model)`, p_model the running mean of the unlabelled predictions.

Segmentation: pixels are the samples; a pixel's class is its binary prediction; VAT KL and the
entropy are means over the image, and the class-balanced score of an image for class c is its
density times the mean entropy of its pixels predicted c. An image counts as taken by the pseudo
labeller when the share of its pixels with confidence max(p, 1-p) >= BOOSTMIS_TAU is itself
>= BOOSTMIS_TAU.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from ..errors import DsalError
from ..registry import registrar
from ..settings import Settings, in_range, positive
from ..space import item_axes
from .base import QueryStrategy, register_query

A, B = 0.9, 0.05
MAX_THRESHOLD = 0.99
FLOOR_MARGIN = 0.05  # per_class: tau(c) >= 1/C + FLOOR_MARGIN
EPS = 1e-7


# ------------------------------------------------------------------ adaptive threshold
def status_counts(confidence, pred_class, threshold, n_classes: int):
    """`count(c)` [C]: samples predicted c with confidence >= `threshold` (any shape, flattened)."""
    conf = tf.reshape(tf.cast(confidence, tf.float32), [-1])
    cls = tf.reshape(tf.cast(pred_class, tf.int32), [-1])
    sure = tf.cast(conf >= tf.cast(threshold, tf.float32), tf.float32)
    return tf.math.unsorted_segment_sum(sure, cls, n_classes)


def global_threshold(count_now, count_prev, n_active, k: int, a: float = A, b: float = B):
    """`eps_t = a min(1, Count_t / Count_{t-1}) + b N_A / (2K)` in [0, 0.99]; ratio 1 when Count_{t-1} = 0."""
    now = tf.cast(count_now, tf.float32)
    prev = tf.cast(count_prev, tf.float32)
    ratio = tf.where(prev > 0, tf.minimum(1.0, now / tf.maximum(prev, 1.0)), 1.0)
    eps = a * ratio + b * tf.cast(n_active, tf.float32) / (2.0 * max(int(k), 1))
    return tf.clip_by_value(eps, 0.0, MAX_THRESHOLD)


def constant_threshold(a: float = A, b: float = B) -> float:
    """The authors' code's cutoff: `global_threshold` at ratio 1 and N_A = 2K, `a + b` (0.95)."""
    return a + b


CUTOFFS = ("adaptive", "constant")  # BOOSTMIS_CUTOFF: the paper's eps_t, or the authors' code's constant


THRESHOLDS: dict = {}
register_threshold = registrar(THRESHOLDS)  # @register_threshold("name"): BOOSTMIS_THRESHOLD = name


@register_threshold("global")
def global_cutoff(counts, eps):
    """Every class at `eps` [C]: the authors' code."""
    return tf.fill(tf.shape(counts), tf.cast(eps, tf.float32))


@register_threshold("per_class")
def class_thresholds(counts, eps):
    """`tau(c) = eps sigma / (2 - sigma)`, `sigma(c) = count(c) / max_c count` (1 when nothing counts) [C],
    floored at `max(eps / 2, 1/C + 0.05)`: unfloored, a class with no confident samples gets 0 and every
    guess of it passes."""
    counts = tf.cast(counts, tf.float32)
    eps = tf.cast(eps, tf.float32)
    top = tf.reduce_max(counts)
    sigma = tf.where(top > 0, counts / tf.maximum(top, 1e-12), 1.0)
    floor = tf.maximum(eps / 2.0, 1.0 / tf.cast(tf.size(counts), tf.float32) + FLOOR_MARGIN)
    return tf.maximum(eps * sigma / (2.0 - sigma), floor)


def confident(confidence, pred_class, tau):
    """1.0 where a sample's confidence reaches the cutoff `tau[C]` of its predicted class (shape kept)."""
    return tf.cast(tf.cast(confidence, tf.float32) >= tf.gather(tau, tf.cast(pred_class, tf.int32)), tf.float32)


class LearningStatus:
    """Per-class counts of confident samples (confidence >= `base_tau`, fixed), averaged over steps
    (`momentum`), and the global threshold: the state a trainer keeps between its steps. `n_active` is
    N_A, the samples the last active round added; `rule` a `THRESHOLDS` name; `cutoff` one of `CUTOFFS`
    (`constant`: eps = `constant_threshold()` whatever the counts; the counts still feed `per_class`).
    Usable as a pseudo-label rule itself (`cutoffs`)."""

    def __init__(self, n_classes: int, base_tau: float, n_active: int, queries: int, momentum: float = 0.9,
                 rule: str = "global", cutoff: str = "adaptive"):
        if rule not in THRESHOLDS:
            raise DsalError(f"BOOSTMIS_THRESHOLD = {rule!r} is not one of {sorted(THRESHOLDS)}")
        if cutoff not in CUTOFFS:
            raise DsalError(f"BOOSTMIS_CUTOFF = {cutoff!r} is not one of {list(CUTOFFS)}")
        self.constant = cutoff == "constant"
        self.n_classes, self.base_tau, self.momentum = n_classes, float(base_tau), float(momentum)
        self.n_active, self.queries, self.rule = n_active, queries, THRESHOLDS[rule]
        self.counts = tf.Variable(tf.zeros([n_classes]), trainable=False, name="status_counts")
        self.steps = tf.Variable(0.0, trainable=False, name="status_steps")
        self.threshold = tf.Variable(0.0, trainable=False, name="global_threshold")

    def thresholds(self, confidence, pred_class, update: bool = True):
        """The cutoff per class [C] after counting this batch (with `update`, the state moves on)."""
        now = status_counts(confidence, pred_class, self.base_tau, self.n_classes)
        first = self.steps == 0
        counts = tf.where(first, now, self.momentum * self.counts + (1.0 - self.momentum) * now)
        total = tf.reduce_sum(counts)
        prev = tf.where(first, total, tf.reduce_sum(self.counts))
        eps = constant_threshold() if self.constant else global_threshold(total, prev, self.n_active, self.queries)
        if update:
            self.counts.assign(counts)
            self.steps.assign_add(1.0)
            self.threshold.assign(eps)
        return self.rule(counts, eps)

    def cutoffs(self, confidence, pred_class, update: bool = True):
        """`thresholds` under the name a `Booster` calls its rule by."""
        return self.thresholds(confidence, pred_class, update)


def align_distribution(p, p_model, p_target):
    """Distribution alignment (ReMixMatch): rows of `p` [N,C] times `p_target / p_model` [C], renormalised."""
    q = tf.cast(p, tf.float32) * tf.cast(p_target, tf.float32) / tf.maximum(tf.cast(p_model, tf.float32), EPS)
    return q / tf.maximum(tf.reduce_sum(q, axis=-1, keepdims=True), EPS)


# ------------------------------------------------------------------ VAT
def bernoulli_kl(p, q):
    """KL(Bern(p) || Bern(q)) per pixel."""
    p = tf.clip_by_value(p, EPS, 1.0 - EPS)
    q = tf.clip_by_value(q, EPS, 1.0 - EPS)
    return p * tf.math.log(p / q) + (1.0 - p) * tf.math.log((1.0 - p) / (1.0 - q))


def pixel_mean_kl(p, q):
    """Mean Bernoulli KL over an image's pixels: [N,H,W,1] -> [N]."""
    return tf.reduce_mean(bernoulli_kl(p, q), axis=tf.range(1, tf.rank(p)))


def categorical_kl(p, q):
    """KL(p || q) of class distributions [N,C] -> [N]."""
    p = tf.clip_by_value(p, EPS, 1.0)
    q = tf.clip_by_value(q, EPS, 1.0)
    return tf.reduce_sum(p * tf.math.log(p / q), axis=-1)


def unit_per_sample(d):
    """`d` divided by its L2 norm over all but the first axis."""
    axes = tf.range(1, tf.rank(d))
    return d / (tf.sqrt(tf.reduce_sum(tf.square(d), axis=axes, keepdims=True)) + 1e-12)


def vat_direction(prob_fn, x, p, xi: float, d0, kl=pixel_mean_kl):
    """One power iteration from `d0`: `normalise(grad_d KL(p || prob_fn(x + xi d)))` at d = normalise(d0)."""
    d = unit_per_sample(tf.cast(d0, tf.float32))
    with tf.GradientTape() as tape:
        tape.watch(d)
        div = tf.reduce_sum(kl(tf.stop_gradient(p), prob_fn(x + xi * d)))
    return unit_per_sample(tape.gradient(div, d))


def vat_score(prob_fn, x, xi: float = 10.0, eps: float = 1.0, seed=None, kl=pixel_mean_kl, p=None):
    """`KL(p(x) || p(x + eps d))` per sample, d from one power iteration started at `U(-.5, .5)`."""
    x = tf.cast(x, tf.float32)
    if p is None:
        p = prob_fn(x)
    d0 = tf.random.stateless_uniform(tf.shape(x), seed=seed if seed is not None else (0, 0), minval=-0.5,
                                     maxval=0.5)
    d = vat_direction(prob_fn, x, p, xi, d0, kl)
    return kl(p, prob_fn(x + eps * d))


# ------------------------------------------------------------------ density and the query
def knn_density(features: np.ndarray, k: int, chunk: int = 1024) -> np.ndarray:
    """Mean cosine similarity of each row to its `k` most similar other rows [N] (chunked, N x chunk)."""
    f = np.asarray(features, np.float64).reshape(len(features), -1)
    n = len(f)
    if n < 2:
        return np.ones(n)
    k = min(int(k), n - 1)
    f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    out = np.empty(n)
    for s in range(0, n, chunk):
        sim = f[s:s + chunk] @ f.T
        sim[np.arange(len(sim)), np.arange(s, s + len(sim))] = -np.inf  # never oneself
        top = np.partition(sim, n - k, axis=1)[:, n - k:]
        out[s:s + chunk] = top.mean(axis=1)
    return out


def balanced_rank(class_scores: np.ndarray) -> np.ndarray:
    """Class-balanced ranking of samples from `class_scores` [N,C] (nan = not of that class): the
    classes take turns, each its best remaining sample (ties: lower index); classes that run out drop."""
    s = np.asarray(class_scores, np.float64)
    orders = [[i for i in np.argsort(-np.nan_to_num(s[:, c], nan=-np.inf), kind="stable") if not np.isnan(s[i, c])]
              for c in range(s.shape[1])]
    chosen, seen = [], set()
    pos = [0] * len(orders)
    while any(pos[c] < len(orders[c]) for c in range(len(orders))):
        for c, order in enumerate(orders):
            while pos[c] < len(order) and order[pos[c]] in seen:
                pos[c] += 1
            if pos[c] < len(order):
                seen.add(order[pos[c]])
                chosen.append(order[pos[c]])
                pos[c] += 1
    return np.array(chosen, np.int64)


def alternate_union(first: np.ndarray, second: np.ndarray, n: int) -> np.ndarray:
    """The union of two rankings, taking from each in turn (duplicates once), first `n`."""
    out, seen = [], set()
    for pair in zip(first, second):
        for i in pair:
            if int(i) not in seen:
                seen.add(int(i))
                out.append(int(i))
    for rest in (first[len(second):], second[len(first):]):
        for i in rest:
            if int(i) not in seen:
                seen.add(int(i))
                out.append(int(i))
    return np.array(out[:n], np.int64)


def boostmis_select(vat: np.ndarray, dae_by_class: np.ndarray, taken: np.ndarray, n: int) -> np.ndarray:
    """The oracle pick: top VAT and class-balanced top density-aware entropy, alternating, among
    samples not `taken` by the pseudo labeller; taken samples only fill a shortfall (same rule)."""
    taken = np.asarray(taken, bool)
    picks: list[int] = []
    for group in (np.flatnonzero(~taken), np.flatnonzero(taken)):
        if len(picks) >= n or not len(group):
            continue
        by_vat = group[np.argsort(-np.asarray(vat)[group], kind="stable")]
        by_dae = group[balanced_rank(np.asarray(dae_by_class)[group])]
        picks.extend(alternate_union(by_vat, by_dae, n - len(picks)).tolist())
    return np.array(picks[:n], np.int64)


def segmentation_class_entropy(prob):
    """Per image, the mean binary entropy of its pixels predicted background / foreground, [N,2]
    (nan where the image has no pixel of that class)."""
    p = tf.clip_by_value(prob, EPS, 1.0 - EPS)
    h = -(p * tf.math.log(p) + (1.0 - p) * tf.math.log(1.0 - p))
    fg = tf.cast(prob > 0.5, tf.float32)
    cols = []
    for m in (1.0 - fg, fg):
        n = tf.reduce_sum(m, axis=item_axes(m))
        cols.append(tf.where(n > 0, tf.reduce_sum(h * m, axis=item_axes(m)) / tf.maximum(n, 1.0), np.nan))
    return tf.stack(cols, axis=1)


@register_query("boostmis")
class BoostMISQuery(QueryStrategy):
    """VAT (one power iteration on the main head) and density-aware entropy; scores per image.

    Scores a `with_features` graph (SELECTION "auto" means "diverse" here, for the features), but
    selects by its own rule; `uncertainty` (what the round's scores file shows) is the VAT score."""

    default_selection = "diverse"

    @dataclass(frozen=True)
    class Settings(Settings):
        boostmis_xi: float = 10.0  # VAT power-iteration step xi
        boostmis_eps: float = 1.0  # VAT perturbation size eps (normalised units)
        boostmis_knn: int = 10  # density: mean cosine similarity to the k nearest neighbours
        boostmis_tau: float = 0.95  # confident pixel: max(p, 1-p) >= tau; taken image: that share >= tau

        def check(self):
            positive("boostmis_xi", self.boostmis_xi)
            positive("boostmis_eps", self.boostmis_eps)
            positive("boostmis_knn", self.boostmis_knn)
            in_range("boostmis_tau", self.boostmis_tau, 0.5, 1.0)

    def batch_scores(self, model, x):
        out = model(x, training=False)
        prob = out["main"]
        if "features" not in out:
            raise DsalError("QUERY_STRATEGY = 'boostmis' needs the bottleneck features: set SELECTION = 'auto'")
        seed = tf.stack([tf.constant(self.seed, tf.int32), tf.shape(x)[0]])
        vat = vat_score(lambda z: model(z, training=False)["main"], x, self.settings.boostmis_xi,
                        self.settings.boostmis_eps, seed=seed, p=prob)
        conf = tf.maximum(prob, 1.0 - prob)
        share = tf.reduce_mean(tf.cast(conf >= self.settings.boostmis_tau, tf.float32), axis=item_axes(conf))
        ent = segmentation_class_entropy(prob)
        return {"uncertainty": vat, "entropy_bg": ent[:, 0], "entropy_fg": ent[:, 1], "sure_share": share,
                "features": out["features"], "prob": prob}

    def select(self, scores, n, rng, round_=1):
        if "features" not in scores:
            raise DsalError("QUERY_STRATEGY = 'boostmis' needs SELECTION = 'auto' (the bottleneck features)")
        density = knn_density(scores["features"], self.settings.boostmis_knn)
        dae = np.stack([scores["entropy_bg"], scores["entropy_fg"]], axis=1) * density[:, None]
        taken = scores["sure_share"] >= self.settings.boostmis_tau
        return boostmis_select(scores["uncertainty"], dae, taken, n)
