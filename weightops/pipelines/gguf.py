"""Checkpoint -> llama.cpp GGUF files (one, or a release matrix) in one streaming pass.

Any checkpoint the core reads (HF safetensors or .bin, TencentPretrain through the remap
view) is renamed with the architecture's spec, its values moved to llama.cpp's layout
(the spec's transforms: q/k interleaving, a fused QKV's order: `gguf_source`), typed by
`quant.policy` for each output, encoded (F32/F16/BF16 or GGML blocks quantized from the
source values) and written at its offset in every output file (`io.gguf_partial`), one
tensor at a time: a source tensor is read once, and an encoding several outputs share
(same tensor, type, --via and importance weights) is computed once. Each temporary journals the tensors written
(with their hashes), so a killed run can be resumed. Metadata keys and tokenizer follow
convert_hf_to_gguf.py; a llama-quantize file type (`FileType.quantizer`) is laid out as
`llama_model_quantize` writes it from that converter's F32 file: general.quantization_version
and general.file_type re-appended after the other keys, tensors in the loader's order
(`policy.weights_map_key`; read in the model's order all the same, each written at its offset).
With --imatrix the quantized tensors are weighted as `llama-quantize --imatrix` weights them
(`gguf_imatrix`); with a split option each output is a split set (`io.gguf_split`).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType

from .. import progress
from ..devices import resolve_device
from ..errors import WeightopsError
from ..io.checkpoint import Checkpoint, open_checkpoint
from ..io.gguf import LLAMA_CPP_PIN, GGUFTensor, Split, move_keys_to_end, plan_output, plan_writer
from ..io.gguf_partial import PartialGGUF, write_tensor
from ..io.gguf_tokenizer import TokenizerSummary
from ..io.output_set import OutputSet
from ..io.outputs import Output
from ..io.pages import drop_mapped
from ..quant import ggml_types, policy
from ..stream import TensorRef
from .gguf_imatrix import Calibration, add_quantize_kv, load_calibration
from .gguf_source import Source, add_general, open_source, tokenizer_kv
from .planned import written

QUALITIES = ("reference",)
CHUNK_ELEMENTS = 1 << 21  # values encoded at once on CPU (8 MiB of float32; less holds less); 8x that on CUDA


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
    # tensors this output's run encoded, took from an encoding made for an earlier output of
    # the same matrix (same tensor, type and --via), and kept from an interrupted run (--resume)
    encoded: int = 0
    shared: int = 0
    resumed: int = 0

    @property
    def resumed_note(self) -> str:
        """What a summary line adds when --resume kept tensors of an interrupted run ('' if none)."""
        return f"; {self.resumed} tensors kept from the interrupted run" if self.resumed else ""


@dataclass(frozen=True)
class GGUFVariant:
    """One output of a matrix: its file type and the options that choose its tensors' types
    (those of `export_gguf`)."""

    type: str = "f16"
    pure: bool = False
    tensor_types: Sequence[str] = ()
    output_tensor_type: str | None = None
    token_embedding_type: str | None = None
    via: str | None = None
    imatrix: str | Path | None = None


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
    resume: bool = False,
) -> GGUFReport:
    """Write `model` as a llama.cpp GGUF file at `output` (atomically; refuses to overwrite
    without `force`). `type` is the file type (see `quant.policy`), `tensor_types` are
    `GLOB=TYPE` overrides, `output_tensor_type` / `token_embedding_type` the types of those
    two tensors, `via` (f16/bf16, llama-quantize file types only) rounds the weights to that
    type first, as a two-pass file is made; `imatrix` (llama-quantize file types only) is an
    importance-matrix file: weighted quantization, its type rules and its metadata, as
    `llama-quantize --imatrix` (`pipelines.gguf_imatrix`). The one-output case of
    `export_gguf_matrix`, which describes the other options."""
    variant = GGUFVariant(type, pure, tuple(tensor_types), output_tensor_type, token_embedding_type, via, imatrix)
    return export_gguf_matrix(
        model,
        [output],
        [variant],
        quality=quality,
        device=device,
        tokenizer=tokenizer,
        pre_tokenizer=pre_tokenizer,
        tp_config=tp_config,
        force=force,
        warn=warn,
        lora=lora,
        lora_options=lora_options,
        split_max_size=split_max_size,
        split_max_tensors=split_max_tensors,
        resume=resume,
    )[0]


def plan_gguf_matrix(
    model: str | Path | Checkpoint,
    outputs: str | Path | Sequence[str | Path],
    types: Sequence[str | GGUFVariant],
    *,
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
    resume: bool = False,
) -> GGUFMatrix:
    """`export_gguf_matrix` up to the first tensor: options checked, every output typed and
    planned, its temporary named (`GGUFMatrix.writing` opens it). `model` may be a Checkpoint
    already opened (the fused release pass gives one whose tensors share a read)."""
    variants = [
        v
        if isinstance(v, GGUFVariant)
        else GGUFVariant(v, pure, tuple(tensor_types), output_tensor_type, token_embedding_type, via, imatrix)
        for v in types
    ]
    if not variants:
        raise WeightopsError("no --type given: a GGUF export writes at least one file type")
    if quality not in QUALITIES:
        raise WeightopsError(f"--quality {quality!r}: only 'reference' (llama.cpp's own rounding) is available")
    checked = [_check(v) for v in variants]
    split = Split.parse(split_max_size, split_max_tensors)
    dev = resolve_device(device)
    ckpt = model if isinstance(model, Checkpoint) else open_checkpoint(model, tp_config)
    inputs = [ckpt.path, tokenizer, tp_config, *{v.variant.imatrix for v in checked}, *lora]
    targets = _Targets(ckpt, outputs, checked, inputs, split, force, resume)

    def channel(into: list[str], prefix: str = "") -> Callable[[str], None]:
        def note(msg: str) -> None:
            into.append(msg)
            if warn:
                warn(prefix + msg)

        return note

    common: list[str] = []
    source = open_source(ckpt, tokenizer, lora, lora_options, channel(common))
    for out in checked:
        out_note = channel(out.warnings, f"{out.ftype.name}: " if len(checked) > 1 else "")
        out.assign(source, out_note)
        out.calibrate(source, out_note)
    tok_warnings: list[str] = []
    tok_kv, summary = tokenizer_kv(source, pre_tokenizer, channel(tok_warnings))
    for out in checked:
        out.plan(source, tok_kv, split)
    recipe = _recipe(ckpt, lora, lora_options)
    parts = [
        PartialGGUF(v.planned_writer, path, recipe(v.via, v.variant.imatrix))
        for v, path in zip(checked, targets.paths, strict=True)
    ]
    return GGUFMatrix(source, checked, targets, parts, dev, common, tok_warnings, summary)


export_gguf_matrix = written(
    plan_gguf_matrix,
    name="export_gguf_matrix",
    returns="list[GGUFReport]",
    doc="""Write `model` as one GGUF file per entry of `types`, reading each source tensor once:
    an encoding several outputs need (same tensor, same GGML type, same --via) is computed
    once and written into each of them; memory stays a few tensors whatever the number of
    outputs. Each file is byte for byte the one `export_gguf` writes for its type.

    `outputs` is a directory (published as a whole; the files in it are named by
    `matrix_file_name`) or one `.gguf` path per type. An entry of `types` is a file type
    name, which takes `pure` / `tensor_types` / `output_tensor_type` / `token_embedding_type`
    / `via` / `imatrix` from the arguments, or a `GGUFVariant` with its own. `split_max_size`
    / `split_max_tensors` make each output a split set `NAME-0000k-of-0000N.gguf`
    (`io.gguf_split`). `tokenizer` is a directory with the HF tokenizer files (default: the
    model's own directory). `lora` adapters are
    merged on the way (`pipelines.merge_lora.lora_stage`, with `lora_options`). `resume`
    continues the temporaries a killed run left (`io.gguf_partial`: tensors whose bytes hash
    as journaled are kept). Warnings go to `warn` (prefixed with the type when there are
    several outputs) and into each output's report.""",
)


