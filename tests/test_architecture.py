"""The package's shape, read from the source with `ast` (no TensorFlow, no import of dsal_tf): the import
graph has no cycle, `config.py` needs no algorithm, functions stay small, benchmarks and tests use only
the public loop, and reductions do not hard-code the 2D axes.

Several checks are ratchets: an allowlist holds today's offenders with today's numbers. A new offender, or an
offender that grew, fails; an entry that is no longer an offender fails too, asking for its deletion, so the
lists only shrink. Never add to them: make the new code fit instead.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "dsal_tf"
PACKAGE_DIR = ROOT / PACKAGE


# ---------------------------------------------------------------------------------------------------------------
# Reading the package
# ---------------------------------------------------------------------------------------------------------------

def module_name(path: Path, root: Path = ROOT) -> str:
    """`dsal_tf/strategies/base.py` -> `dsal_tf.strategies.base`; a package's `__init__.py` -> the package."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_files(package_dir: Path = PACKAGE_DIR) -> dict[str, Path]:
    return {module_name(p, package_dir.parent): p for p in sorted(package_dir.rglob("*.py"))}


_TREES: dict[Path, ast.Module] = {}


def parse(path: Path) -> ast.Module:
    if path not in _TREES:
        _TREES[path] = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return _TREES[path]


