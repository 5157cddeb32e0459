"""Per-architecture knowledge: one table of tensor names in every naming scheme (HF,
TencentPretrain, GGUF), read in both directions, plus the few row reorderings between them."""
from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, NamedTuple

from ..errors import WeightopsError

if TYPE_CHECKING:
    from ..stream import TensorRef

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

    def rename(self, name: str, src: str, dst: str) -> tuple[str, ...]:
        """The name(s) in scheme `dst` of tensor `name` of scheme `src` (several for a split row)."""
        hit = self.lookup(name, src)
        if hit is None:
            raise WeightopsError(f"{name!r} is not a {self.name} tensor name in the {src} scheme")
        row, layer, _ = hit
        return tuple(n.format(n=layer) for n in row.names(dst))

    def layer_count(self, names: Iterable[str], scheme: str) -> int:
        """Highest layer index named + 1 (0 when no name belongs to a layer)."""
        layers = [hit[1] for n in names if (hit := self.lookup(n, scheme)) and hit[1] is not None]
        return max(layers) + 1 if layers else 0


class Hparams(NamedTuple):
    """What the tensor operators need to know of a model: the sizes its config decides."""

    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool


def permute_rotary_to_interleaved(w, heads: int):
    """HF rotate-half row order -> interleaved pairs (TencentPretrain, Meta, GGUF)."""
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def permute_interleaved_to_rotary(w, heads: int):
    """Inverse of `permute_rotary_to_interleaved`."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def module(name: str):
    """The module of architecture `name`: its table, config translations and GGUF keys."""
    from . import bloom, llama
    modules = {"llama": llama, "bloom": bloom}
    if name not in modules:
        raise WeightopsError(f"unknown architecture {name!r}; supported: {', '.join(modules)}")
    return modules[name]


def get(name: str) -> Architecture:
    return module(name).ARCH


def tp_shape(shapes: dict[str, tuple[int, ...]], name: str) -> tuple[int, ...]:
    """The shape of a tensor that sizes are read from (a clear error when it is missing)."""
    if name not in shapes:
        raise WeightopsError(f"tensor {name!r} is missing: the model's sizes cannot be read without it")
    return shapes[name]


def tp_size(tp: dict, key: str, found: int, tensor: str) -> int:
    """A size read from `tensor`'s shape, checked against TencentPretrain model config `tp`."""
    if key in tp and tp[key] != found:
        raise WeightopsError(f"the TencentPretrain config says {key}={tp[key]}, but tensor {tensor!r} "
                             f"gives {found}: wrong --tp-config for this checkpoint?")
    return found


def tp_heads(tp: dict) -> int:
    """The attention head count, which no tensor shape tells."""
    if "heads_num" not in tp:
        raise WeightopsError("the number of attention heads cannot be read from tensor shapes: pass --tp-config "
                             "FILE, the TencentPretrain model config json (heads_num, and local_kv_heads_num for "
                             "grouped-query attention), e.g. models/llama/7b_config.json")
    return int(tp["heads_num"])


_LISTED = 12  # problems listed before "... and N more"


def check_config_shapes(name: str, config: dict, refs: Iterable[TensorRef], config_file: str) -> None:
    """Refuse a config that contradicts the tensors it describes (HF names and a config dict
    with the architecture's defaults filled in): head counts x head size vs q/k/v rows,
    hidden and intermediate sizes vs every matrix, the layer count vs the layers present.
    Every command that takes sizes from the config (gguf, convert, bnb) calls this before
    writing: llama.cpp or transformers would otherwise fail to load — or silently misread —
    the output."""
    table, mod = get(name), module(name)
    refs = list(refs)
    try:
        layers, shapes, problems = mod.hf_shapes(config)
    except KeyError as e:
        raise WeightopsError(f"{config_file}: has no {e.args[0]}, which the tensor shapes are checked against") \
            from None
    present = table.layer_count((r.name for r in refs), "hf")
    if present != layers:
        problems.append(f"{config_file} gives {layers} layers, but the tensors have {present} "
                        f"(layer indices 0..{present - 1})")
    for ref in refs:
        hit = table.lookup(ref.name, "hf")
        if hit is None or hit[0].hf not in shapes:
            continue  # unknown tensors are each command's own business (some pass them through)
        want, why = shapes[hit[0].hf]
        if len(want) != len(ref.shape) or any(w is not None and w != s for w, s in zip(want, ref.shape, strict=True)):
            shown = "(" + ", ".join("any" if w is None else str(w) for w in want) + ")"
            problems.append(f"tensor {ref.name!r} ({ref.source}) has shape {ref.shape}; {config_file} gives "
                            f"{shown} from {why}")
    if problems:
        more = len(problems) - _LISTED
        raise WeightopsError(f"{config_file} contradicts the tensors:\n  " + "\n  ".join(problems[:_LISTED])
                             + (f"\n  ... and {more} more" if more > 0 else ""))


def detect(names: set[str], scheme: str) -> Architecture | None:
    """The architecture whose table recognises the most of these tensor names."""
    from . import bloom, llama
    best, score = None, 0
    for arch in (llama.ARCH, bloom.ARCH):
        s = sum(1 for n in names if arch.lookup(n, scheme))
        if s > score:
            best, score = arch, s
    return best
