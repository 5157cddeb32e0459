"""Per-architecture knowledge: one table of tensor names in every naming scheme (HF,
TencentPretrain, GGUF), read in both directions, plus the few row reorderings between them."""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property

from ..errors import WeightopsError

SCHEMES = ("hf", "tp", "gguf")


@dataclass(frozen=True)
class Row:
    """One tensor (or, for BLOOM's fused QKV on the TP side, a group) in every scheme.

    `{n}` stands for the layer index. `kind` says how values change between schemes:
    `plain` (rename only), `rotary_q`/`rotary_k` (rows permuted between HF's rotate-half
    and the interleaved order of TencentPretrain and GGUF), `fused_qkv` (BLOOM).
    `tp` may hold several names: the HF tensor is split into them, in that order.
    """

    hf: str
    tp: tuple[str, ...]
    gguf: str
    kind: str = "plain"

    def names(self, scheme: str) -> tuple[str, ...]:
        return self.tp if scheme == "tp" else (getattr(self, scheme),)


def _regex(pattern: str) -> re.Pattern:
    return re.compile(re.escape(pattern).replace(r"\{n\}", r"(\d+)") + r"\Z")


@dataclass(frozen=True)
class Architecture:
    name: str
    rows: tuple[Row, ...]
    hf_prefix: str = ""  # HF checkpoints may omit it (BLOOM's `transformer.`)

    @cached_property
    def _patterns(self) -> dict[str, list[tuple[re.Pattern, Row, int]]]:
        out: dict[str, list] = {s: [] for s in SCHEMES}
        for row in self.rows:
            for scheme in SCHEMES:
                for i, name in enumerate(row.names(scheme)):
                    out[scheme].append((_regex(name), row, i))
        return out

    def normalize_hf(self, name: str) -> str:
        """The table's spelling of an HF name (adds an omitted `hf_prefix`)."""
        if self.hf_prefix and not name.startswith(self.hf_prefix) and not name.startswith("lm_head"):
            return self.hf_prefix + name
        return name

    def lookup(self, name: str, scheme: str) -> tuple[Row, int | None, int] | None:
        """(row, layer, position among the row's names) for a tensor name, or None."""
        if scheme == "hf":
            name = self.normalize_hf(name)
        for rx, row, pos in self._patterns[scheme]:
            m = rx.match(name)
            if m:
                return row, int(m.group(1)) if m.groups() else None, pos
        return None

    def expected(self, scheme: str, layers: int, *, tied: bool = False) -> list[str]:
        """Every tensor name a complete checkpoint has in `scheme`, in model order."""
        names = []
        for row in self.rows:
            if tied and row.hf == "lm_head.weight":
                continue
            for pat in row.names(scheme):
                names += [pat.format(n=i) for i in range(layers)] if "{n}" in pat else [pat]
        return names

    def is_recognised(self, names: set[str], scheme: str) -> bool:
        return any(self.lookup(n, scheme) for n in names)


def permute_rotary_to_interleaved(w, heads: int):
    """HF rotate-half row order -> interleaved pairs (TencentPretrain, Meta, GGUF)."""
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def permute_interleaved_to_rotary(w, heads: int):
    """Inverse of `permute_rotary_to_interleaved`."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def get(name: str) -> Architecture:
    from . import bloom, llama
    table = {"llama": llama.ARCH, "bloom": bloom.ARCH}
    if name not in table:
        raise WeightopsError(f"unknown architecture {name!r}; supported: {', '.join(table)}")
    return table[name]


def detect(names: set[str], scheme: str) -> Architecture | None:
    """The architecture whose table recognises the most of these tensor names."""
    from . import bloom, llama
    best, score = None, 0
    for arch in (llama.ARCH, bloom.ARCH):
        s = sum(1 for n in names if arch.lookup(n, scheme))
        if s > score:
            best, score = arch, s
    return best
