"""Stop rules: objects the loop asks whether to go on (after baal's `should_stop`).

Every rule is built for every run and is inert at its default (0 = off). A rule answers before a
round queries (`before_query`, from the pool and the run's learning curve) or once the pool is
scored (`after_scoring`); a reason (one line, naming the constant) ends the loop for good, and
`cap` bounds how many labels a round may still ask for.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass

import numpy as np

from .registry import registrar
from .settings import Settings, in_range, positive

STOP_RULES: dict[str, type[StopRule]] = {}
register_stop = registrar(STOP_RULES)


class StopRule:
    name = "base"
    Settings = Settings

    def __init__(self, settings: Settings | None = None):
        self.settings = settings if settings is not None else self.Settings()

    @classmethod
    def from_config(cls, cfg) -> StopRule:
        return cls(cls.Settings.from_config(cfg))

    def before_query(self, pool, run) -> str | None:
        """Why the loop should end before the next round queries (`pool`: its state now; `run`: the
        run folder), or None."""
        return None

    def after_scoring(self, scores: dict[str, np.ndarray]) -> str | None:
        """Why the loop should end once the pool is scored (nothing chosen yet), or None."""
        return None

    def cap(self, n: int, pool) -> int:
        """How many oracle labels the round may ask for, of the `n` it wants."""
        return n


@register_stop("budget")
class Budget(StopRule):
    @dataclass(frozen=True)
    class Settings(Settings):
        stop_budget: int = 0  # stop once this many expert labels are used (0 = off)

        def check(self):
            positive("stop_budget", self.stop_budget, strict=False)

    def before_query(self, pool, run):
        budget, used = self.settings.stop_budget, len(pool.labelled)
        if budget and used >= budget:
            return f"expert budget STOP_BUDGET = {budget} labels reached ({used} used)"
        return None

    def cap(self, n, pool):
        budget = self.settings.stop_budget
        return min(n, budget - len(pool.labelled)) if budget else n


@register_stop("plateau")
class Plateau(StopRule):
    @dataclass(frozen=True)
    class Settings(Settings):
        stop_patience: int = 0  # stop when val Dice has not improved by STOP_MIN_DELTA for k rounds (0 = off)
        stop_min_delta: float = 0.001

        def check(self):
            positive("stop_patience", self.stop_patience, strict=False)
            positive("stop_min_delta", self.stop_min_delta, strict=False)

    def before_query(self, pool, run):
        k, delta = self.settings.stop_patience, self.settings.stop_min_delta
        path = run.curve_file
        if not k or not path.is_file():
            return None
        with path.open() as f:
            dice = [float(row["val_dice"]) for row in csv.DictReader(f)]
        if len(dice) > k and max(dice[-k:]) < max(dice[:-k]) + delta:
            return f"validation Dice has not improved by {delta} for {k} rounds (STOP_PATIENCE)"
        return None


@register_stop("agreement")
class Agreement(StopRule):
    @dataclass(frozen=True)
    class Settings(Settings):
        stop_agreement: float = 0.0  # stop when the pool's mean side-head agreement reaches this (0 = off)

        def check(self):
            in_range("stop_agreement", self.stop_agreement, 0.0, 1.0, high_open=False, note=" (0 = off)")

    def after_scoring(self, scores):
        level = self.settings.stop_agreement
        if level and "agreement" in scores:
            mean = float(np.mean(scores["agreement"]))
            if mean >= level:
                return f"mean pool agreement {mean:.4f} >= STOP_AGREEMENT = {level}"
        return None


__all__ = ["STOP_RULES", "StopRule", "Budget", "Plateau", "Agreement", "register_stop"]
