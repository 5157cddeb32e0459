"""Checkpoint -> llama.cpp GGUF in one streaming pass.

Any checkpoint the core reads (HF safetensors or .bin, TencentPretrain through the remap
view) is renamed with the architecture's spec, its values moved to llama.cpp's layout
(the spec's transforms: q/k interleaving, a fused QKV's order), typed by `quant.policy`, encoded (F32/F16/BF16 or
GGML blocks quantized from the source values) and written by `io.gguf.write_gguf`, one
tensor at a time. Metadata keys and tokenizer follow convert_hf_to_gguf.py; a llama-quantize
file type (`FileType.quantizer`) is laid out as `llama_model_quantize` writes it from that
converter's F32 file: general.quantization_version and general.file_type re-appended after
the other keys, tensors in the loader's order (`policy.weights_map_key`; read in the model's
order all the same, each written at its offset).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType

from .. import arch, progress
from ..arch import ArchSpec, Role
from ..arch.transforms import to_gguf
from ..devices import resolve_device
from ..errors import WeightopsError, shown
from ..io.checkpoint import Checkpoint, Format, open_checkpoint
from ..io.gguf import GGUFTensor, Split, move_keys_to_end, plan_output, plan_writer, write_gguf
from ..io.gguf_tokenizer import TokenizerSummary, add_tokenizer
from ..quant import ggml_types, policy
from ..stream import TensorRef, matches_any
from .gguf_imatrix import add_quantize_kv, load_calibration

QUALITIES = ("reference",)
CHUNK_ELEMENTS = 1 << 23  # values encoded at once on CPU (32 MiB of float32); 8x that on CUDA


@dataclass
class GGUFReport:
    output: Path
    architecture: str
    file_type: str
    tensor_types: dict[str, str]  # tensor name -> GGML type name, in file order
    tokenizer: TokenizerSummary
    bytes_written: int
    warnings: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)  # the split set (or the one file), first file first


def export_gguf(
    model: str | Path,
    output: str | Path,
    *,
    type: str = "f16",
    pure: bool = False,
    tensor_types: Sequence[str] = (),
    output_tensor_type: str | None = None,
    token_embedding_type: str | None = None,
    via: str | None = None,
    quality: str = "reference",
    device: str = "auto",
    tokenizer: str | Path | None = None,
    pre_tokenizer: str | None = None,
    tp_config: str | Path | None = None,
    force: bool = False,
    warn: Callable[[str], None] | None = None,
    lora: Sequence[str | Path] = (),
    lora_options: dict | None = None,
    imatrix: str | Path | None = None,
    split_max_size: str | int | None = None,
    split_max_tensors: int | None = None,
) -> GGUFReport:
    """Write `model` as a llama.cpp GGUF file at `output` (atomically; refuses to overwrite
    without `force`). `type` is the file type (see `quant.policy`), `tensor_types` are
    `GLOB=TYPE` overrides, `output_tensor_type` / `token_embedding_type` the types of those
    two tensors, `via` (f16/bf16, llama-quantize file types only) rounds the weights to that
    type first, as a two-pass file is made; `tokenizer` a directory with the HF tokenizer
    files (default: the model's own directory). `lora` adapters are merged on the way
    (`pipelines.merge_lora.lora_stage`, with `lora_options`). `imatrix` (llama-quantize file
    types only) is an importance-matrix file: weighted quantization, its type rules and its
    metadata, as `llama-quantize --imatrix` (`pipelines.gguf_imatrix`). `split_max_size` /
    `split_max_tensors` make a split set `OUTPUT-0000k-of-0000N.gguf` (`io.gguf_split`).
    Warnings go to `warn` and into the result."""
    warnings: list[str] = []

    def note(msg: str) -> None:
        warnings.append(msg)
        if warn:
            warn(msg)

    if quality not in QUALITIES:
        raise WeightopsError(f"--quality {quality!r}: only 'reference' (llama.cpp's own rounding) is available")
    qtype_name = type.lower()
    ftype = ggml_types.parse_file_type(qtype_name)
    overrides = policy.parse_overrides(tensor_types)
    output_ggml = ggml_types.parse(output_tensor_type).ggml if output_tensor_type else None
    token_embd_ggml = ggml_types.parse(token_embedding_type).ggml if token_embedding_type else None
    if via is not None and via.lower() not in ggml_types.VIA_NAMES:
        raise WeightopsError(f"--via {via!r}: choose one of {', '.join(ggml_types.VIA_NAMES)}")
    if via is not None and not ftype.quantizer:
        raise WeightopsError(
            f"--via applies to the file types llama-quantize makes from a converted file; --type {ftype.name} "
            "is convert_hf_to_gguf.py's own"
        )
    if imatrix is not None and not ftype.quantizer:
        raise WeightopsError(
            f"--imatrix applies to the file types llama-quantize makes from a converted file; --type {ftype.name} "
            "is convert_hf_to_gguf.py's own"
        )
    via = via.lower() if via else None
    dev = resolve_device(device)
    ckpt = open_checkpoint(model, tp_config)
    split = Split.parse(split_max_size, split_max_tensors)
    target = plan_output(output, [ckpt.path, tokenizer, tp_config, imatrix, *lora], may_split=bool(split), force=force)
    output = target.path
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

    hp = spec.config.hparams(config)
    types = policy.assign_types(
        ((r.name, r.shape) for r in refs),
        qtype_name,
        model=policy.Model(spec.gguf_name, hp.layers, hp.heads, hp.kv_heads),
        pure=pure,
        overrides=overrides,
        output_type=output_ggml,
        token_embedding_type=token_embd_ggml,
        via=via,
        has_imatrix=imatrix is not None,
        warn=note,
    )
    calibration = None
    if imatrix is not None:
        quantized = [r for r in refs if types[r.name] != policy.input_type(r.name, r.shape, via)]
        calibration = load_calibration(imatrix, ((r.name, r.shape) for r in quantized))
        if not calibration.weights:
            note(f"{imatrix}: the importance matrix has no entry for any tensor quantized here; nothing is weighted")
    weights = calibration.weights if calibration else {}
    planned = [
        GGUFTensor(
            r.name,
            r.shape,
            types[r.name],
            _producer(r, types[r.name], dev, _rounding(r, via), weights.get(r.name)),
            r.release,
        )
        for r in refs
    ]
    in_file = sorted(planned, key=lambda t: policy.weights_map_key(t.name)) if ftype.quantizer else planned
    writer = plan_writer(spec.gguf_name, in_file, split)
    writer.add_type(gguf.GGUFType.MODEL)
    _add_general(writer, ckpt)
    spec.config.add_gguf_parameters(writer, config, int(ftype.file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tok_dir = Path(tokenizer) if tokenizer else ckpt.directory
    tok_dir = tok_dir if tok_dir.is_dir() else tok_dir.parent
    summary = add_tokenizer(
        writer,
        tok_dir,
        n_vocab=n_vocab,
        encodings=spec.vocab.encodings,
        default_pre=spec.vocab.default_pre,
        add_space_prefix=spec.vocab.add_space_prefix,
        pre_tokenizer=pre_tokenizer,
        config_vocab=config_vocab,
        embedding=f"{embedding} of {ckpt.path}",
        warn=note,
    )
    spec.vocab.quirks(writer, tok_dir, config)
    if ftype.quantizer:
        imatrix_keys = add_quantize_kv(writer, calibration) if calibration else ()
        move_keys_to_end(writer, (gguf.Keys.General.QUANTIZATION_VERSION, gguf.Keys.General.FILE_TYPE, *imatrix_keys))
    total = sum(t.nbytes for t in planned)
    with progress.bar(total, f"gguf {qtype_name}") as bar:
        files = write_gguf(writer, planned, target, on_tensor=lambda t: bar.update(t.nbytes))
    return GGUFReport(
        files[0],
        spec.gguf_name,
        ftype.file_type.name,
        {t.name: t.ggml_type.name for t in in_file},
        summary,
        sum(f.stat().st_size for f in files),
        warnings,
        files,
    )


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


def _rounding(ref: TensorRef, via: str | None) -> torch.dtype | None:
    """The float type `ref` is stored in in the `via` file a two-pass route quantizes from
    (None: quantize from the source values)."""
    if via is None or policy.is_always_f32(ref.name, ref.shape):
        return None
    from .. import dtypes

    return dtypes.to_torch(ggml_types.parse(via).float_dtype or "")


def _producer(
    ref: TensorRef,
    qtype: GGMLQuantizationType,
    device: torch.device,
    rounding: torch.dtype | None,
    imatrix: np.ndarray | None = None,
) -> Callable[[], Iterator[np.ndarray]]:
    return lambda: encode(ref.load(), qtype, device, rounding, imatrix)


def encode(
    t: torch.Tensor,
    qtype: GGMLQuantizationType,
    device: torch.device,
    rounding: torch.dtype | None = None,
    imatrix: np.ndarray | None = None,
) -> Iterator[np.ndarray]:
    """Stored bytes of `t` as `qtype`, a slab of rows at a time (blocks never span rows, so the
    bytes are the same as for the whole tensor, and a huge embedding never exists in float32
    at once). Values go through float32 first: quantizing from the source values, as
    llama.cpp's converter does, never from an F16 intermediate — unless `rounding` (--via)
    asks for that intermediate's values. `imatrix`: per-column weights, for the weighted path
    of the types that have one (ignored by the others, as libggml ignores them)."""
    rows = t.reshape(-1, t.shape[-1]) if t.dim() > 1 else t.reshape(1, -1)
    step = max(1, (CHUNK_ELEMENTS if device.type == "cpu" else 8 * CHUNK_ELEMENTS) // max(1, rows.shape[1]))
    record = ggml_types.get(qtype)
    weights = None if imatrix is None else torch.from_numpy(imatrix)
    for start in range(0, rows.shape[0], step):
        slab = rows[start : start + step]
        values = slab if rounding is None else slab.to(torch.float32).to(rounding)
        yield record.encode(values, device, imatrix=weights).numpy()


def _add_general(writer: gguf.GGUFWriter, ckpt: Checkpoint) -> None:
    """general.* keys as convert_hf_to_gguf.py derives them (model card, config, directory name)."""
    directory = ckpt.directory
    total, shared, expert, experts = writer.get_total_parameter_count()
    meta = gguf.Metadata.load(None, directory, None, total)
    if meta.name is None:
        meta.name = directory.name if ckpt.path.is_dir() else ckpt.path.stem
    if meta.size_label is None and total > 0:
        meta.size_label = gguf.size_label(total, shared, expert, experts)
    meta.set_gguf_meta_model(writer)