def matrix_file_name(model: str | Path, type: str) -> str:
    """The name of a matrix's file of `type` in its output directory: the model's directory
    name (a single-file checkpoint's stem) and the file type, as published GGUF files are
    usually named: `chinese-alpaca-7b-Q4_K_M.gguf`."""
    path = Path(model)
    stem = path.name if path.is_dir() else path.stem
    return f"{stem}-{ggml_types.parse_file_type(type).name.upper()}.gguf"


@dataclass
class _Output:
    """A variant checked, then planned: its tensors' types, file order and writer."""

    variant: GGUFVariant
    ftype: ggml_types.FileType
    overrides: list
    output_ggml: GGMLQuantizationType | None
    token_embd_ggml: GGMLQuantizationType | None
    warnings: list[str] = field(default_factory=list)
    types: dict[str, GGMLQuantizationType] = field(default_factory=dict)
    in_file: list[GGUFTensor] = field(default_factory=list)
    writer: gguf.GGUFWriter | None = None
    calibration: Calibration | None = None
    encoded: int = 0
    shared: int = 0

    @property
    def via(self) -> str | None:
        return self.variant.via

    @property
    def planned_writer(self) -> gguf.GGUFWriter:
        assert self.writer is not None, "plan() first"
        return self.writer

    def assign(self, source: Source, note: Callable[[str], None]) -> None:
        hp = source.spec.config.hparams(source.config)
        self.types = policy.assign_types(
            ((r.name, r.shape) for r in source.refs),
            self.ftype.name,
            model=policy.Model(source.spec.gguf_name, hp.layers, hp.heads, hp.kv_heads),
            pure=self.variant.pure,
            overrides=self.overrides,
            output_type=self.output_ggml,
            token_embedding_type=self.token_embd_ggml,
            via=self.via,
            has_imatrix=self.variant.imatrix is not None,
            warn=note,
        )

    def calibrate(self, source: Source, note: Callable[[str], None]) -> None:
        """The importance matrix's weights for the tensors this output quantizes."""
        imatrix = self.variant.imatrix
        if imatrix is None:
            return
        quantized = [r for r in source.refs if self.types[r.name] != policy.input_type(r.name, r.shape, self.via)]
        self.calibration = load_calibration(imatrix, ((r.name, r.shape) for r in quantized))
        if not self.calibration.weights:
            note(f"{imatrix}: the importance matrix has no entry for any tensor quantized here; nothing is weighted")

    @property
    def imatrix_key(self) -> str | None:
        return os.path.abspath(self.variant.imatrix) if self.variant.imatrix is not None else None

    def weights(self, name: str) -> np.ndarray | None:
        return self.calibration.weights.get(name) if self.calibration else None

    def plan(self, source: Source, tokenizer_kv: dict, split: Split | None) -> None:
        """The writer with every key, in the order convert_hf_to_gguf.py (and, for its file
        types, llama-quantize) writes them; tensor infos in file order."""
        planned = [GGUFTensor(r.name, r.shape, self.types[r.name], _no_data) for r in source.refs]
        quantizer = self.ftype.quantizer
        self.in_file = sorted(planned, key=lambda t: policy.weights_map_key(t.name)) if quantizer else planned
        writer = self.writer = plan_writer(source.spec.gguf_name, self.in_file, split)
        writer.add_type(gguf.GGUFType.MODEL)
        add_general(writer, source.ckpt)
        source.spec.config.add_gguf_parameters(writer, source.config, int(self.ftype.file_type))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.kv_data[0].update(tokenizer_kv)
        if quantizer:
            imatrix_keys = add_quantize_kv(writer, self.calibration) if self.calibration else ()
            move_keys_to_end(
                writer, (gguf.Keys.General.QUANTIZATION_VERSION, gguf.Keys.General.FILE_TYPE, *imatrix_keys)
            )


