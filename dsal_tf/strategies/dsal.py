"""DSAL: disagreement between the deep-supervision side heads and the main head (METHODS.md 1)."""

from __future__ import annotations

from .base import QueryStrategy, binary_dice, register_query


def agreement(main, side_1, side_2):
    """a(x) = (Dice(B0, B1) + Dice(B0, B2)) / 2 on probabilities [N,H,W,1]; one value per image."""
    b0, b1, b2 = main > 0.5, side_1 > 0.5, side_2 > 0.5
    return 0.5 * (binary_dice(b0, b1) + binary_dice(b0, b2))


@register_query("dsal")
class DSALQuery(QueryStrategy):
    """One forward pass: low agreement goes to the oracle, high agreement to the weak labeler."""

    def batch_scores(self, model, x):
        out = model(x, training=False)
        a = agreement(out["main"], out["side_1"], out["side_2"])
        return {"uncertainty": 1.0 - a, "agreement": a, "prob": out["main"]}
