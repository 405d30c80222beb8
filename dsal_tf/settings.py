"""Settings owned by one algorithm: a small frozen dataclass per registered class.

A query strategy, pseudo-label policy, selection rule, trainer, oracle or stop rule declares its
own settings as a nested `Settings` dataclass whose fields are the lower-case names of the
constants users write (`MC_PASSES = 20` is `mc_passes`). The run's `Config` holds only the loop,
data, model and training fields; every other constant a user sets waits in `Config.settings`
until `components.build` hands it to the class that owns it, which coerces and checks it here.
So a setting is spelled once (its field, with its default and comment) and checked once
(`check`), and `docs/configuration.md` is generated from these classes.

This module imports nothing of the package but `errors`, so every module may import it.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import DsalError


def suggest(name: str, options: Iterable[str]) -> str:
    """` (did you mean 'X'?)` for the closest of `options`, or ""."""
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def coerce(name: str, value: Any, default: Any, source: str) -> Any:
    """`value` as the type of `default` (bool from "yes"/"off"/1, int from 3.0, tuples from "a,b"),
    or one line naming the constant and an example value."""
    kind = type(default)
    try:
        if kind is bool:
            if isinstance(value, str):
                low = value.strip().lower()
                if low not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                    raise ValueError
                return low in ("1", "true", "yes", "on")
            if not isinstance(value, (bool, int)):
                raise ValueError
            return bool(value)
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if kind is tuple:
            if isinstance(value, str):
                value = [v for v in value.replace("(", "").replace(")", "").split(",") if v.strip()]
            inner = type(default[0])
            return tuple(inner(v) for v in value)
        return str(value)
    except (TypeError, ValueError):
        raise DsalError(
            f"{name.upper()} in {source} = {value!r} is not a valid {kind.__name__}; use e.g. {default!r}"
        ) from None


@dataclass(frozen=True)
class Settings:
    """Base of every algorithm's settings. Subclasses add fields (name = constant in lower case,
    default = the reference value) and may override `check`."""

    def check(self) -> None:
        """Raise `DsalError` naming the constant when a value is out of range."""

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_values(cls, values: Mapping[str, Any], source: str = "constants.py") -> Settings:
        """This class's fields from `{lower-case name: value}` (others ignored), coerced and checked."""
        given = {}
        for f in dataclasses.fields(cls):
            if f.name in values:
                given[f.name] = coerce(f.name, values[f.name], f.default, source)
        settings = cls(**given)
        settings.check()
        return settings

    @classmethod
    def from_config(cls, cfg) -> Settings:
        return cls.from_values(cfg.settings, "the configuration")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def in_range(name: str, value: float, low: float, high: float, high_open: bool = True, note: str = "") -> None:
    """One line when `value` is not in [low, high) (or [low, high])."""
    ok = low <= value < high if high_open else low <= value <= high
    if not ok:
        bracket = ")" if high_open else "]"
        raise DsalError(f"{name.upper()} must be in [{low:g}, {high:g}{bracket}{note}, got {value!r}")


def positive(name: str, value: float, strict: bool = True) -> None:
    if value <= 0 if strict else value < 0:
        raise DsalError(f"{name.upper()} must be {'> 0' if strict else '>= 0'}, got {value!r}")


def settings_class(cls: type) -> type[Settings]:
    """The `Settings` a registered class declares (the empty base when it has none)."""
    return getattr(cls, "Settings", Settings)


__all__ = ["Settings", "coerce", "in_range", "positive", "settings_class", "suggest"]