def _no_data() -> Iterator[np.ndarray]:
    raise AssertionError("a planned tensor's bytes come from the matrix stream")


def _check(v: GGUFVariant) -> _Output:
    """A variant's options parsed, or the refusal naming the bad one (before anything is read)."""
    ftype = ggml_types.parse_file_type(v.type)
    overrides = policy.parse_overrides(v.tensor_types)
    output_ggml = ggml_types.parse(v.output_tensor_type).ggml if v.output_tensor_type else None
    token_embd_ggml = ggml_types.parse(v.token_embedding_type).ggml if v.token_embedding_type else None
    if v.via is not None and v.via.lower() not in ggml_types.VIA_NAMES:
        raise WeightopsError(f"--via {v.via!r}: choose one of {', '.join(ggml_types.VIA_NAMES)}")
    if v.via is not None and not ftype.quantizer:
        raise WeightopsError(
            f"--via applies to the file types llama-quantize makes from a converted file; --type {ftype.name} "
            "is convert_hf_to_gguf.py's own"
        )
    if v.imatrix is not None and not ftype.quantizer:
        raise WeightopsError(
            f"--imatrix applies to the file types llama-quantize makes from a converted file; --type {ftype.name} "
            "is convert_hf_to_gguf.py's own"
        )
    variant = GGUFVariant(
        ftype.name,
        v.pure,
        tuple(v.tensor_types),
        v.output_tensor_type,
        v.token_embedding_type,
        v.via.lower() if v.via else None,
        v.imatrix,
    )
    return _Output(variant, ftype, overrides, output_ggml, token_embd_ggml)


