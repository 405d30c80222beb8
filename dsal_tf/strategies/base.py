"""Shared core of query strategies and pseudo-label policies.

A query strategy overrides one method, `batch_scores(model, x)`, which runs on the graph and
returns per-item tensors: `uncertainty` [N] (higher = more uncertain = sent to the oracle) and
`prob` [N,*spatial,1], the main head's probabilities. The space runs the batched pass over the
pool (`space.score_pool`); `score_batch` adds the main head's confidence `mean|p - 0.5|`, the
binary prediction and the true Dice against the ground truth (for analysis only); the selection
rule ranks. Layout: channels last, NHWC in 2D; MC passes stack on a trailing axis, [N,H,W,C,T];
per-item values reduce over every axis but the first (`space.item_axes`), so 2D and 3D share them.

With `SELECTION = "diverse"` the pool is scored by `model.with_features(model)`, the same graph
with one more output, so a strategy's own forward pass also returns the bottleneck `features`
[N,C]; strategies pass them on with `keep_features`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from ..registry import registrar
from ..settings import Settings, in_range
from ..space import disk_array, item_axes  # noqa: F401 (disk_array re-exported)
from .ranking import histogram_select, k_center_greedy, power_select  # noqa: F401 (re-exported)
from .selection import SELECTIONS, Selection

QUERY_STRATEGIES: dict[str, type[QueryStrategy]] = {}
PSEUDO_POLICIES: dict[str, type[PseudoPolicy]] = {}


register_query = registrar(QUERY_STRATEGIES)
register_pseudo = registrar(PSEUDO_POLICIES)


def binary_dice(a, b):
    """Dice of two boolean batches, per item (image or volume): (2|a b| + 1) / (|a| + |b| + 1)."""
    a = tf.cast(a, tf.float32)
    b = tf.cast(b, tf.float32)
    axes = item_axes(a)
    inter = tf.reduce_sum(a * b, axis=axes)
    return (2.0 * inter + 1.0) / (tf.reduce_sum(a, axis=axes) + tf.reduce_sum(b, axis=axes) + 1.0)


def keep_features(out: dict, result: dict) -> dict:
    """`result` plus the model's `features` output when the model has one (diverse selection)."""
    if "features" in out:
        result["features"] = out["features"]
    return result


def mean_over_pixels(pixel_map):
    """The default reduction: one score per item from a pixel (voxel) map, over every axis but the first."""
    return tf.reduce_mean(pixel_map, axis=item_axes(pixel_map))


def foreground_fraction(pred):
    """The share of each item a binary prediction marks foreground: [N,H,W,1] or [N,D,H,W,1] -> [N].

    The `foreground` column of scores.csv. DSAL's score follows lesion size at low resolution
    (docs/methods.md#dsal-and-lesion-size), so the analysis and `SELECTION = "size_strata"` read it."""
    return mean_over_pixels(tf.cast(pred, tf.float32))


