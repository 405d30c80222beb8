"""Registries of query strategies, pseudo-label policies and selection rules, picked by name from constants."""

from . import boostmis, ceal, claspe, dsal, ensemble, entropy, pseudo, random_fg, random_query  # noqa: F401  (registration)
from .base import (
    PSEUDO_POLICIES,
    QUERY_STRATEGIES,
    PseudoPolicy,
    QueryStrategy,
    histogram_select,
    k_center_greedy,
)
from .selection import SELECTIONS, Selection


def pseudo_policy_name(cfg) -> str:
    """The weak labeler a run uses: `PSEUDO_POLICY`, or with "auto" the query strategy's own."""
    if cfg.pseudo_policy != "auto":
        return cfg.pseudo_policy
    return QUERY_STRATEGIES[cfg.query_strategy].default_pseudo


__all__ = ["QUERY_STRATEGIES", "PSEUDO_POLICIES", "SELECTIONS", "QueryStrategy", "PseudoPolicy", "Selection",
           "histogram_select", "k_center_greedy", "pseudo_policy_name"]
