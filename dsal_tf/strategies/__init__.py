"""Registries of query strategies and pseudo-label policies, picked by name from constants."""

from . import ceal, dsal, ensemble, entropy, pseudo, random_query  # noqa: F401  (registration)
from .base import PSEUDO_POLICIES, QUERY_STRATEGIES, PseudoPolicy, QueryStrategy, histogram_select

__all__ = ["QUERY_STRATEGIES", "PSEUDO_POLICIES", "QueryStrategy", "PseudoPolicy", "histogram_select"]