class _Targets:
    """Where a matrix's outputs go: one directory published as a whole, or one output slot (a
    file or a split set, `io.output_set`) per type."""

    def __init__(
        self,
        ckpt: Checkpoint,
        outputs: str | Path | Sequence[str | Path],
        planned: list[_Output],
        inputs: list,
        split: Split | None,
        force: bool,
        resume: bool,
    ):
        self.resume = resume
        if isinstance(outputs, (str, Path)):
            names = [matrix_file_name(ckpt.path, o.ftype.name) for o in planned]
            twice = sorted({n for n in names if names.count(n) > 1})
            if twice:
                raise WeightopsError(f"{outputs}: --type given twice ({', '.join(twice)}): one file per type")
            self.directory: Output | None = Output(outputs, inputs, kind="dir", force=force, resume=resume)
            self.names = names
            self.paths = [self.directory.path / n for n in names]
            self.slots: list[OutputSet] = []
        else:
            paths = [Path(p) for p in outputs]
            if len(paths) != len(planned):
                raise WeightopsError(f"{len(paths)} GGUF output path(s) for {len(planned)} type(s)")
            if len({os.path.abspath(p) for p in paths}) != len(paths):
                raise WeightopsError(f"the same output path twice among {', '.join(map(str, paths))}")
            self.directory, self.names = None, [p.name for p in paths]
            self.slots = [plan_output(p, inputs, may_split=bool(split), force=force, resume=resume) for p in paths]
            self.paths = [o.path for o in self.slots]

    @contextlib.contextmanager
    def opened(self, parts: list[PartialGGUF]) -> Iterator[list[int]]:
        """Every output's temporary open (continuing recognised ones with `resume`): yields how
        many tensors each kept from a killed run; on a clean exit each is finished and
        published (`published` then names its files)."""
        with contextlib.ExitStack() as stack:
            if self.directory is not None:
                tmp = stack.enter_context(
                    self.directory.writing(
                        adopt=lambda d: any(p.recognises(d / n) for p, n in zip(parts, self.names, strict=True))
                    )
                )
                ours = {n for p in parts for n in p.names}
                for entry in tmp.iterdir():  # left by a killed run of another set of types
                    if entry.name not in ours:
                        entry.unlink()
                temps = [tmp / n for n in self.names]
            else:
                temps = [
                    stack.enter_context(o.writing(len(p.names) > 1, adopt=p.recognises))
                    for o, p in zip(self.slots, parts, strict=True)
                ]
            for part in parts:
                stack.callback(part.close)
            yield [part.open(t, self.resume) for part, t in zip(parts, temps, strict=True)]
            for part in parts:
                part.finish()

    def published(self, parts: list[PartialGGUF]) -> list[list[Path]]:
        """Each output's files once published (a split set's, first file first)."""
        if self.directory is not None:
            return [[self.directory.path / n for n in p.names] for p in parts]
        return [o.published() for o in self.slots]


