"""TencentPretrain <-> Hugging Face tensor streams, driven by the architecture tables.

Only names change, except where the architecture's spec names a transform: q/k rows (HF
rotate-half <-> TencentPretrain's interleaved pairs, per head; k with the key/value head count)
and a fused attention input (one HF `query_key_value` <-> three TencentPretrain linears).
Every input must be a known tensor and every expected output present: TencentPretrain loads
with strict=False, so a misnamed tensor would be skipped there without a word and the model
would run on random weights.

`hf_view` is the entry point for other commands: any checkpoint as an HF-named stream.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from functools import partial

import torch

from ..arch import ArchSpec, Hparams, Role, TensorSpec, Transform, check_config_shapes
from ..arch import get as get_arch
from ..arch.transforms import (
    fuse_qkv,
    permute_interleaved_to_rotary,
    permute_rotary_to_interleaved,
    rotary_heads,
    split_qkv,
)
from ..errors import WeightopsError
from ..stream import TensorRef, matches_any
from .checkpoint import Checkpoint, Format

_LISTED = 12  # names listed in an error before "... and N more"


def hf_view(ckpt: Checkpoint, tp_config: dict | None = None, arch: str | None = None) -> tuple[list[TensorRef], dict]:
    """Any checkpoint as HF-named lazy refs plus its HF config dict.

    HF checkpoints come back as they are (tensors and config.json unchanged). TencentPretrain
    checkpoints go through `tp_to_hf`, with the config translated from `tp_config` (default:
    the one `open_checkpoint` was given or found) and the tensor shapes. Nothing is loaded.
    """
    if ckpt.format.is_hf:
        return list(ckpt.tensors), dict(ckpt.config or {})
    if ckpt.format is not Format.TENCENTPRETRAIN:
        raise WeightopsError(f"{ckpt.path}: a {ckpt.format} checkpoint cannot be read as a Hugging Face model")
    spec = _spec(ckpt, arch)
    shapes = {r.name: r.shape for r in ckpt.tensors}
    try:
        fields = spec.tencentpretrain.hf_config_from(spec, tp_config if tp_config is not None else ckpt.config, shapes)
    except WeightopsError as e:
        raise WeightopsError(f"{ckpt.path}: {e}") from None
    emb = ckpt.tensor(spec.name_of(Role.EMBEDDING, "tp"))
    config = complete_hf_config({**fields, "dtype": str(emb.dtype).removeprefix("torch.")})
    refs = tp_to_hf(ckpt.tensors, spec, config)
    check_config_shapes(spec, config, refs, str(ckpt.config_file or f"the config of {ckpt.path}"))
    return refs, config


def tp_view(ckpt: Checkpoint, arch: str | None = None) -> tuple[list[TensorRef], dict]:
    """An HF checkpoint as TencentPretrain-named lazy refs plus its TP model config json."""
    if not ckpt.format.is_hf:
        raise WeightopsError(f"{ckpt.path}: is {ckpt.format}, not a Hugging Face checkpoint")
    if not ckpt.config:
        raise WeightopsError(f"{ckpt.path}: no config.json; its head counts and sizes are needed")
    spec = _spec(ckpt, arch)
    try:
        rules = spec.tencentpretrain
    except WeightopsError as e:
        raise WeightopsError(f"{ckpt.path}: {e}") from None
    config = complete_hf_config(ckpt.config)
    check_config_shapes(spec, config, ckpt.tensors, str(ckpt.config_file))
    try:
        tp_config = rules.config_from_hf(spec, config)
    except WeightopsError as e:
        raise WeightopsError(f"{ckpt.path}: {e}") from None
    return hf_to_tp(ckpt.tensors, spec, config), tp_config


def complete_hf_config(config: dict) -> dict:
    """A config dict with transformers' defaults filled in, as `save_pretrained` writes it."""
    from transformers import AutoConfig

    fields = {k: v for k, v in config.items() if k not in ("model_type", "transformers_version")}
    if "model_type" not in config:
        raise WeightopsError("the model config has no model_type")
    return json.loads(AutoConfig.for_model(config["model_type"], **fields).to_json_string())


