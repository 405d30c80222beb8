"""Atomic writes: every artifact of a run appears whole or not at all (temporary file + rename).

A round counts as complete only once its `DONE` marker exists, and `DONE` is written last, so a
run killed at any moment (SIGKILL, power loss, a full disk) resumes from intact files.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> None:
    """Call `write(tmp)` on a temporary sibling of `path` (same suffix), then rename it over `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))