@dataclass
class GGUFMatrix:
    """A matrix planned (`plan_gguf_matrix`): what every output is, and where it goes. Inside
    `writing()`, `put` streams one source tensor into every output that still lacks it; the
    source's tensors are `refs`, in llama.cpp's model order."""

    source: Source
    planned: list[_Output]
    targets: _Targets
    parts: list[PartialGGUF]
    device: torch.device
    common: list[str]
    tok_warnings: list[str]
    summary: TokenizerSummary
    kept: list[int] = field(default_factory=list)
    files: list[list[Path]] = field(default_factory=list)

    @property
    def refs(self) -> list[TensorRef]:
        return self.source.refs

    @property
    def desc(self) -> str:
        return f"gguf {self.planned[0].ftype.name}" if len(self.planned) == 1 else f"gguf {len(self.planned)} types"

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """The outputs' temporaries open; published on a clean exit."""
        with self.targets.opened(self.parts) as kept:
            self.kept = kept
            yield
        self.files = self.targets.published(self.parts)

    def remaining(self) -> int:
        """Bytes still to write (less than the total when resuming)."""
        return sum(p.spans[n][1] for p in self.parts for n in p.missing())

    def write(self) -> list[GGUFReport]:
        """Every source tensor once, in order; the reports."""
        with self.writing(), progress.bar(self.remaining(), self.desc) as bar:
            for ref in self.refs:
                bar.update(self.put(ref))
        return self.reports()

    def put(self, ref: TensorRef) -> int:
        """`ref` loaded (if any output still lacks it), each distinct encoding of it (GGML type,
        --via rounding, importance weights) computed once, slab by slab, and written into every
        output that has it in that type; then released. Returns the bytes written."""
        parts, planned = self.parts, self.planned
        groups: dict[tuple, list[int]] = {}
        for i, (part, out) in enumerate(zip(parts, planned, strict=True)):
            if ref.name not in part.written:
                # one file's weights for a tensor are the same whichever output asks
                weighted = out.weights(ref.name) is not None
                key = (out.types[ref.name], _rounding(ref, out.via), out.imatrix_key if weighted else None)
                groups.setdefault(key, []).append(i)
        if not groups:
            return 0
        written = 0
        tensor = ref.load()
        for (qtype, rounding, _), which in groups.items():
            weights = planned[which[0]].weights(ref.name)
            pieces = _lazily(tensor, qtype, self.device, rounding, weights, ref.mapped)
            write_tensor([parts[i] for i in which], ref.name, ref.shape, qtype, pieces)
            planned[which[0]].encoded += 1
            for i in which[1:]:
                planned[i].shared += 1
            written += parts[which[0]].spans[ref.name][1] * len(which)
        del tensor
        ref.release()
        return written

    def reports(self) -> list[GGUFReport]:
        return [
            GGUFReport(
                files[0],
                self.source.spec.gguf_name,
                v.ftype.file_type.name,
                {t.name: t.ggml_type.name for t in v.in_file},
                self.summary,
                sum(f.stat().st_size for f in files),
                self.common + v.warnings + self.tok_warnings,
                files,
                encoded=v.encoded,
                shared=v.shared,
                resumed=kept,
            )
            for v, files, kept in zip(self.planned, self.files, self.kept, strict=True)
        ]


