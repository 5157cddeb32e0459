"""The declarative record of one architecture: every tensor in every naming scheme (HF,
TencentPretrain, GGUF) with its role and the value transform each target needs, plus the
config rules, tokenizer defaults and GGUF architecture. Operators and formats ask a spec by
role; they never name a concrete architecture. GGUF names come from gguf-py's tables, so
they are llama.cpp's own spelling; gguf-py is imported only when a GGUF name is asked for
(inspect and manifest never import it)."""

from __future__ import annotations

import enum
import functools
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple

from ..errors import WeightopsError

SCHEMES = ("hf", "tp", "gguf")


class Role(enum.Enum):
    """What a tensor is, whatever it is called; the value names llama.cpp's tensor kind (gguf.MODEL_TENSOR)."""

    EMBEDDING = "TOKEN_EMBD"
    EMBEDDING_NORM = "TOKEN_EMBD_NORM"
    ATTN_NORM = "ATTN_NORM"
    ATTN_Q = "ATTN_Q"
    ATTN_K = "ATTN_K"
    ATTN_V = "ATTN_V"
    ATTN_QKV = "ATTN_QKV"
    ATTN_OUT = "ATTN_OUT"
    FFN_NORM = "FFN_NORM"
    FFN_GATE = "FFN_GATE"
    FFN_UP = "FFN_UP"
    FFN_DOWN = "FFN_DOWN"
    OUTPUT_NORM = "OUTPUT_NORM"
    OUTPUT = "OUTPUT"


VOCAB_ROLES = (Role.EMBEDDING, Role.OUTPUT)  # tensors whose rows are indexed by token id


class Transform(enum.Enum):
    """How values change from HF to a target (the inverse is applied coming back).

    ROTARY_Q / ROTARY_K: rows from HF's rotate-half order to interleaved pairs, per head
    (k with the key/value head count). QKV_SPLIT: a fused per-head [q|k|v] tensor split into
    q, k and v (TencentPretrain: three tensors; GGUF: concatenated back into one)."""

    NONE = "none"
    ROTARY_Q = "rotary_q"
    ROTARY_K = "rotary_k"
    QKV_SPLIT = "qkv_split"


@dataclass(frozen=True)
class TensorSpec:
    """One tensor in every scheme; `{n}` stands for the layer index. `tp` may hold several
    names (the HF tensor is split into them, in that order); None where the scheme has no
    such tensor (`gguf`: llama.cpp does not store it; `tp`: TencentPretrain cannot compute
    the architecture)."""

    role: Role
    part: str  # "weight" or "bias"
    hf: str
    tp: tuple[str, ...] | None
    in_gguf: bool = True
    to_gguf: Transform = Transform.NONE
    to_tp: Transform = Transform.NONE

    @property
    def gguf(self) -> str | None:
        return gguf_name(self.role, self.part) if self.in_gguf else None

    def names(self, scheme: str) -> tuple[str, ...]:
        if scheme == "tp":
            return self.tp or ()
        if scheme == "gguf":
            return (self.gguf,) if self.gguf else ()
        return (self.hf,)

    @property
    def in_layer(self) -> bool:
        return "{n}" in self.hf


@functools.cache
def gguf_name(role: Role, part: str = "weight") -> str:
    """llama.cpp's name of `role` (gguf-py's TENSOR_NAMES), with `{n}` for the block index."""
    import gguf

    return gguf.TENSOR_NAMES[gguf.MODEL_TENSOR[role.value]].format(bid="{n}") + "." + part


def tensor(
    role: Role,
    hf: str,
    tp: str | tuple[str, ...] | None,
    part: str = "weight",
    *,
    to_gguf: Transform = Transform.NONE,
    to_tp: Transform = Transform.NONE,
    in_gguf: bool = True,
) -> TensorSpec:
    """A TensorSpec whose GGUF name is taken from gguf-py."""
    tps = (tp,) if isinstance(tp, str) else tp
    return TensorSpec(role, part, hf, tps, in_gguf, to_gguf, to_tp)


class Hparams(NamedTuple):
    """What the tensor operators need to know of a model: the sizes its config decides."""

    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool


# (layers, HF name pattern -> (shape, the config keys deciding it), problems of the config itself);
# None in a shape stands for the vocabulary size
Shapes = tuple[int, dict[str, tuple[tuple[int | None, ...], str]], list[str]]


@dataclass(frozen=True)
class ConfigRules:
    """How an HF config dict becomes sizes, GGUF metadata and checks."""

    hparams: Callable[[dict], Hparams]  # of a complete config dict
    hf_shapes: Callable[[dict], Shapes]  # for arch.check_config_shapes
    fill_gguf: Callable[[dict], dict]  # defaults an older config.json lacks
    gguf_keys: tuple[str, ...]  # complete when all present (else AutoConfig)
    add_gguf_parameters: Callable[[Any, dict, int], None]  # (writer, filled config, file type)
    sliding_window: Callable[[dict], int | None] = lambda config: None  # attention window, if any


@dataclass(frozen=True)
class TPRules:
    """TencentPretrain model config <-> HF config (`convert`); absent when TencentPretrain
    cannot compute the architecture."""

    config_from_hf: Callable[[ArchSpec, dict], dict]
    hf_config_from: Callable[[ArchSpec, dict | None, dict[str, tuple[int, ...]]], dict]


