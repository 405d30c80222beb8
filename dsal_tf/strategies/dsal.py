"""DSAL: disagreement between the deep-supervision side heads and the main head (docs/methods.md#dsal)."""

from __future__ import annotations

from dataclasses import dataclass

from ..settings import Settings
from .base import QueryStrategy, binary_dice, keep_features, register_query


def agreement(main, side_1, side_2):
    """a(x) = (Dice(B0, B1) + Dice(B0, B2)) / 2 on probabilities [N,H,W,1]; one value per image."""
    b0, b1, b2 = main > 0.5, side_1 > 0.5, side_2 > 0.5
    return 0.5 * (binary_dice(b0, b1) + binary_dice(b0, b2))


@register_query("dsal")
class DSALQuery(QueryStrategy):
    """One forward pass: low agreement goes to the oracle, high agreement to the weak labeler.

    `DS_ASCEND` keeps the reference's meaning: True (default) queries in ascending agreement
    (least agreeing first, plain DSAL); False queries the most agreeing first (the ablation).
    It changes only this strategy's oracle pick, never the scores or the weak labeler."""

    @dataclass(frozen=True)
    class Settings(Settings):
        ds_ascend: bool = True  # True = least agreeing first (DSAL); False = most agreeing first (ablation)

    def batch_scores(self, model, x):
        out = model(x, training=False)
        a = agreement(out["main"], out["side_1"], out["side_2"])
        return keep_features(out, {"uncertainty": 1.0 - a, "agreement": a, "prob": out["main"]})

    def query_score(self, scores):
        return scores["uncertainty"] if self.settings.ds_ascend else -scores["uncertainty"]
