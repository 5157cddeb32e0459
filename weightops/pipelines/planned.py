"""Exports that are a plan and its writing: `export_x = written(plan_x, ...)` gives the export
the plan function's parameters, so the one parameter list (and its defaults) is written once.

Why plans exist at all: the fused release pass (`pipelines.fused`) plans every output of a
shared read first, then writes them together; a single export is that plan written at once.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import ParamSpec, Protocol, TypeVar

P = ParamSpec("P")
R_co = TypeVar("R_co", covariant=True)


class Plan(Protocol[R_co]):
    """A planned output: everything checked and laid out; `write` produces it."""

    def write(self) -> R_co: ...


def written(plan: Callable[P, Plan[R_co]], *, name: str, returns: str, doc: str) -> Callable[P, R_co]:
    """The function `name` that calls `plan` with its arguments and writes the result: same
    parameters (mypy checks calls against them; `help()` and `inspect.signature` show them),
    `returns` as its return annotation, `doc` as its docstring."""

    def export(*args: P.args, **kwargs: P.kwargs) -> R_co:
        return plan(*args, **kwargs).write()

    export.__name__ = export.__qualname__ = name
    export.__module__ = plan.__module__
    export.__doc__ = doc
    export.__signature__ = inspect.signature(plan).replace(return_annotation=returns)  # type: ignore[attr-defined]
    return export