@dataclass(frozen=True)
class GGUFVocab:
    """How llama.cpp's converter writes this architecture's tokenizer."""

    encodings: tuple[str, ...]  # tried in this order: sentencepiece, llama-hf, gpt2
    default_pre: str  # tokenizer.ggml.pre for a BPE tokenizer llama.cpp does not recognise
    add_space_prefix: bool  # tokenizer_config.json's add_prefix_space -> tokenizer.ggml.add_space_prefix
    # (writer, tokenizer directory, config): keys the converter's model class adds after the vocabulary
    quirks: Callable[[Any, Path, dict], None] = lambda writer, directory, config: None


def _regex(pattern: str) -> re.Pattern:
    return re.compile(re.escape(pattern).replace(r"\{n\}", r"(\d+)") + r"\Z")


@dataclass(frozen=True)
class ArchSpec:
    """One architecture (an HF model_type), declared once."""

    name: str  # HF model_type
    hf_class: str  # config.json `architectures`
    gguf_arch: str  # gguf.MODEL_ARCH member name
    tensors: tuple[TensorSpec, ...]
    config: ConfigRules
    vocab: GGUFVocab
    tp: TPRules | None = None
    hf_prefix: str = ""  # HF checkpoints may omit it (BLOOM's `transformer.`)
    droppable: tuple[str, ...] = ()  # HF buffers old transformers saved and new ones recompute
    alias_of: str | None = None
    hf_fields: dict = field(default_factory=dict)  # extra HF config fields of a converted checkpoint

    def __hash__(self) -> int:
        return hash(self.name)

    @property
    def gguf_name(self) -> str:
        """general.architecture of the GGUF file."""
        import gguf

        return gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[self.gguf_arch]]

    def gguf_problems(self) -> list[str]:
        """Roles llama.cpp's architecture has no tensor for (a spec's own consistency check)."""
        import gguf

        known = gguf.MODEL_TENSORS[gguf.MODEL_ARCH[self.gguf_arch]]
        return [t.role.name for t in self.tensors if t.in_gguf and gguf.MODEL_TENSOR[t.role.value] not in known]

    @property
    def tencentpretrain(self) -> TPRules:
        """The TencentPretrain rules, or a clear refusal."""
        if self.tp is None:
            from .registry import supported

            raise WeightopsError(
                f"TencentPretrain cannot compute {self.name} models (it has no such architecture); "
                f"TencentPretrain conversion supports {', '.join(supported(tencentpretrain=True))}"
            )
        return self.tp

    def tensor(self, role: Role, part: str = "weight") -> TensorSpec | None:
        return next((t for t in self.tensors if t.role is role and t.part == part), None)

    def role(self, name: str, scheme: str) -> Role | None:
        hit = self.lookup(name, scheme)
        return hit[0].role if hit else None

    @cached_property
    def _pattern_cache(self) -> dict[str, list[tuple[re.Pattern, TensorSpec, int]]]:
        return {}

    def _patterns(self, scheme: str) -> list[tuple[re.Pattern, TensorSpec, int]]:
        """(regex, tensor, position) of every name in `scheme`, built on first use."""
        if scheme not in self._pattern_cache:
            self._pattern_cache[scheme] = [
                (_regex(name), t, i) for t in self.tensors for i, name in enumerate(t.names(scheme))
            ]
        return self._pattern_cache[scheme]

    def normalize_hf(self, name: str) -> str:
        """The spec's spelling of an HF name (adds an omitted `hf_prefix`)."""
        if self.hf_prefix and not name.startswith(self.hf_prefix) and self._match(name, "hf") is None:
            return self.hf_prefix + name
        return name

    def lookup(self, name: str, scheme: str) -> tuple[TensorSpec, int | None, int] | None:
        """(tensor, layer, position among its names) for a tensor name, or None."""
        return self._match(self.normalize_hf(name) if scheme == "hf" else name, scheme)

    def _match(self, name: str, scheme: str) -> tuple[TensorSpec, int | None, int] | None:
        for rx, t, pos in self._patterns(scheme):
            m = rx.match(name)
            if m:
                return t, int(m.group(1)) if m.groups() else None, pos
        return None

    def expected(self, scheme: str, layers: int, *, tied: bool = False) -> list[str]:
        """Every tensor name a complete checkpoint has in `scheme`, in model order."""
        names = []
        for t in self.tensors:
            if tied and t.role is Role.OUTPUT:
                continue
            for pat in t.names(scheme):
                names += [pat.format(n=i) for i in range(layers)] if "{n}" in pat else [pat]
        return names

    def rename(self, name: str, src: str, dst: str) -> tuple[str, ...]:
        """The name(s) in scheme `dst` of tensor `name` of scheme `src` (several for a split one)."""
        hit = self.lookup(name, src)
        if hit is None:
            raise WeightopsError(f"{name!r} is not a {self.name} tensor name in the {src} scheme")
        t, layer, _ = hit
        return tuple(n.format(n=layer) for n in t.names(dst))

    def name_of(self, role: Role, scheme: str, layer: int = 0) -> str:
        """The (first) name of `role`'s weight in `scheme`."""
        t = self.tensor(role)
        if t is None or not t.names(scheme):
            raise WeightopsError(f"{self.name} has no {role.name.lower()} tensor in the {scheme} scheme")
        return t.names(scheme)[0].format(n=layer)

    def layer_count(self, names: Iterable[str], scheme: str) -> int:
        """Highest layer index named + 1 (0 when no name belongs to a layer)."""
        layers = [hit[1] for n in names if (hit := self.lookup(n, scheme)) and hit[1] is not None]
        return max(layers) + 1 if layers else 0
