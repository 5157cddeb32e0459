"""Progress bars and a job step's live line on stderr, silent when stderr is not a terminal or
when asked to be quiet."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

from .errors import shown

T = TypeVar("T")

_quiet = False


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


def enabled() -> bool:
    """Bars on an interactive stderr only (a job step's child runs with -q: its stderr is a log)."""
    return not _quiet and sys.stderr.isatty()


def bar(total: int | None = None, desc: str = "", unit: str = "B") -> tqdm:
    """A byte (default) or item counter that users see only on an interactive stderr."""
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=unit == "B",
        unit_divisor=1024 if unit == "B" else 1000,
        disable=not enabled(),
        file=sys.stderr,
        leave=False,
        dynamic_ncols=True,
    )


def iterate(items: Iterable[T], total: int | None = None, desc: str = "", unit: str = "tensor") -> Iterator[T]:
    with bar(total=total, desc=desc, unit=unit) as b:
        for item in items:
            yield item
            b.update(1)


class Ticker:
    """`text` and the seconds since it started, redrawn every second on an interactive stderr
    and erased when done, so that the line written next takes its place."""

    def __init__(self, text: str):
        self.text, self.live = shown(text), enabled()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        start = time.monotonic()
        while True:
            sys.stderr.write(f"\r{self.text} {time.monotonic() - start:.0f}s\x1b[K")
            sys.stderr.flush()
            if self._done.wait(1.0):
                break

    def __enter__(self) -> Ticker:
        if self.live:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.live:
            self._done.set()
            self._thread.join()
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


def human_size(nbytes: float) -> str:
    """Bytes in decimal units, as the messages and the job screen show sizes."""
    for unit in ("B", "kB", "MB", "GB"):
        if nbytes < 1000 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    raise AssertionError("unreachable")