def hf_to_tp(refs: Iterable[TensorRef], spec: ArchSpec | str, hparams: dict) -> list[TensorRef]:
    """HF-named refs -> TencentPretrain-named refs (lazy), in TencentPretrain's model order.

    `hparams` is the HF config dict (config.json). Old `rotary_emb.inv_freq` buffers are dropped;
    a tied output head is left out (the TP config gets tie_weights).
    """
    spec = get_arch(spec) if isinstance(spec, str) else spec
    hp = spec.config.hparams(complete_hf_config(hparams))
    drop = [p.replace("{n}", "*") for p in spec.droppable]
    kept = [r for r in refs if not matches_any(spec.normalize_hf(r.name), drop)]
    got = _validated(kept, spec, "hf", hp)
    out: list[tuple[tuple, TensorRef]] = []
    for name, ref in got.items():
        hit = spec.lookup(name, "hf")
        assert hit is not None  # _validated kept only the spec's names
        row, layer, _ = hit
        names = [n.format(n=layer) for n in row.names("tp")]
        for part, new in enumerate(_split(row, ref, names, hp)):
            out.append((_order(spec, row, layer, part), new))
    return [r for _, r in sorted(out, key=lambda x: x[0])]


def tp_to_hf(refs: Iterable[TensorRef], spec: ArchSpec | str, hparams: dict) -> list[TensorRef]:
    """TencentPretrain-named refs -> HF-named refs (lazy), in HF's model order.

    `hparams` is the HF config dict the output will carry. Three split attention linears
    of a layer become one fused tensor whose loading reads just those three.
    """
    spec = get_arch(spec) if isinstance(spec, str) else spec
    hp = spec.config.hparams(complete_hf_config(hparams))
    got = _validated(list(refs), spec, "tp", hp)
    groups: dict[tuple[TensorSpec, int | None], list[TensorRef]] = {}
    for name, ref in got.items():
        hit = spec.lookup(name, "tp")
        assert hit is not None  # _validated kept only the spec's names
        row, layer, pos = hit
        groups.setdefault((row, layer), [ref] * len(row.names("tp")))[pos] = ref  # placeholders: none is missing
    out = [
        (_order(spec, row, layer, 0), _join(row, row.hf.format(n=layer), parts, hp))
        for (row, layer), parts in groups.items()
    ]
    return [r for _, r in sorted(out, key=lambda x: x[0])]


def _spec(ckpt: Checkpoint, name: str | None) -> ArchSpec:
    name = name or ckpt.architecture
    if name is None:
        raise WeightopsError(f"{ckpt.path}: cannot tell the architecture from its tensor names; pass --arch")
    return get_arch(name)  # an unknown name is an error naming the supported ones


def _validated(refs: list[TensorRef], table: ArchSpec, scheme: str, hp: Hparams) -> dict[str, TensorRef]:
    """name -> ref, after refusing unknown and missing tensors. A tied output head that the
    checkpoint repeats (TencentPretrain's tie_weights state dict) is checked equal to the
    embedding when loaded and then dropped."""
    got = {(table.normalize_hf(r.name) if scheme == "hf" else r.name): r for r in refs}
    tied_head = got.pop(table.name_of(Role.OUTPUT, scheme), None) if hp.tied else None
    expected = table.expected(scheme, hp.layers, tied=hp.tied)
    wanted = set(expected)
    unknown = [f"{n} ({r.source})" for n, r in got.items() if n not in wanted]
    missing = [n for n in expected if n not in got]
    if unknown or missing:
        sources = sorted({r.source for r in refs})
        parts = [f"{len(unknown)} unknown tensor(s): {_listing(unknown)}"] if unknown else []
        parts += [f"{len(missing)} missing tensor(s): {_listing(missing)}"] if missing else []
        raise WeightopsError(
            f"{', '.join(sources)}: not a complete {table.name} checkpoint with {hp.layers} layers "
            f"({scheme} names): " + "; ".join(parts)
        )
    if tied_head is not None:
        emb = table.name_of(Role.EMBEDDING, scheme)
        got[emb] = _checked_tie(got[emb], tied_head)
    return got


