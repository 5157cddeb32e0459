"""`weightops bnb`: an HF checkpoint in, the bitsandbytes checkpoint transformers would save out,
around the stream quantizer of `quant.bnb`."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import dtypes, progress
from ..arch import Role, check_config_shapes, supported
from ..arch import get as get_arch
from ..devices import resolve_device
from ..errors import WeightopsError
from ..io.checkpoint import Checkpoint, hf_writing, open_checkpoint
from ..io.hf import HFWeights
from ..io.outputs import Output, content
from ..io.remap import complete_hf_config
from ..quant.bnb import BnbSpec, linear_weights, quantize_bnb
from ..stream import Stream, TensorRef, cast, matches_any
from .planned import written


def model_dtype(config: dict | None, refs: Iterable[TensorRef]) -> torch.dtype | None:
    """The dtype `from_pretrained(dtype="auto")` loads (and so quantizes) in: the config's
    `dtype` / `torch_dtype`, else that of the first floating-point tensor."""
    name = (config or {}).get("dtype") or (config or {}).get("torch_dtype")
    if isinstance(name, str) and isinstance(getattr(torch, name, None), torch.dtype):
        return getattr(torch, name)
    return next((r.dtype for r in refs if r.dtype.is_floating_point), None)


@dataclass
class BnbReport:
    files: list[Path] = field(default_factory=list)
    quantized: list[str] = field(default_factory=list)  # weight names
    skipped: list[str] = field(default_factory=list)  # linear weights kept by --skip
    quantization_config: dict = field(default_factory=dict)
    device: str = "cpu"
    dtype: str | None = None


@dataclass
class BnbPlan:
    """A bnb export planned (`plan_bnb`): the output, and the tensors it will hold (quantized
    lazily, as the writer asks for them)."""

    target: Output
    refs: list[TensorRef]
    aux_files: list[Path]
    max_shard_size: str | int
    config_update: dict
    total_parameters: int
    desc: str
    report: BnbReport

    @contextmanager
    def writing(self) -> Iterator[HFWeights]:
        """The output's weight files open for tensors in any order (`HFWeights.put`); config
        and tokenizer files added and the directory published on a clean exit."""
        with hf_writing(
            self.refs,
            self.target,
            self.max_shard_size,
            self.total_parameters,
            aux_files=self.aux_files,
            config_update=self.config_update,
        ) as weights:
            yield weights
        self.report.files = content(self.target.path)

    def write(self) -> BnbReport:
        """The output written on its own: every tensor in name order, with a progress bar."""
        with self.writing() as weights, progress.bar(sum(r.nbytes for r in self.refs), self.desc) as bar:
            weights.fill(on_tensor=lambda r: bar.update(r.nbytes))
        return self.report


def plan_bnb(
    model: str | Path | Checkpoint,
    output: str | Path,
    *,
    bits: int,
    quant_type: str = "nf4",
    double_quant: bool = False,
    compute_dtype: str = "float32",
    skip: Sequence[str] = (),
    device: str = "auto",
    max_shard_size: str | int = "5GB",
    force: bool = False,
) -> BnbPlan:
    """`export_bnb` up to its first write: every check, the output claimed, the quantized
    tensors planned. With --double-quant this reads every quantized weight once already (the
    sizing pass of `quant.bnb`). `model` may be a Checkpoint already opened (the fused release
    pass gives one whose tensors share a read)."""
    if compute_dtype not in dtypes.FLOAT_CHOICES:
        raise WeightopsError(f"--compute-dtype {compute_dtype!r}: choose one of {', '.join(dtypes.FLOAT_CHOICES)}")
    spec = BnbSpec(bits, quant_type, double_quant, dtypes.to_torch(dtypes.FLOAT_CHOICES[compute_dtype]))
    ckpt = model if isinstance(model, Checkpoint) else open_checkpoint(model)
    target = Output(output, [ckpt.path], kind="dir", force=force)
    if not ckpt.format.is_hf:
        raise WeightopsError(
            f"{ckpt.path} is a {ckpt.format} checkpoint; bitsandbytes checkpoints are made from a "
            "Hugging Face checkpoint, so convert it first (weightops convert --to hf)"
        )
    if ckpt.config is None:
        raise WeightopsError(f"{ckpt.directory}: no config.json; transformers needs one to load the result")
    if "quantization_config" in ckpt.config:
        raise WeightopsError(
            f"{ckpt.directory}/config.json already has a quantization_config "
            f"({ckpt.config['quantization_config'].get('quant_method', '?')}); start from the "
            "unquantized model"
        )
    if ckpt.architecture is None:
        raise WeightopsError(
            f"{ckpt.path}: unknown architecture, so which tensors are linear layers is unknown "
            f"(supported: {', '.join(supported())})"
        )
    table = get_arch(ckpt.architecture)
    tensors = [r.renamed(table.normalize_hf(r.name)) for r in ckpt.tensors]  # as the loaded model names them
    check_config_shapes(
        table, complete_hf_config({"model_type": ckpt.architecture, **ckpt.config}), tensors, str(ckpt.config_file)
    )
    linear = linear_weights(table)
    skipped = [r.name for r in tensors if linear(r) and matches_any(r.name, skip)]
    unused = [g for g in skip if not any(matches_any(n, (g,)) for n in skipped)]
    if unused:
        raise WeightopsError(
            f"--skip {', '.join(repr(g) for g in unused)} matches no linear weight of {ckpt.path} "
            "(globs are matched against tensor names, e.g. 'model.layers.*.mlp.down_proj.weight')"
        )
    head = table.name_of(Role.OUTPUT, "hf").removesuffix(".weight")  # transformers never quantizes it
    skip_modules = [head, *(n.removesuffix(".weight") for n in skipped)] if skipped else None
    dev = resolve_device(device)
    dtype = model_dtype(ckpt.config, tensors)
    kept = set(skipped)
    report = BnbReport(
        quantized=[r.name for r in tensors if linear(r) and r.name not in kept],
        skipped=skipped,
        quantization_config=spec.quantization_config(skip_modules),
        device=str(dev),
        dtype=str(dtype).removeprefix("torch.") if dtype else None,
    )
    stream: Stream = cast(tensors, dtype)
    if spec.bits == 4 and spec.double_quant:
        stream = progress.iterate(stream, total=len(tensors), desc="sizing quant states")
    refs = quantize_bnb(stream, spec, lambda r: linear(r) and r.name not in kept, dev)
    return BnbPlan(
        target,
        list(refs),  # with --double-quant, the sizing pass runs here
        ckpt.aux_files,
        max_shard_size,
        {"quantization_config": report.quantization_config},
        sum(r.numel for r in tensors),  # as the loaded model counts them
        f"bnb {bits}-bit" + (f" {quant_type}" if bits == 4 else ""),
        report,
    )


export_bnb = written(
    plan_bnb,
    name="export_bnb",
    returns="BnbReport",
    doc="""Write OUTPUT: MODEL (an HF checkpoint) as the bitsandbytes checkpoint transformers saves
    after `from_pretrained(MODEL, quantization_config=BitsAndBytesConfig(...))`, loadable with
    `AutoModelForCausalLM.from_pretrained(OUTPUT)`. `skip` globs (on tensor names) keep more
    linear weights unquantized; they are recorded in `llm_int8_skip_modules` with `lm_head`.""",
)
