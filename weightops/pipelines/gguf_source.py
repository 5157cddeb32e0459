"""The source side of a GGUF export, shared by every output of a matrix: the checkpoint as
GGUF-named tensors holding llama.cpp's values in llama.cpp's model order, the config dict the
metadata needs, the general.* keys and the tokenizer's keys (read once)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import gguf

from .. import arch
from ..arch import ArchSpec, Role
from ..arch.transforms import to_gguf
from ..errors import WeightopsError, shown
from ..io.checkpoint import Checkpoint, Format
from ..io.gguf_tokenizer import TokenizerSummary, add_tokenizer
from ..stream import TensorRef, matches_any


@dataclass
class Source:
    """What every output of a matrix shares: the checkpoint and its GGUF stream, read once."""

    ckpt: Checkpoint
    spec: ArchSpec
    refs: list[TensorRef]
    config: dict
    config_vocab: int | None
    n_vocab: int
    embedding: str
    tok_dir: Path


def open_source(
    ckpt: Checkpoint,
    tokenizer: str | Path | None,
    lora: Sequence[str | Path],
    lora_options: dict | None,
    note: Callable[[str], None],
) -> Source:
    hf_refs, config = hf_stream(ckpt)
    if lora:
        from .merge_lora import lora_stage

        hf_refs, merged = lora_stage(hf_refs, config, lora, base=ckpt.path, **(lora_options or {}))
        config.update(merged.config_update)
        head = arch.get(config["model_type"]).tensor(Role.OUTPUT)
        if merged.untied and (head is None or head.gguf is None):
            raise WeightopsError(f"the adapters untie the output head; llama.cpp's {config['model_type']} has none")
        tokenizer = tokenizer or merged.tokenizer
        for w in merged.warnings:
            note(w)
    spec, refs = gguf_stream(hf_refs, config, ckpt.path)
    embedding = spec.name_of(Role.EMBEDDING, "gguf")  # present: gguf_stream checks
    n_vocab = next(r for r in refs if r.name == embedding).shape[0]
    window = spec.config.sliding_window(config)
    if window is not None and window < config["max_position_embeddings"]:
        note(
            f"{spec.name} attends to the last {window} positions only (sliding_window); llama.cpp's "
            f"{spec.gguf_name} attends to all of them (convert_hf_to_gguf.py writes the same file), so its outputs "
            f"differ from transformers' beyond {window} tokens"
        )
    config_vocab = config.get("vocab_size")
    if config_vocab != n_vocab:
        note(
            f"config vocab_size is {config_vocab} but the embedding has {n_vocab} rows; "
            f"writing {n_vocab} (llama.cpp needs one token per embedding row)"
        )
        config["vocab_size"] = n_vocab
    tok_dir = Path(tokenizer) if tokenizer else ckpt.directory
    tok_dir = tok_dir if tok_dir.is_dir() else tok_dir.parent
    return Source(ckpt, spec, refs, config, config_vocab, n_vocab, embedding, tok_dir)


def hf_stream(ckpt: Checkpoint) -> tuple[list[TensorRef], dict]:
    """HF-named tensors and a config dict with every key the GGUF metadata needs (transformers'
    defaults for missing ones, as convert_hf_to_gguf.py's AutoConfig gives) of any checkpoint;
    TencentPretrain goes through the remap view (config from its --tp-config and the shapes)."""
    if ckpt.format is Format.GGUF:
        raise WeightopsError(f"{ckpt.path} is already a GGUF file; export from the HF or TencentPretrain checkpoint")
    from ..io.remap import hf_view

    refs, config = hf_view(ckpt)
    if not config:
        raise WeightopsError(f"{ckpt.path}: no config.json next to the weights; GGUF needs the hyper-parameters")
    model_type = config.get("model_type") or ckpt.architecture
    try:
        spec = arch.get(model_type)
    except WeightopsError as e:
        raise WeightopsError(f"{ckpt.path}: cannot be exported to GGUF: {e}") from None
    filled = spec.config.fill_gguf(config)
    if all(k in filled for k in spec.config.gguf_keys):
        filled = {**filled, "model_type": model_type}  # complete: skip transformers' slow import
    else:
        from transformers import AutoConfig

        filled = AutoConfig.for_model(spec.name, **{k: v for k, v in config.items() if k != "model_type"}).to_dict()
    arch.check_config_shapes(spec, filled, refs, str(ckpt.config_file or ckpt.path))
    return list(refs), filled


def gguf_stream(refs: Iterable[TensorRef], config: dict, source: Path) -> tuple[ArchSpec, list[TensorRef]]:
    """HF tensors renamed to GGUF names (from the architecture's spec) with llama.cpp's values,
    in llama.cpp's model order (embedding, blocks, output norm, output). Tensors llama.cpp does
    not store (old rotary buffers, a tied output head it reads from the embedding) are left out."""
    spec = arch.get(config["model_type"])
    hp = spec.config.hparams(config)
    skip = [p.replace("{n}", "*") for p in spec.droppable]
    order = {n: i for i, n in enumerate(model_order(spec, hp.layers))}
    out, unknown = [], []
    for ref in refs:
        if matches_any(spec.normalize_hf(ref.name), skip):
            continue
        found = spec.lookup(ref.name, "hf")
        if found is None:
            unknown.append(ref.name)
            continue
        row, layer, _ = found
        if row.gguf is None:
            continue
        gname = row.gguf.format(n=layer)
        out.append(
            ref.derive(partial(to_gguf, row.to_gguf, hp=hp), name=gname)
            if row.to_gguf is not arch.Transform.NONE
            else ref.renamed(gname)
        )
    if unknown:
        raise WeightopsError(
            f"{source}: tensors with no GGUF name in the {spec.name} table: "
            f"{', '.join(shown(n) for n in sorted(unknown))}"
        )
    output = spec.tensor(Role.OUTPUT)
    optional = output.gguf if output else None  # llama.cpp reads the embedding when it is absent (tied)
    missing = [n for n in order if n not in {r.name for r in out} and n != optional]
    if missing:
        raise WeightopsError(
            f"{source}: checkpoint lacks tensors llama.cpp needs: {', '.join(missing[:8])}"
            + (" ..." if len(missing) > 8 else "")
        )
    out.sort(key=lambda r: order.get(r.name, len(order)))
    return spec, out


def model_order(spec: ArchSpec, layers: int) -> list[str]:
    """GGUF names layer by layer: tensors before the blocks, each block's tensors, tensors after."""
    rows = [(t.gguf, t.in_layer) for t in spec.tensors if t.gguf is not None]
    first = next(i for i, (_, layered) in enumerate(rows) if layered)
    head = [g for g, _ in rows[:first]]
    body = [g for g, layered in rows if layered]
    tail = [g for g, layered in rows[first:] if not layered]
    return head + [g.format(n=i) for i in range(layers) for g in body] + tail


def tokenizer_kv(
    source: Source, pre_tokenizer: str | None, note: Callable[[str], None]
) -> tuple[dict, TokenizerSummary]:
    """The tokenizer's keys (convert_hf_to_gguf.py's, with the architecture's quirks), read once
    for every output: entries each output's writer takes in this order."""
    scratch = gguf.GGUFWriter(None, source.spec.gguf_name)
    before = set(scratch.kv_data[0])
    summary = add_tokenizer(
        scratch,
        source.tok_dir,
        n_vocab=source.n_vocab,
        encodings=source.spec.vocab.encodings,
        default_pre=source.spec.vocab.default_pre,
        add_space_prefix=source.spec.vocab.add_space_prefix,
        pre_tokenizer=pre_tokenizer,
        config_vocab=source.config_vocab,
        embedding=f"{source.embedding} of {source.ckpt.path}",
        warn=note,
    )
    source.spec.vocab.quirks(scratch, source.tok_dir, source.config)
    return {k: v for k, v in scratch.kv_data[0].items() if k not in before}, summary


def add_general(writer: gguf.GGUFWriter, ckpt: Checkpoint) -> None:
    """general.* keys as convert_hf_to_gguf.py derives them (model card, config, directory name)."""
    directory = ckpt.directory
    total, shared, expert, experts = writer.get_total_parameter_count()
    meta = gguf.Metadata.load(None, directory, None, total)
    if meta.name is None:
        meta.name = directory.name if ckpt.path.is_dir() else ckpt.path.stem
    if meta.size_label is None and total > 0:
        meta.size_label = gguf.size_label(total, shared, expert, experts)
    meta.set_gguf_meta_model(writer)