def _listing(names: list[str]) -> str:
    more = len(names) - _LISTED
    return ", ".join(names[:_LISTED]) + (f" ... and {more} more" if more > 0 else "")


def _checked_tie(emb: TensorRef, head: TensorRef) -> TensorRef:
    if head.shape != emb.shape:
        raise WeightopsError(
            f"{head.source}: tied output head {head.name!r} has shape {head.shape}, the embedding "
            f"{emb.name!r} {emb.shape}"
        )

    def check(t: torch.Tensor) -> torch.Tensor:
        if not torch.equal(t, head.load()):
            raise WeightopsError(
                f"{head.source}: the config ties the output head to the embedding, but "
                f"{head.name!r} differs from {emb.name!r}; converting would lose it "
                "(set tie_weights / tie_word_embeddings to false)"
            )
        return t

    return emb.derive(check)


def _qkv_part(t: torch.Tensor, *, heads: int, index: int) -> torch.Tensor:
    return split_qkv(t, heads)[index]


def _split(row: TensorSpec, ref: TensorRef, names: list[str], hp: Hparams) -> list[TensorRef]:
    """One HF tensor -> its TencentPretrain tensor(s) (shapes checked against the config
    beforehand, by `arch.check_config_shapes`)."""
    if row.to_tp in (Transform.ROTARY_Q, Transform.ROTARY_K):
        heads = rotary_heads(row.to_tp, hp)
        return [ref.derive(lambda t: permute_rotary_to_interleaved(t, heads), name=names[0])]
    if row.to_tp is Transform.QKV_SPLIT:
        shape = (ref.shape[0] // 3, *ref.shape[1:])
        return [
            ref.derive(partial(_qkv_part, heads=hp.heads, index=i), name=n, shape=shape) for i, n in enumerate(names)
        ]
    return [ref.renamed(names[0])]


def _join(row: TensorSpec, name: str, parts: list[TensorRef], hp: Hparams) -> TensorRef:
    """The TencentPretrain tensor(s) of one row -> its HF tensor."""
    first = parts[0]
    if row.to_tp in (Transform.ROTARY_Q, Transform.ROTARY_K):
        heads = rotary_heads(row.to_tp, hp)
        return first.derive(lambda t: permute_interleaved_to_rotary(t, heads), name=name)
    if row.to_tp is Transform.QKV_SPLIT:
        for p in parts:
            if (p.shape, p.dtype) != (first.shape, first.dtype):
                raise WeightopsError(
                    f"{p.source}: {p.name!r} is {p.dtype} {p.shape}, {first.name!r} "
                    f"{first.dtype} {first.shape}; q, k and v must match to be fused"
                )

        def load() -> torch.Tensor:
            q, k, v = (p.load() for p in parts)
            return fuse_qkv(q, k, v, hp.heads)

        def release() -> None:
            for p in parts:
                p.release()

        return TensorRef(
            name, (3 * first.shape[0], *first.shape[1:]), first.dtype_name, first.source, loader=load, releaser=release
        )
    return first.renamed(name)


def _order(table: ArchSpec, row: TensorSpec, layer: int | None, part: int) -> tuple:
    """Model order: tensors before the layers, layer by layer in table order, then the rest."""
    index = table.tensors.index(row)
    if layer is not None:
        return (1, layer, index, part)
    first_layer_row = next(i for i, r in enumerate(table.tensors) if r.in_layer)
    return (0 if index < first_layer_row else 2, 0, index, part)
