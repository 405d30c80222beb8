"""Selection rules: how a strategy's per-image key (higher = ask the oracle first) becomes `n` picks.

Picked by name (`SELECTION`; "auto" = the query strategy's own `default_selection`):

| name | rule |
|---|---|
| `rank` | the top `n` keys |
| `histogram` | CEAL's histogram bins (`histogram_select`) |
| `power` | a seeded draw with p ~ (rank / N) ** beta, beta scheduled over the rounds (`power_select`) |
| `score_power` | ClaSP PE's draw with p ~ score ** beta, beta geometric over the rounds (`score_power_select`) |
| `diverse` | the strategy's own `DIVERSE_FACTOR * n` candidates, thinned by k-center greedy on features |
| `size_strata` | the top keys within each predicted-foreground stratum, picks split by stratum size |

Formulas: docs/methods.md#selection-rules.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import DsalError
from ..registry import registrar
from ..settings import Settings, positive
from .ranking import (
    geometric_beta,
    histogram_select,
    k_center_greedy,
    power_beta,
    power_select,
    score_power_select,
    size_strata_select,
)

SELECTIONS: dict[str, type[Selection]] = {}
register_selection = registrar(SELECTIONS)


class Selection:
    """Turns keys into picks. `needs_features`: the scoring pass must also return the features."""

    name = "base"
    needs_features = False
    round_schedule = False  # True: its draw depends on the round's place in NB_ITERATIONS (a schedule)
    Settings = Settings

    def __init__(self, settings: Settings | None = None, nb_rounds: int = 1):
        self.settings = settings if settings is not None else self.Settings()
        self.nb_rounds = nb_rounds

    @classmethod
    def from_config(cls, cfg) -> Selection:
        return cls(cls.Settings.from_config(cfg), cfg.nb_iterations)

    def choose(self, key: np.ndarray, n: int, rng: np.random.Generator | None, round_: int = 1) -> np.ndarray:
        raise NotImplementedError

    def choose_from(self, key: np.ndarray, scores: dict[str, np.ndarray], n: int, rng: np.random.Generator | None,
                    round_: int = 1) -> np.ndarray:
        """`choose`, for a rule that needs more of the round's per-item `scores` than the key (size strata)."""
        return self.choose(key, n, rng, round_)


@register_selection("rank")
class Rank(Selection):
    def choose(self, key, n, rng, round_=1):
        return np.argsort(-np.asarray(key), kind="stable")[:n]


@register_selection("histogram")
class Histogram(Selection):
    def choose(self, key, n, rng, round_=1):
        return histogram_select(key, n, rng)


@register_selection("power")
class Power(Selection):
    round_schedule = True

    @dataclass(frozen=True)
    class Settings(Settings):
        power_beta_start: float = 1.0  # draw with p ~ rank-score**beta, beta from START (round 1) ...
        power_beta_end: float = 4.0  # ... to END (the last round), linearly

        def check(self):
            positive("power_beta_start", self.power_beta_start, strict=False)
            positive("power_beta_end", self.power_beta_end, strict=False)

    def choose(self, key, n, rng, round_=1):
        beta = power_beta(self.settings.power_beta_start, self.settings.power_beta_end, round_, self.nb_rounds)
        return power_select(key, n, beta, rng)


@register_selection("score_power")
class ScorePower(Selection):
    """ClaSP PE's power noising: a seeded draw with p ~ score**beta, beta from 1 to 100 geometrically.

    docs/methods.md#clasp-pe; scores must be >= 0 (`power` draws on the rank instead)."""

    round_schedule = True

    @dataclass(frozen=True)
    class Settings(Settings):
        score_power_beta_start: float = 1.0  # draw with p ~ score**beta, beta from START (round 1) ...
        score_power_beta_end: float = 100.0  # ... to END (the last round), geometrically (ClaSP PE)

        def check(self):
            positive("score_power_beta_start", self.score_power_beta_start)
            positive("score_power_beta_end", self.score_power_beta_end)

    def beta(self, round_: int) -> float:
        return geometric_beta(self.settings.score_power_beta_start, self.settings.score_power_beta_end, round_,
                              self.nb_rounds)

    def choose(self, key, n, rng, round_=1):
        try:
            return score_power_select(key, n, self.beta(round_), rng)
        except ValueError as e:
            raise DsalError(f"SELECTION = 'score_power': {e}; this strategy's scores can be negative, "
                            "use SELECTION = 'power' (it draws on the rank)") from None


@register_selection("size_strata")
class SizeStrata(Selection):
    """The top keys within each stratum of predicted lesion size, picks split by stratum size.

    DSAL's score at 64x64 mostly ranks the smallest lesions first (docs/methods.md#dsal-and-lesion-size);
    here each size stratum gets its share of the query (`size_strata_select`)."""

    @dataclass(frozen=True)
    class Settings(Settings):
        size_strata_bins: int = 4  # quantile bins of the predicted foreground fraction; picks split by bin size

        def check(self):
            positive("size_strata_bins", self.size_strata_bins)

    def choose_from(self, key, scores, n, rng, round_=1):
        if "foreground" not in scores:
            raise DsalError("SELECTION = 'size_strata' needs the scores' `foreground` column (every "
                            "strategy's scoring pass writes it); rescore the round, or use SELECTION = 'rank'")
        return size_strata_select(key, scores["foreground"], n, self.settings.size_strata_bins)

    def choose(self, key, n, rng, round_=1):
        raise DsalError("SELECTION = 'size_strata' needs each image's predicted foreground, and this strategy "
                        "picks from its keys alone (ClaSP PE splits its query); use SELECTION = 'rank' or 'auto'")


@register_selection("diverse")
class Diverse(Selection):
    """Thins the strategy's own candidates; `choose` is the k-center step over their features."""

    needs_features = True

    @dataclass(frozen=True)
    class Settings(Settings):
        diverse_factor: int = 3  # k-center greedy over the DIVERSE_FACTOR * n top candidates

        def check(self):
            positive("diverse_factor", self.diverse_factor)

    def candidates(self, n: int, pool_size: int) -> int:
        return min(self.settings.diverse_factor * n, pool_size)

    def thin(self, candidates: np.ndarray, features: np.ndarray, n: int) -> np.ndarray:
        return candidates[k_center_greedy(features[candidates], n)]


__all__ = ["SELECTIONS", "Selection", "Rank", "Histogram", "Power", "ScorePower", "SizeStrata", "Diverse",
           "register_selection"]