def _lazily(*args: Any) -> Iterator[np.ndarray]:
    """`encode(*args)`, started only when its first piece is asked for: inside `write_tensor`,
    which names the file and tensor of any error the encoding raises."""
    yield from encode(*args)


def _recipe(
    ckpt: Checkpoint, lora: Sequence[str | Path], lora_options: dict | None
) -> Callable[[str | None, str | Path | None], str]:
    """What decides a file's tensor bytes beyond its header (which the journal hashes anyway):
    the weight files (path, size, mtime), the adapters, their options, --via, the importance
    matrix (path, size, mtime), the version."""
    files = [*ckpt.weight_files]
    for a in lora:
        a = Path(a)
        files += sorted(p for p in a.rglob("*") if p.is_file()) if a.is_dir() else [a]
    stats = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    try:
        version = metadata.version("weightops")
    except metadata.PackageNotFoundError:
        version = "unknown"
    base = {
        "weightops": version,
        "llama.cpp": LLAMA_CPP_PIN,
        "files": stats,
        "lora": dict(lora_options or {}) if lora else {},
    }

    def recipe(via: str | None, imatrix: str | Path | None) -> str:
        calibration = None
        if imatrix is not None:
            st = Path(imatrix).stat()
            calibration = (str(Path(imatrix).resolve()), st.st_size, st.st_mtime_ns)
        return json.dumps({**base, "via": via, "imatrix": calibration}, sort_keys=True, default=str)

    return recipe


def _rounding(ref: TensorRef, via: str | None) -> torch.dtype | None:
    """The float type `ref` is stored in in the `via` file a two-pass route quantizes from
    (None: quantize from the source values)."""
    if via is None or policy.is_always_f32(ref.name, ref.shape):
        return None
    from .. import dtypes

    return dtypes.to_torch(ggml_types.parse(via).float_dtype or "")


def encode(
    t: torch.Tensor,
    qtype: GGMLQuantizationType,
    device: torch.device,
    rounding: torch.dtype | None = None,
    imatrix: np.ndarray | None = None,
    mapped: bool = False,
) -> Iterator[np.ndarray]:
    """Stored bytes of `t` as `qtype`, a slab of rows at a time (blocks never span rows, so the bytes
    are the same as for the whole tensor, and a huge embedding never exists in float32 at once).
    `mapped`: t is a view of a file mapping (`TensorRef.mapped`), whose pages are dropped slab
    by slab once encoded, so a large embedding is not held whole either. Values go through
    float32 first: quantizing from the source values, as llama.cpp's converter does, never from
    an F16 intermediate — unless `rounding` (--via) asks for that intermediate's values.
    `imatrix`: per-column weights, for the weighted path of the types that have one (ignored by
    the others, as libggml ignores them)."""
    rows = t.reshape(-1, t.shape[-1]) if t.dim() > 1 else t.reshape(1, -1)
    step = max(1, (CHUNK_ELEMENTS if device.type == "cpu" else 8 * CHUNK_ELEMENTS) // max(1, rows.shape[1]))
    record = ggml_types.get(qtype)
    weights = None if imatrix is None else torch.from_numpy(imatrix)
    for start in range(0, rows.shape[0], step):
        slab = rows[start : start + step]
        values = slab if rounding is None else slab.to(torch.float32).to(rounding)
        encoded = record.encode(values, device, imatrix=weights).numpy()
        if mapped and slab.is_contiguous():
            drop_mapped(slab.data_ptr(), slab.numel() * slab.element_size())
        yield encoded
