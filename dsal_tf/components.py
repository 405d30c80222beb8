"""A run's components, built at the edge: `build(cfg)` resolves every name through the registries.

The configuration names classes (`QUERY_STRATEGY`, `PSEUDO_POLICY`, `SELECTION`, `TRAINER`,
`ORACLE`) and carries their settings; this module turns it into objects before anything is
written: a typo gets one line with the closest valid name, every setting is checked by the class
that owns it (`dsal_tf/settings.py`), and the data decides the space (2D images today). The loop,
the CLI and the benchmarks take the components from here and never branch on a name. CLI help
and `docs/configuration.md` are generated from the same registries, so no name list can drift.

    python -m dsal_tf.components --configuration docs/configuration.md   # rewrite the reference table
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass

from .config import FIELDS, PRESETS, Config
from .config import load_config as read_config
from .errors import DsalError
from .oracle import ORACLES, Oracle
from .settings import Settings, settings_class, suggest
from .space import ImageSpace, VolumeSpace, space_for
from .stopping import STOP_RULES, StopRule
from .strategies import PSEUDO_POLICIES, QUERY_STRATEGIES, SELECTIONS, PseudoPolicy, QueryStrategy, pseudo_policy_name
from .trainers import TRAINERS

# constant -> its registry; "auto" means the query strategy's own choice where allowed
REGISTRIES: dict[str, dict[str, type]] = {
    "query_strategy": QUERY_STRATEGIES,
    "pseudo_policy": PSEUDO_POLICIES,
    "selection": SELECTIONS,
    "trainer": TRAINERS,
    "oracle": ORACLES,
}
AUTO_ALLOWED = {"pseudo_policy", "selection"}
MARKER = "<!-- generated: python -m dsal_tf.components --configuration docs/configuration.md -->"


@dataclass(frozen=True)
class Components:
    """Everything a run is made of besides its data and model (MONAI's engine parts)."""

    query: QueryStrategy  # scores the pool; holds its selection rule (`query.selection`)
    pseudo: PseudoPolicy  # the weak labeler
    trainer: type  # `TRAINERS[TRAINER]`: `fit_job(train.FitJob)` trains one round
    oracle: Oracle  # the strong labeler
    space: ImageSpace | VolumeSpace  # everything that depends on the image rank
    stop_rules: tuple[StopRule, ...]


SPACES = {"image": ImageSpace, "volume": VolumeSpace}  # picked from the data (`space_for`), not by name


def every_class() -> list[type]:
    """Every class with settings (strategies, policies, selections, trainers, oracles, stop rules, spaces)."""
    return [c for registry in (*REGISTRIES.values(), STOP_RULES, SPACES) for c in registry.values()]


def owners() -> dict[str, list[type]]:
    """Setting name -> the classes that declare it (one constant may feed several, e.g. EMA_DECAY)."""
    out: dict[str, list[type]] = {}
    for cls in every_class():
        for name in settings_class(cls).names():
            out.setdefault(name, []).append(cls)
    return out


def check_names(cfg: Config) -> None:
    """Every class name through its registry, and every algorithm setting the user gave checked by
    the classes that declare it; one line with the closest valid name on a typo."""
    for key, registry in REGISTRIES.items():
        value = getattr(cfg, key)
        if value not in registry and not (key in AUTO_ALLOWED and value == "auto"):
            options = sorted(registry) + (["auto"] if key in AUTO_ALLOWED else [])
            raise DsalError(f"{key.upper()} = {value!r} is not one of {options}" + suggest(value, options))
    query = QUERY_STRATEGIES[cfg.query_strategy]
    if query.draws_at_random and cfg.selection != "auto" and not SELECTIONS[cfg.selection].needs_features:
        raise DsalError(f"SELECTION = {cfg.selection!r} ranks a score, but QUERY_STRATEGY = {cfg.query_strategy!r} "
                        "draws its picks at random and would ignore it: set SELECTION = \"auto\" (or \"diverse\": "
                        "random candidates thinned by k-center)")
    known = owners()
    for name in cfg.settings:
        if name not in known:
            valid = [n.upper() for n in (*FIELDS, *known)]
            raise DsalError(f"unknown constant {name.upper()}" + suggest(name.upper(), valid)
                            + "; see docs/configuration.md")
    seen: set[type] = set()
    for name in cfg.settings:
        for cls in known[name]:
            if settings_class(cls) not in seen:
                seen.add(settings_class(cls))
                settings_class(cls).from_config(cfg)  # coerces and checks: one line naming the constant


def load_config(constants: str | None = "constants.py", overrides: dict | None = None) -> Config:
    """`config.load_config` (defaults < preset < constants file < overrides) with every name and
    setting checked: what commands and benchmarks start from."""
    cfg = read_config(constants, overrides)
    check_names(cfg)
    return cfg


def pseudo_name(cfg: Config) -> str:
    """The weak labeler a run uses: `PSEUDO_POLICY`; "auto" is the query strategy's own, or none
    under a trainer that learns from the whole unlabelled pool (`uses_pool`: the pool is used already)."""
    if cfg.pseudo_policy == "auto" and getattr(TRAINERS[cfg.trainer], "uses_pool", False):
        return "none"
    return pseudo_policy_name(cfg)


def chosen_classes(cfg: Config) -> list[type]:
    """The classes a run uses, resolved from their names ("auto" = the query strategy's own)."""
    query = QUERY_STRATEGIES[cfg.query_strategy]
    selection = query.default_selection if cfg.selection == "auto" else cfg.selection
    return [query, PSEUDO_POLICIES[pseudo_name(cfg)], SELECTIONS[selection], TRAINERS[cfg.trainer],
            ORACLES[cfg.oracle], *STOP_RULES.values(), type(space_for(cfg))]


def resolved(cfg: Config) -> Config:
    """`cfg` checked, with the full settings of the classes it uses (defaults included), so the run's
    config.json records every value the run depends on."""
    check_names(cfg)
    settings = dict(cfg.settings)
    for cls in chosen_classes(cfg):
        settings.update(settings_class(cls).from_config(cfg).to_dict())
    return dataclasses.replace(cfg, settings=dict(sorted(settings.items())))


def build(cfg: Config) -> Components:
    """The run's components, checked (nothing is written here)."""
    check_names(cfg)
    pseudo = PSEUDO_POLICIES[pseudo_name(cfg)]
    space = space_for(cfg)
    return Components(
        query=QUERY_STRATEGIES[cfg.query_strategy].from_config(cfg),
        pseudo=pseudo.from_config(cfg),
        trainer=TRAINERS[cfg.trainer],
        oracle=ORACLES[cfg.oracle].from_config(cfg, space),
        space=space,
        stop_rules=tuple(rule.from_config(cfg) for rule in STOP_RULES.values()),
    )


# ------------------------------------------------------------------ generated documentation
def names_help(key: str) -> str:
    """`a, b or c` for a CLI option's help, from the registry."""
    names = sorted(REGISTRIES[key])
    return ", ".join(names[:-1]) + f" or {names[-1]}" if len(names) > 1 else names[0]


def _doc_of(cls: type) -> str:
    doc = (cls.__doc__ or "").strip().split("\n")[0]
    return doc.replace("|", "/")


def _settings_rows(settings: type[Settings]) -> list[str]:
    import inspect

    comments = {}
    for cls in reversed(settings.__mro__):  # inherited fields keep their comments; a subclass's own win
        try:
            source = inspect.getsource(cls)
        except (OSError, TypeError):
            continue
        for line in source.splitlines():
            if ":" in line and "#" in line and "=" in line:
                name = line.split(":")[0].strip()
                comments[name] = line.split("#", 1)[1].strip().replace("|", "/")
    return [f"| `{f.name.upper()}` | `{f.default!r}` | {comments.get(f.name, '')} |"
            for f in dataclasses.fields(settings)]


def configuration_table() -> str:
    """The reference of every constant, generated from `Config` and the settings classes."""
    import inspect

    lines = [MARKER, "",
             "## Run settings (`Config`)", "", "| constant | default | meaning |", "|---|---|---|"]
    comments = {}
    for line in inspect.getsource(Config).splitlines():
        if ":" in line and "=" in line and not line.strip().startswith(("#", "def", "return", '"')):
            name = line.split(":")[0].strip()
            comments[name] = line.split("#", 1)[1].strip().replace("|", "/") if "#" in line else ""
    lines += [f"| `{n.upper()}` | `{f.default!r}` | {comments.get(n, '')} |" for n, f in FIELDS.items()
              if not isinstance(f.default, dataclasses._MISSING_TYPE)]
    lines += ["", f"Presets: {', '.join(f'`{p}`' for p in PRESETS)}.", ""]
    titles = {"query_strategy": "Query strategies (`QUERY_STRATEGY`)", "pseudo_policy": "Pseudo-label policies "
              "(`PSEUDO_POLICY`)", "selection": "Selection rules (`SELECTION`)", "trainer": "Trainers (`TRAINER`)",
              "oracle": "Oracles (`ORACLE`)"}
    titles["stop"] = "Stop rules (always on, each off at 0)"
    titles["space"] = "Spaces (picked from the data: NIfTI volumes make a volume dataset)"
    for key, registry in (*REGISTRIES.items(), ("stop", STOP_RULES), ("space", SPACES)):
        lines += [f"## {titles[key]}", ""]
        for name in sorted(registry):
            cls = registry[name]
            lines += [f"### `{name}`", "", _doc_of(cls) or "(no description)", ""]
            rows = _settings_rows(settings_class(cls))
            lines += (["| constant | default | meaning |", "|---|---|---|", *rows, ""] if rows
                      else ["No settings of its own.", ""])
    return "\n".join(lines) + "\n"


def with_table(text: str) -> str:
    """A page with everything after its `MARKER` line replaced by today's table (the intro is kept)."""
    head = text.split(MARKER)[0] if MARKER in text else text.rstrip() + "\n\n"
    return head + configuration_table()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] != "--configuration" or len(argv) > 2:
        print("usage: python -m dsal_tf.components --configuration [PAGE.md]", file=sys.stderr)
        return 2
    if len(argv) == 1:
        print(configuration_table(), end="")
        return 0
    from pathlib import Path

    page = Path(argv[1])
    page.write_text(with_table(page.read_text() if page.is_file() else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