class QueryStrategy:
    """Ranks the unlabelled pool. Subclasses override `batch_scores` (and declare `Settings`).

    The space runs the pass (`space.score_pool`) and calls `score_batch` per batch; the chosen
    selection rule (`SELECTION`) turns `query_score` into picks."""

    name = "base"
    default_selection = "rank"  # used when SELECTION = "auto"
    default_pseudo = "confidence"  # the weak labeler used when PSEUDO_POLICY = "auto"
    draws_at_random = False  # True: `pick` draws by itself and a ranking SELECTION would be ignored
    Settings = Settings

    def __init__(self, settings: Settings | None = None, selection: Selection | None = None, seed: int = 0,
                 own_selection: Selection | None = None):
        self.settings = settings if settings is not None else self.Settings()
        self.selection = selection if selection is not None else SELECTIONS[self.default_selection]()
        self.seed = seed
        self.own_selection = own_selection  # the strategy's own rule with the run's settings (`base_selection`)

    @classmethod
    def from_config(cls, cfg) -> QueryStrategy:
        """The strategy with its settings and the selection rule `SELECTION` names ("auto": its own)."""
        rule = SELECTIONS[cls.default_selection if cfg.selection == "auto" else cfg.selection]
        return cls(cls.Settings.from_config(cfg), rule.from_config(cfg), cfg.seed,
                   own_selection=SELECTIONS[cls.default_selection].from_config(cfg))

    @property
    def base_selection(self) -> Selection:
        """The rule that ranks candidates: the chosen one, or the strategy's own under "diverse" (with the
        run's settings of that rule, e.g. SCORE_POWER_BETA_END, and its number of rounds)."""
        if not self.selection.needs_features or self.default_selection == self.selection.name:
            return self.selection
        if self.own_selection is not None:
            return self.own_selection
        return SELECTIONS[self.default_selection](nb_rounds=self.selection.nb_rounds)

    def batch_scores(self, model, x) -> dict:
        raise NotImplementedError

    def prepare(self, model, round_: int, run_dir, train_member) -> None:
        """Hook run before scoring round `round_`; strategies needing more than the main model
        (ensembles) build it here. `train_member(out_dir, start_checkpoint_or_None, seed)` trains
        one extra model on the previous round's training set. Default: nothing."""

    def models(self, model) -> tuple:
        """Every model the scores depend on (the scoring graph is traced once per set)."""
        return (model, *getattr(self, "members", ()))

    def score_batch(self, model, x, y):
        """`batch_scores` plus the main head's confidence `mean|p - 0.5|`, predicted foreground share,
        binary prediction `pred` and true Dice against `y` (for analysis only)."""
        out = dict(self.batch_scores(model, x))
        prob = out.pop("prob")
        pred = prob > 0.5
        out["confidence"] = mean_over_pixels(tf.abs(prob - 0.5))
        out["foreground"] = foreground_fraction(pred)  # predicted share of the image (volume)
        out["true_dice"] = binary_dice(y > 0.5, pred)
        out["pred"] = tf.cast(pred, tf.uint8)
        return out

    def query_score(self, scores: dict[str, np.ndarray]) -> np.ndarray:
        """What the oracle pick ranks by, higher first (default: the uncertainty)."""
        return scores["uncertainty"]

    def pick(self, scores: dict[str, np.ndarray], n: int, rng: np.random.Generator, round_: int = 1) -> np.ndarray:
        """The strategy's own pick of `n` positions, in priority order."""
        return self.base_selection.choose_from(self.query_score(scores), scores, n, rng, round_)

    def select(self, scores: dict[str, np.ndarray], n: int, rng: np.random.Generator, round_: int = 1) -> np.ndarray:
        """Positions (into the scored arrays) of the `n` images for the oracle, in round `round_`.

        "diverse": the strategy's own pick of DIVERSE_FACTOR * n candidates, thinned to `n` by
        k-center greedy on the bottleneck features of the scoring pass."""
        if not self.selection.needs_features:
            return self.pick(scores, n, rng, round_)
        if "features" not in scores:
            raise ValueError("SELECTION = 'diverse' needs the scores of a model with a `features` output")
        # the candidates are the round's own pick: a scheduled rule (power, score_power) needs the round
        cand = self.pick(scores, self.selection.candidates(n, len(scores["uncertainty"])), rng, round_)
        return self.selection.thin(cand, scores["features"], n)


class PseudoPolicy:
    """Chooses which unlabelled images get the model's own labels. Override `select`."""

    name = "base"

    @dataclass(frozen=True)
    class Settings(Settings):
        pseudo_min_foreground: float = 0.0  # skip candidates predicting less foreground than this (0 = reference)
        use_crf: bool = False  # refine pseudo masks with a dense CRF (pydensecrf2)
        use_crf_thres: float = 0.98  # CRF: keep the refined mask only where it agrees this much

        def check(self):
            in_range("pseudo_min_foreground", self.pseudo_min_foreground, 0.0, 1.0)
            in_range("use_crf_thres", self.use_crf_thres, 0.0, 1.0, high_open=False)

    def __init__(self, settings: Settings | None = None):
        self.settings = settings if settings is not None else self.Settings()

    @classmethod
    def from_config(cls, cfg) -> PseudoPolicy:
        return cls(cls.Settings.from_config(cfg))

    def candidates(self, scores: dict[str, np.ndarray], available: np.ndarray) -> np.ndarray:
        """The candidates among `available` whose predicted mask covers at least
        `PSEUDO_MIN_FOREGROUND` of the image (0 keeps all, the reference rule).

        Soft Dice with smoothing gives Dice(empty, empty) = 1, so an image where every head predicts
        nothing looks the most certain of all; on data where every image holds a structure its empty
        pseudo mask is always wrong."""
        if self.settings.pseudo_min_foreground <= 0:
            return available
        return available[scores["foreground"][available] >= self.settings.pseudo_min_foreground]

    def select(self, scores: dict[str, np.ndarray], available: np.ndarray, n: int,
               rng: np.random.Generator) -> np.ndarray:
        raise NotImplementedError

    def labels(self, scores: dict[str, np.ndarray], chosen: np.ndarray, images: np.ndarray) -> np.ndarray:
        """The pseudo masks: the thresholded main head, CRF-refined where `USE_CRF` is on.

        `images` are the scored images (uint8), indexed like `scores`."""
        masks = scores["pred"][chosen]
        if self.settings.use_crf and len(chosen):
            from ..crf import refine_pseudo_labels

            masks, _ = refine_pseudo_labels(images[chosen], masks, self.settings.use_crf_thres)
        return masks
