"""Progress bars on stderr, silent when stderr is not a terminal or when asked to be quiet."""
from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")

_quiet = False


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


def enabled() -> bool:
    """Bars on an interactive stderr, or when a parent (the job runner) forwards ours to one."""
    return not _quiet and (sys.stderr.isatty() or os.environ.get("WEIGHTOPS_PROGRESS") == "1")


def bar(total: int | None = None, desc: str = "", unit: str = "B") -> tqdm:
    """A byte (default) or item counter that users see only on an interactive stderr."""
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B", unit_divisor=1024 if unit == "B" else 1000,
                disable=not enabled(), file=sys.stderr, leave=False, dynamic_ncols=True)


def iterate(items: Iterable[T], total: int | None = None, desc: str = "", unit: str = "tensor") -> Iterator[T]:
    with bar(total=total, desc=desc, unit=unit) as b:
        for item in items:
            yield item
            b.update(1)
