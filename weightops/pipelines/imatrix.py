"""Checkpoint + calibration text -> llama.cpp importance matrix (what `llama-imatrix` writes),
computed layer by layer from any checkpoint the core reads; existing imatrix files combine
with it (or with each other, without a text) as `llama-imatrix --in-file` combines them.

MODEL is read as an HF-named model: HF directly, TencentPretrain through the remap view,
GGUF dequantized with llama.cpp's layout undone. Its tokenizer is the model's own (HF files,
or llama.cpp's for GGUF), checked against the embedding before any layer runs. Everything is
computed before the output is opened, so a failure writes nothing."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .. import arch
from ..arch import ArchSpec, Role
from ..calibrate import text as calib_text
from ..calibrate.collect import collect, entries_of
from ..calibrate.layers import LayeredModel
from ..calibrate.store import default_budget
from ..devices import resolve_device
from ..errors import WeightopsError, shown
from ..io.checkpoint import Checkpoint, Format, open_checkpoint
from ..io.gguf_view import gguf_hf_view
from ..io.imatrix import Entry, Imatrix, combine, read_imatrix, write_imatrix
from ..io.index import parse_size
from ..io.outputs import Output
from ..io.remap import complete_hf_config, hf_view
from ..io.tokenizer_files import read_tokenizer_files
from ..progress import human_size
from ..stream import TensorRef

FORMATS = ("gguf", "dat")


@dataclass
class ImatrixReport:
    output: Path
    format: str
    entries: int  # matrices in the file
    chunks: int  # chunks computed here (0 when only combining)
    chunk_size: int
    device: str | None  # where the layers ran (None when only combining)
    spilled: int = 0  # bytes of hidden states kept in a temporary file instead of RAM
    in_files: list[Path] = field(default_factory=list)


def compute_imatrix(
    model: str | Path,
    output: str | Path,
    *,
    text: str | Path | None = None,
    ctx: int = 512,
    chunks: int | None = None,
    device: str = "auto",
    format: str = "gguf",
    process_output: bool = False,
    in_files: Iterable[str | Path] = (),
    tokenizer: str | Path | None = None,
    tp_config: str | Path | None = None,
    memory_budget: str | int | None = None,
    force: bool = False,
    warn: Callable[[str], None] | None = None,
) -> ImatrixReport:
    """Write the importance matrix of `model` over `text` (and/or the sum of `in_files`) to
    `output` in llama.cpp's GGUF or legacy .dat `format`. `memory_budget` bounds the RAM of the
    hidden states kept between layers (default: a quarter of the available memory); beyond it
    they go to an unlinked temporary file beside the output."""
    if format not in FORMATS:
        raise WeightopsError(f"--format {format!r}: choose one of {', '.join(FORMATS)}")
    in_paths = [Path(p) for p in in_files]
    if text is None and not in_paths:
        raise WeightopsError("give a calibration --text, or --in-file imatrix files to combine")
    ckpt = open_checkpoint(model, tp_config)
    target = Output(output, [ckpt.path, text, tokenizer, tp_config, *in_paths], kind="file", force=force)
    refs, config, spec = _hf_model(ckpt)
    shapes = _input_columns(spec, refs)
    items = [_checked(read_imatrix(p), p, shapes, ckpt.path) for p in in_paths]
    report = ImatrixReport(target.path, format, 0, 0, ctx, None, in_files=in_paths)
    if text is not None:
        data, report.device, report.spilled = _compute(
            ckpt,
            (refs, config, spec),
            Path(text),
            ctx=ctx,
            limit=chunks,
            device=device,
            process_output=process_output,
            tokenizer=tokenizer,
            memory_budget=memory_budget,
            target=target,
            warn=warn,
        )
        report.chunks = data.chunk_count
        items.append(data)
        if report.spilled and warn:
            warn(f"the hidden states ({human_size(report.spilled)}) exceed the memory budget: kept in a temporary file")
    # as llama-imatrix --in-file ... -c CTX: legacy values scale by this run's chunk size
    result = combine(items, chunk_size=ctx)
    report.entries, report.chunk_size = len(result.entries), result.chunk_size
    write_imatrix(result, target, fmt=format)
    return report


def _hf_model(ckpt: Checkpoint) -> tuple[list[TensorRef], dict, ArchSpec]:
    """HF-named refs, complete HF config and architecture of any checkpoint."""
    if ckpt.format is Format.GGUF:
        refs, config = gguf_hf_view(ckpt)
    else:
        refs, config = hf_view(ckpt)
        if not config:
            raise WeightopsError(f"{ckpt.path}: no config.json next to the weights; the layers need it")
        config = complete_hf_config(config)
    spec = arch.get(config.get("model_type") or ckpt.architecture)
    arch.check_config_shapes(spec, config, refs, str(ckpt.config_file or ckpt.path))
    return refs, config, spec


def _input_columns(spec: ArchSpec, refs: list[TensorRef]) -> dict[str, int]:
    """GGUF name -> input columns of every 2-D weight of the model (what an entry must match)."""
    out = {}
    for r in refs:
        hit = spec.lookup(r.name, "hf")
        if hit is not None and hit[0].gguf is not None and len(r.shape) == 2:
            out[hit[0].gguf.format(n=hit[1])] = r.shape[1]
    return out


def _checked(data: Imatrix, path: Path, columns: dict[str, int], model: Path) -> Imatrix:
    for name, e in data.entries.items():
        if name not in columns:
            raise WeightopsError(
                f"{path}: entry {shown(name)!r} names no matrix of {model}: an imatrix of another model?"
            )
        if e.sums.shape[-1] != columns[name]:
            raise WeightopsError(
                f"{path}: entry {shown(name)!r} has {e.sums.shape[-1]} columns, the matrix in {model} has "
                f"{columns[name]}: an imatrix of another model?"
            )
    return data


def _compute(
    ckpt: Checkpoint,
    hf_model: tuple[list[TensorRef], dict, ArchSpec],
    text: Path,
    *,
    ctx: int,
    limit: int | None,
    device: str,
    process_output: bool,
    tokenizer: str | Path | None,
    memory_budget: str | int | None,
    target: Output,
    warn: Callable[[str], None] | None,
) -> tuple[Imatrix, str, int]:
    refs, config, spec = hf_model
    dev = resolve_device(device)
    budget = parse_size(memory_budget) if memory_budget is not None else default_budget()
    trained = config.get("max_position_embeddings")
    if warn and isinstance(trained, int) and ctx > trained:
        warn(f"--ctx {ctx} is longer than the {trained} positions {ckpt.path} was built for (llama-imatrix warns too)")
    tok = _tokenize(ckpt, refs, config, spec, text, tokenizer)
    ids = calib_text.chunks(tok, ctx, limit)
    layered = LayeredModel(spec, config, refs, dev)
    spilled = 0

    def spill(nbytes: int) -> None:
        nonlocal spilled
        spilled = nbytes

    parent = target.path.parent
    found = collect(
        layered,
        ids,
        budget=budget,
        spill_dir=parent if parent.is_dir() else None,
        process_output=process_output,
        on_spill=spill,
    )
    entries = {n: Entry(sums, counts) for n, (sums, counts) in entries_of(found).items()}
    return Imatrix(entries, [str(text)], ids.shape[0], ctx), dev.type, spilled


def _tokenize(
    ckpt: Checkpoint, refs: list[TensorRef], config: dict, spec: ArchSpec, text: Path, tokenizer: str | Path | None
) -> calib_text.Tokenizer:
    """The text's ids by the model's tokenizer, after checking its vocabulary against the embedding."""
    try:
        content = text.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise WeightopsError(f"{text}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    emb_name = spec.name_of(Role.EMBEDDING, "hf")
    emb = next((r for r in refs if spec.normalize_hf(r.name) == emb_name), None)
    rows = emb.shape[0] if emb is not None else None
    if ckpt.format is Format.GGUF and tokenizer is None:
        tokens = (ckpt.config or {}).get("tokenizer.ggml.tokens")
        if tokens is not None and rows is not None and len(tokens) > rows:
            raise WeightopsError(
                f"{ckpt.path}: the tokenizer has {len(tokens)} tokens but the embedding has only {rows} rows"
            )
        return calib_text.gguf_tokenize(ckpt.path, content)
    directory = Path(tokenizer) if tokenizer else ckpt.directory
    directory = directory if directory.is_dir() else directory.parent
    read_tokenizer_files(directory).check(
        rows=rows, config=config.get("vocab_size"), embedding=f"{emb.name} of {ckpt.path}" if emb else None
    )
    return calib_text.hf_tokenize(directory, content)