def is_type_checking(test: ast.expr) -> bool:
    """`if TYPE_CHECKING:` or `if typing.TYPE_CHECKING:`."""
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def import_nodes(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement, at module level or inside a function or class, except those under
    `if TYPE_CHECKING:` (its `else:` branch runs, so it counts)."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
            return
        if isinstance(node, ast.If) and is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def resolve_from(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module name of `from <node.module> import ...` written in `module`."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    if node.level > 1:
        base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def ancestors(name: str) -> list[str]:
    """`a.b.c` -> [`a`, `a.b`]."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def imported_modules(module: str, path: Path, known: set[str]) -> set[str]:
    """The package modules whose code runs (or must have run) because `module` imports them.

    `import a.b.c` and `from a.b.c import x` run `a.b.c` and the `__init__` of every package above it, except the
    packages that hold `module` itself (already being imported when its code runs). `from P import x` counts `P`,
    and also `P.x` when `x` is a submodule; `from . import x` inside P counts `P.x`, and counts `P` only when `x`
    is not a submodule (a name that P's `__init__` must already have defined)."""
    is_package = path.name == "__init__.py"
    own = set(ancestors(module)) | ({module} if is_package else set())
    out: set[str] = set()

    def add(target: str) -> None:
        for name in [*ancestors(target), target]:
            if name in known and name not in own:
                out.add(name)

    for node in import_nodes(parse(path)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
            continue
        base = resolve_from(module, is_package, node)
        submodules = {f"{base}.{a.name}" for a in node.names} & known
        for sub in submodules:
            add(sub)
        if base not in own:
            add(base)
        elif len(submodules) < len(node.names):  # a name defined by the __init__ of a package holding `module`
            out.add(base)
    out.discard(module)
    return out


def import_graph(package_dir: Path = PACKAGE_DIR) -> dict[str, set[str]]:
    files = package_files(package_dir)
    known = set(files)
    return {m: imported_modules(m, p, known) for m, p in files.items()}


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components (iterative, so a deep graph cannot hit the recursion limit)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    components.append(sorted(component))
    return components


def reachable(graph: dict[str, set[str]], start: str) -> dict[str, str]:
    """Every module `start` imports, directly or not, each with the module it was first reached from."""
    via: dict[str, str] = {}
    todo = [start]
    while todo:
        node = todo.pop()
        for child in sorted(graph.get(node, ())):
            if child not in via and child != start:
                via[child] = node
                todo.append(child)
    return via


def chain(via: dict[str, str], start: str, end: str) -> str:
    path = [end]
    while path[-1] != start:
        path.append(via[path[-1]])
    return " -> ".join(reversed(path))


# ---------------------------------------------------------------------------------------------------------------
# (a), (b) the import graph
# ---------------------------------------------------------------------------------------------------------------

TOY_PACKAGE = {
    "__init__.py": "",
    "a.py": "import os\nfrom . import b\nfrom .c import thing\n",
    "b.py": "def f():\n    from .pkg.leaf import x\n    import p.e\n",
    "c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import a\nelse:\n    from . import e\n",
    "e.py": "from .pkg import leaf, NAME\n",
    "f.py": "from p import pkg\n",
    "pkg/__init__.py": "from . import leaf\nNAME = 1\n",
    "pkg/leaf.py": "from . import NAME\nfrom .. import b\nfrom ..pkg import other\n",
    "pkg/other.py": "from .leaf import y\n",
}


def test_the_graph_reader_follows_the_documented_rules(tmp_path):
    for rel, text in TOY_PACKAGE.items():
        (tmp_path / "p" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "p" / rel).write_text(text)
    assert import_graph(tmp_path / "p") == {
        "p": set(),
        "p.a": {"p.b", "p.c"},  # `from . import b` is p.b; `from .c import thing` is p.c; os is not ours
        "p.b": {"p.pkg", "p.pkg.leaf", "p.e"},  # function level; importing p.pkg.leaf runs p.pkg first
        "p.c": {"p.e"},  # the TYPE_CHECKING branch does not count, its else does
        "p.e": {"p.pkg", "p.pkg.leaf"},  # `from .pkg import leaf, NAME`: the package and its submodule
        "p.f": {"p.pkg"},  # absolute: `from p import pkg` imports the subpackage p.pkg
        "p.pkg": {"p.pkg.leaf"},
        "p.pkg.leaf": {"p.pkg", "p.b", "p.pkg.other"},  # NAME comes from its own package's __init__
        "p.pkg.other": {"p.pkg.leaf"},  # its own package is already being imported: not counted
    }


def test_tarjan_finds_cycles_and_only_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": {"e"}, "e": {"d"}, "f": set(), "g": {"g"}}
    comps = sorted(c for c in strongly_connected(graph) if len(c) > 1)
    assert comps == [["a", "b", "c"], ["d", "e"]]


def test_no_import_cycle():
    cycles = [c for c in strongly_connected(import_graph()) if len(c) > 1]
    message = "\n".join(f"  cycle of {len(c)} modules: {', '.join(c)}" for c in cycles)
    assert not cycles, f"{len(cycles)} import cycle(s) in {PACKAGE}/ (function-level imports count):\n{message}"


def test_config_needs_no_strategy_or_trainer():
    via = reachable(import_graph(), "dsal_tf.config")
    bad = sorted(m for m in via if m.split(".")[:2] in (["dsal_tf", "strategies"], ["dsal_tf", "trainers"]))
    message = "\n".join(f"  {chain(via, 'dsal_tf.config', m)}" for m in bad)
    assert not bad, f"dsal_tf/config.py imports algorithm modules (directly or not):\n{message}"


# ---------------------------------------------------------------------------------------------------------------
# (c) function size
# ---------------------------------------------------------------------------------------------------------------

MAX_LINES = 80
MAX_LINES_ACTIVE = 40  # dsal_tf/active.py: the loop is a few lines over public round calls
MAX_PARAMS = 8

# Today's offenders, "module:qualname" (nested functions as outer.inner) -> their sizes over the limits.
# The refactor of issue #23 is under way: this list may only SHRINK. Never add an entry or raise a number;
# when a function fits, delete its entry (test_allowed_over_limit_entries_are_still_over says so).
ALLOWED_OVER_LIMIT: dict[str, dict[str, int]] = {
    "dsal_tf.data:make_dataset": {"params": 10},
}


@dataclass
class Function:
    key: str
    lines: int
    params: int
    is_command: bool


def decorator_name(node: ast.expr) -> str:
    if isinstance(node, ast.Call):
        node = node.func
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def is_click_command(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """`@cli.command`, `@click.command(...)`, or any decorator named `<something>.command`."""
    return any(decorator_name(d) == "command" or decorator_name(d).endswith(".command") for d in fn.decorator_list)


def count_params(fn: ast.FunctionDef | ast.AsyncFunctionDef, in_class: bool) -> int:
    """Parameters, with `*args` and `**kwargs` one each; `self`/`cls` of a method not counted."""
    a = fn.args
    names = [p.arg for p in (*a.posonlyargs, *a.args, *a.kwonlyargs)]
    n = len(names) + (a.vararg is not None) + (a.kwarg is not None)
    if in_class and names and names[0] in ("self", "cls"):
        n -= 1
    return n


def functions(module: str, tree: ast.Module) -> list[Function]:
    found: list[Function] = []

    def visit(node: ast.AST, prefix: str, in_class: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                qual = f"{prefix}{child.name}"
                found.append(Function(f"{module}:{qual}", child.end_lineno - child.lineno + 1,
                                      count_params(child, in_class), is_click_command(child)))
                visit(child, f"{qual}.", False)
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.", True)
            else:
                visit(child, prefix, in_class)

    visit(tree, "", False)
    return found


def over_limit() -> dict[str, dict[str, int]]:
    """Every function of the package over a limit -> {"lines": n} and/or {"params": n}."""
    out: dict[str, dict[str, int]] = {}
    for module, path in package_files().items():
        max_lines = MAX_LINES_ACTIVE if module == "dsal_tf.active" else MAX_LINES
        for fn in functions(module, parse(path)):
            sizes = {}
            if fn.lines > max_lines:
                sizes["lines"] = fn.lines
            if fn.params > MAX_PARAMS and not fn.is_command:
                sizes["params"] = fn.params
            if sizes:
                out[fn.key] = sizes
    return out


def test_function_size_is_measured_as_documented():
    tree = ast.parse(
        "class A:\n"
        "    def m(self, a, *args, b, **kw):\n"
        "        '''doc'''\n"
        "        def inner(x):\n"
        "            return x\n"
        "        return inner\n"
        "@cli.command('x')\n"
        "@click.option('--y')\n"
        "def cmd(a, b, c, d, e, f, g, h, i):\n"
        "    pass\n"
    )
    got = {f.key: (f.lines, f.params, f.is_command) for f in functions("m", tree)}
    assert got == {"m:A.m": (5, 4, False), "m:A.m.inner": (2, 1, False), "m:cmd": (2, 9, True)}


def test_no_function_grows_past_the_limits():
    problems = []
    for key, sizes in sorted(over_limit().items()):
        allowed = ALLOWED_OVER_LIMIT.get(key, {})
        for what, n in sizes.items():
            limit = {"params": MAX_PARAMS}.get(what, MAX_LINES_ACTIVE if key.startswith("dsal_tf.active:")
                                                else MAX_LINES)
            if what not in allowed:
                problems.append(f"  {key}: {n} {what} (limit {limit}): new offender; split it up")
            elif n > allowed[what]:
                problems.append(f"  {key}: {n} {what}, up from {allowed[what]} (limit {limit}); it may only shrink")
    assert not problems, "functions over the size limits:\n" + "\n".join(problems)


def test_allowed_over_limit_entries_are_still_over():
    now = over_limit()
    stale = [f"  {key}: {what} now within the limit (or the function is gone): delete it from ALLOWED_OVER_LIMIT"
             for key, sizes in sorted(ALLOWED_OVER_LIMIT.items()) for what in sizes if what not in now.get(key, {})]
    assert not stale, "tidy tests/test_architecture.py:\n" + "\n".join(stale)


# ---------------------------------------------------------------------------------------------------------------
# (d) bench/ and tests/ use only the public loop
# ---------------------------------------------------------------------------------------------------------------

# "file:name" of today's uses of private dsal_tf.active names; may only shrink (delete an entry once unused).
# Empty since issue #23 moved bench/bench_scale.py off `_score` onto the public round calls: keep it empty.
ALLOWED_PRIVATE_ACTIVE: set[str] = set()


def is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_active_uses(path: Path) -> set[str]:
    """Private names taken from `dsal_tf.active`: `from dsal_tf.active import _x`, or `_x` read as an attribute
    of the module (`import dsal_tf.active as A; A._x`, `from dsal_tf import active; active._x`)."""
    tree = parse(path)
    used: set[str] = set()
    aliases: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and not node.level:
            if node.module == "dsal_tf.active":
                used |= {a.name for a in node.names if is_private(a.name)}
            elif node.module == "dsal_tf":
                aliases |= {a.asname or a.name for a in node.names if a.name == "active"}
        elif isinstance(node, ast.Import):
            aliases |= {a.asname for a in node.names if a.name == "dsal_tf.active" and a.asname}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and is_private(node.attr):
            target = node.value
            if isinstance(target, ast.Name) and target.id in aliases:
                used.add(node.attr)
            elif ast.unparse(target) == "dsal_tf.active":
                used.add(node.attr)
    return used


def private_active_imports() -> set[str]:
    files = [p for d in ("bench", "tests") for p in sorted((ROOT / d).rglob("*.py"))]
    return {f"{p.relative_to(ROOT).as_posix()}:{n}" for p in files for n in private_active_uses(p)}


def test_private_uses_are_found_in_every_form(tmp_path):
    f = tmp_path / "b.py"
    f.write_text("import dsal_tf.active as A\nfrom dsal_tf import active\nfrom dsal_tf.active import _a, b, __all__\n"
                 "def g():\n    return A._c, active._d, dsal_tf.active._e, active.f, A.__doc__\n")
    assert private_active_uses(f) == {"_a", "_c", "_d", "_e"}


def test_bench_and_tests_use_no_new_private_loop_function():
    new = sorted(private_active_imports() - ALLOWED_PRIVATE_ACTIVE)
    assert not new, ("private dsal_tf.active names used outside the package (use the public round calls):\n"
                     + "\n".join(f"  {x}" for x in new))


def test_allowed_private_active_entries_are_still_used():
    stale = sorted(ALLOWED_PRIVATE_ACTIVE - private_active_imports())
    assert not stale, "no longer used: delete from ALLOWED_PRIVATE_ACTIVE:\n" + "\n".join(f"  {x}" for x in stale)


# ---------------------------------------------------------------------------------------------------------------
# (e) no hard-coded 2D reduction axes
# ---------------------------------------------------------------------------------------------------------------

AXES_123 = re.compile(r"axis\s*=\s*[\[(]\s*1\s*,\s*2\s*,\s*3\s*,?\s*[\])]")

# file -> today's count of `axis=[1, 2, 3]` / `axis=(1, 2, 3)`; may only shrink (reduce over the space's axes).
# Empty since issue #23 (12 in 5 files at f47bcb5): keep it empty.
ALLOWED_AXES_123: dict[str, int] = {}


def axes_123_counts() -> dict[str, int]:
    counts = {p.relative_to(ROOT).as_posix(): len(AXES_123.findall(p.read_text(encoding="utf-8")))
              for p in sorted(PACKAGE_DIR.rglob("*.py"))}
    return {f: n for f, n in counts.items() if n}


def test_the_axes_pattern_matches_any_spacing():
    for text in ("axis=[1, 2, 3]", "axis = (1,2,3)", "axis=[ 1 ,2, 3 ]", "axis=(1, 2, 3,)"):
        assert AXES_123.search(text), text
    for text in ("axis=[1, 2]", "axis=(0, 1, 2, 3)", "axes = [1, 2, 3]"):
        assert not AXES_123.search(text), text


def test_no_new_hard_coded_2d_axes():
    grown = {f: n for f, n in axes_123_counts().items() if n > ALLOWED_AXES_123.get(f, 0)}
    assert not grown, ("`axis=[1, 2, 3]` written in dsal_tf/ (reduce over the space's spatial axes instead):\n"
                       + "\n".join(f"  {f}: {n} (allowed {ALLOWED_AXES_123.get(f, 0)})" for f, n in grown.items()))


def test_allowed_axes_counts_are_current():
    now = axes_123_counts()
    stale = {f: now.get(f, 0) for f, n in ALLOWED_AXES_123.items() if now.get(f, 0) < n}
    assert not stale, "fewer hard-coded axes now: lower (or at 0 delete) in ALLOWED_AXES_123:\n" + "\n".join(
        f"  {f}: {n}" for f, n in stale.items())
