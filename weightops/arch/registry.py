"""model_type -> ArchSpec. Adding an architecture is adding its spec (and, for a variant that
is tensor for tensor another one, one `register_alias` line)."""

from __future__ import annotations

import dataclasses
from typing import Any

from ..errors import WeightopsError
from .spec import ArchSpec

_SPECS: dict[str, ArchSpec] = {}


def register(spec: ArchSpec) -> ArchSpec:
    if spec.name in _SPECS:
        raise ValueError(f"architecture {spec.name!r} is registered twice")
    _SPECS[spec.name] = spec
    return spec


def register_alias(name: str, of: str, **differences: Any) -> ArchSpec:
    """`name` is `of` with these fields changed (e.g. its HF class)."""
    return register(dataclasses.replace(_SPECS[of], name=name, alias_of=of, **differences))


def supported(*, tencentpretrain: bool = False) -> list[str]:
    """Every registered model_type, in registration order (only those TencentPretrain can
    compute, with `tencentpretrain`)."""
    return [n for n, s in _SPECS.items() if s.tp is not None or not tencentpretrain]


def get(model_type: str | None) -> ArchSpec:
    """The spec of an HF model_type (or GGUF architecture name); an unknown one is an error
    listing the supported ones."""
    if model_type in _SPECS:
        return _SPECS[model_type]
    for spec in _SPECS.values():  # a GGUF file's general.architecture
        if spec.alias_of is None and spec.gguf_name == model_type:
            return spec
    raise WeightopsError(f"unknown architecture {model_type!r}; supported: {', '.join(_SPECS)}")


def is_supported(model_type: str | None) -> bool:
    try:
        get(model_type)
    except WeightopsError:
        return False
    return True


def detect(names: set[str], scheme: str) -> ArchSpec | None:
    """The architecture whose tensors account for the most of these names (aliases share
    their original's names, so the original answers)."""
    best, score = None, 0
    for spec in _SPECS.values():
        if spec.alias_of is not None:
            continue
        s = sum(1 for n in names if spec.lookup(n, scheme))
        if s > score:
            best, score = spec, s
    return best
