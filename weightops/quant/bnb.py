"""bitsandbytes checkpoints (LLM.int8() and 4-bit NF4/FP4), written one tensor at a time.

transformers loads a checkpoint that it saved from a `BitsAndBytesConfig`-quantized model
without quantizing again, but making that checkpoint its way means loading the whole model
first. This operator makes the same tensors straight from a checkpoint stream: each linear
weight of the decoder layers goes through the bitsandbytes functions that `Int8Params` /
`Params4bit` call when transformers quantizes (`int8_vectorwise_quant` on the float16 weight;
`quantize_4bit` with blocksize 64), and becomes exactly the tensors `Linear8bitLt` /
`Linear4bit` put in a state dict (`QuantState.as_dict(packed=True)` for 4-bit). Everything
else (embeddings, norms, biases, `lm_head`) passes through.

One subtlety: with double quantization the serialized quant state is a JSON text that holds
the mean of the block maxima (`nested_offset`), so its length, which the safetensors header
must know before any data is written, depends on the data. A first pass computes that mean
(block maxima only, no quantization) for each weight, one at a time; if bitsandbytes'
result ever serialized to a different length, the write fails rather than publish it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial

import torch

from .. import dtypes
from ..arch import ArchSpec
from ..errors import WeightopsError, shown
from ..stream import Stream, TensorRef

BITS = (8, 4)
QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZE = 64  # what Params4bit uses (BitsAndBytesConfig has no setting for it)
Parts = dict[str, torch.Tensor]  # suffix after the module name ("weight", "SCB", "weight.absmax", ...) -> tensor


@dataclass(frozen=True)
class BnbSpec:
    """What to write: `bits` 8 (LLM.int8()) or 4 (`quant_type` nf4/fp4, optionally with
    double quantization of the block maxima); `compute_dtype` only goes into the config."""

    bits: int
    quant_type: str = "nf4"
    double_quant: bool = False
    compute_dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise WeightopsError(f"--bits {self.bits}: bitsandbytes checkpoints are 8-bit or 4-bit")
        if self.quant_type not in QUANT_TYPES:
            raise WeightopsError(f"--quant-type {self.quant_type!r}: choose one of {', '.join(QUANT_TYPES)}")

    def quantization_config(self, skip_modules: Sequence[str] | None = None) -> dict:
        """The `quantization_config` transformers writes into config.json for this spec
        (made by its own BitsAndBytesConfig, so the keys and defaults are its own)."""
        from transformers import BitsAndBytesConfig

        four_bit = {"bnb_4bit_quant_type": self.quant_type, "bnb_4bit_use_double_quant": self.double_quant}
        cfg = BitsAndBytesConfig(
            load_in_8bit=self.bits == 8,
            load_in_4bit=self.bits == 4,
            bnb_4bit_compute_dtype=self.compute_dtype,
            llm_int8_skip_modules=list(skip_modules) if skip_modules else None,
            **(four_bit if self.bits == 4 else {}),
        )  # 8-bit: its defaults, as users write it
        return cfg.to_dict()


def _functional():
    try:
        from bitsandbytes import functional
    except ImportError as e:
        raise WeightopsError(
            f"writing bitsandbytes checkpoints needs the bitsandbytes package (pip install 'bitsandbytes>=0.45'): {e}"
        ) from None
    return functional


def quantize_tensor(weight: torch.Tensor, spec: BnbSpec, nested_offset: float | None = None) -> Parts:
    """The state-dict entries bitsandbytes' Linear module saves for `weight`, computed on
    `weight`'s device. On a meta tensor this gives the shapes and dtypes only; with double
    quantization `nested_offset` then stands in for the mean that the data would give."""
    F = _functional()
    if spec.bits == 8:
        from bitsandbytes.utils import LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING

        cb, scb, _ = F.int8_vectorwise_quant(weight.contiguous().to(torch.float16))
        return {
            "weight": cb,
            "SCB": scb,
            "weight_format": torch.tensor(LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING["row"], dtype=torch.uint8),
        }
    packed, state = F.quantize_4bit(
        weight.contiguous(),
        blocksize=BLOCKSIZE,
        compress_statistics=spec.double_quant,
        quant_type=spec.quant_type,
        quant_storage=torch.uint8,
    )
    if weight.is_meta and state.nested:
        state.offset = torch.tensor(nested_offset, dtype=torch.float32)
    return {"weight": packed, **{f"weight.{k}": v for k, v in state.as_dict(packed=True).items()}}


def plan_tensor(shape: tuple[int, ...], dtype: torch.dtype, spec: BnbSpec, nested_offset: float | None = None) -> Parts:
    """Shapes and dtypes of `quantize_tensor`'s result (meta tensors), from bitsandbytes' own
    meta kernels, so nothing about its layout is re-typed here."""
    if spec.bits == 4 and spec.double_quant:
        # bitsandbytes caches its nested code map on the device of first use: make that the CPU, not meta
        quantize_tensor(torch.zeros(BLOCKSIZE), spec)
    return quantize_tensor(torch.empty(shape, dtype=dtype, device="meta"), spec, nested_offset)


def absmax_mean(weight: torch.Tensor, blocksize: int = BLOCKSIZE) -> float:
    """Mean of the per-block maxima of |weight| (float32), which `quantize_4bit` subtracts
    before double-quantizing them; the maxima are exact whatever computes them, and the mean
    is taken with the same torch reduction on the same device."""
    flat = weight.reshape(-1)
    full = flat.numel() // blocksize * blocksize
    maxima = flat[:full].view(-1, blocksize).abs().amax(dim=1).float()
    if full < flat.numel():
        maxima = torch.cat([maxima, flat[full:].abs().amax().float().clamp(min=1e-38).reshape(1)])
    return maxima.mean().item()


class _Quantized:
    """One weight, quantized once for the several tensors it becomes. The writer asks for
    them one after another; the result is dropped when the last has been taken."""

    def __init__(self, ref: TensorRef, spec: BnbSpec, device: torch.device, layout: Parts, nested_offset: float | None):
        self.ref, self.spec, self.device, self.layout, self.nested_offset = ref, spec, device, layout, nested_offset
        self._parts: Parts | None = None
        self._pending: set[str] = set()

    def take(self, suffix: str) -> torch.Tensor:
        if self._parts is None:
            weight = self.ref.load().to(self.device)
            self._parts = {k: v.cpu() for k, v in quantize_tensor(weight, self.spec).items()}
            del weight
            self.ref.release()
            self._check()
            self._pending = set(self._parts)
        tensor = self._parts[suffix]
        self._pending.discard(suffix)
        if not self._pending:
            self._parts = None
        return tensor

    def _check(self) -> None:
        assert self._parts is not None  # take() has just quantized the weight
        for k, v in self._parts.items():
            if tuple(v.shape) != tuple(self.layout[k].shape):
                raise WeightopsError(
                    f"{self.ref.source}: tensor {self.ref.name!r}: bitsandbytes' {k} has shape {tuple(v.shape)}, "
                    f"{tuple(self.layout[k].shape)} was planned (nested offset planned {self.nested_offset!r}); "
                    "nothing was published"
                )


def quantize_bnb(
    stream: Stream, spec: BnbSpec, select: Callable[[TensorRef], bool], device: torch.device | str = "cpu"
) -> Iterator[TensorRef]:
    """Replace every selected weight (`module.weight`) by the tensors of a quantized
    bitsandbytes Linear module; pass everything else through. Lazy: a weight is quantized
    when the writer first asks for one of its tensors."""
    device = torch.device(device)
    for ref in stream:
        if not select(ref):
            yield ref
            continue
        if len(ref.shape) != 2 or 0 in ref.shape or not ref.dtype.is_floating_point:
            raise WeightopsError(
                f"{shown(ref.source)}: tensor {ref.name!r} {ref.shape} {ref.dtype} is not a non-empty "
                "floating-point matrix; bitsandbytes quantizes linear weights only (use --skip to "
                "keep it)"
            )
        offset = None
        if spec.bits == 4 and spec.double_quant:
            offset = absmax_mean(ref.load().to(device))
            ref.release()
        layout = plan_tensor(ref.shape, ref.dtype, spec, offset)
        shared = _Quantized(ref, spec, device, layout, offset)
        module = ref.name.removesuffix(".weight")
        for suffix, t in layout.items():
            yield TensorRef(
                f"{module}.{suffix}",
                tuple(t.shape),
                dtypes.name_of(t.dtype),
                ref.source,
                loader=partial(shared.take, suffix),
                origin=ref.origin,
            )


def linear_weights(arch: ArchSpec) -> Callable[[TensorRef], bool]:
    """Matrices of the decoder layers (`*.weight` rows of the architecture table inside a
    layer): the modules transformers turns into bitsandbytes Linear layers."""

    def select(ref: TensorRef) -> bool:
        found = arch.lookup(ref.name, "hf")
        return found is not None and found[1] is not None and ref.name.endswith(".weight") and len(ref.shape) == 2

    return select
