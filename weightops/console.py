"""Other libraries' warnings in a weightops process: once each, on one line, in one format.

torch, transformers and bitsandbytes warn through both `warnings` and `logging`, often once
per call: bitsandbytes logs `MatMul8bitLt: inputs will be cast ...` on every int8 matmul (182
lines in one demo check). `install()` routes both through one filter that writes each distinct
message once; a message we know to matter is restated in our words (NOTES). A job step's child
(`child_env()`) writes each warning in its source's words, with its source line, into the step's
log;
the runner then restates the known ones once on its own screen (`notes_in`).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

from .errors import shown

_MODE = "WEIGHTOPS_WARNINGS"  # "log": warnings in their source's words, with source lines (a job step's log)


@dataclass(frozen=True)
class Note:
    """A third-party warning that matters to the user, and what we say about it instead."""

    pattern: re.Pattern[str]
    text: str  # str.format'ted with the pattern's groups


NOTES = (
    # The int8 check measures the model as users will serve it, cast included; fp16's range
    # (65504) is the one thing a user of a bf16-trained model may want to know about.
    Note(
        re.compile(r"MatMul8bitLt: inputs will be cast from (?:torch\.)?(\w+) to float16"),
        "bitsandbytes int8 layers compute in float16 (their {0} inputs are cast), as they will when served; "
        "the measured KLD includes it",
    ),
)


def notes_in(text: str) -> list[str]:
    """Our wording of each known warning in a log, once each, in order of appearance."""
    found = sorted((m.start(), note.text.format(*m.groups())) for note in NOTES for m in note.pattern.finditer(text))
    return list(dict.fromkeys(note for _, note in found))


def reword(message: str) -> str | None:
    return next(iter(notes_in(message)), None)


def child_env() -> dict[str, str]:
    """Environment of a job step's child: each warning in its source's words, for its log."""
    return {_MODE: "log"}


class _Once:
    """Writes each distinct (source, message) once to stderr."""

    def __init__(self, raw: bool):
        self.raw = raw
        self.seen: set[tuple[str, str]] = set()

    def emit(self, source: str, message: str, where: str) -> None:
        note = None if self.raw else reword(message)
        key = ("note", note) if note else (source, message)
        if key in self.seen:
            return
        self.seen.add(key)
        line = f"note: {note}" if note else f"warning ({source}): {message}" + (f" [{where}]" if self.raw else "")
        sys.stderr.write(shown(line) + "\n")
        sys.stderr.flush()


def _package(path: str) -> str:
    parts = Path(path).parts
    for marker in ("site-packages", "dist-packages"):
        if marker in parts and parts.index(marker) + 1 < len(parts):
            return parts[parts.index(marker) + 1].removesuffix(".py")
    return Path(path).stem


class _LogHandler(logging.Handler):
    def __init__(self, once: _Once):
        super().__init__(logging.WARNING)
        self.once = once

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 -- a library's malformed log call must not stop the command
            message = str(record.msg)
        self.once.emit(record.name.split(".")[0], message, f"{record.pathname}:{record.lineno}")


_installed: _Once | None = None


def install() -> None:
    """Route `warnings` and `logging` (records that reach the root logger, e.g. bitsandbytes')
    through the once-filter, and turn off huggingface_hub/transformers progress bars (ours are
    the ones users see). Call once, at process start, before those libraries are imported."""
    global _installed
    if _installed is not None:
        return
    _installed = once = _Once(raw=os.environ.get(_MODE) == "log")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        once.emit(_package(filename), f"{category.__name__}: {message}", f"{filename}:{lineno}")

    warnings.showwarning = show
    logging.getLogger().addHandler(_LogHandler(once))
