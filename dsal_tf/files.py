"""Atomic writes: every artifact of a run appears whole or not at all (temporary file + rename).

A round counts as complete only once its `DONE` marker exists, and `DONE` is written last, so a
run killed at any moment (SIGKILL, power loss, a full disk) resumes from intact files.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Fill the yielded temporary sibling folder, then it replaces `path` whole (the old one is removed).

    The temporary folder has a fixed name (`<name>.tmp`), so one left by a killed process is cleared
    by the next attempt instead of piling up. On an error nothing of it is kept and `path` is unchanged."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
