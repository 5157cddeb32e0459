"""Several exports of one HF checkpoint from one read: a GGUF matrix (`pipelines.gguf`) and
bitsandbytes checkpoints (`pipelines.bnb`), each output byte for byte its own run's.

Every output is planned first, from a `SharedRead` of the checkpoint's tensors (headers and
offsets known before any data), and every temporary opened. Then the source tensors are
walked once, in checkpoint order: for each, the GGUF tensors computed from it (each encoding
once for every file that has it, as the matrix does), then each bnb output's tensors computed
from it, written at their planned offsets (`io.hf.HFWeights`); then it is released. A tensor
some output has that no source tensor feeds (none in practice) is written at the end. Each
output is published when the pass ends.

One exception to the single read: a 4-bit bnb output with double quantization sizes its
quant states before its header can be written, which reads each of its quantized weights
once during planning (`quant.bnb`); the pass proper then reads them again, once for all
outputs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .. import progress
from ..errors import WeightopsError
from ..io.checkpoint import open_checkpoint
from ..io.hf import HFWeights
from ..stream import SharedRead, TensorRef
from .bnb import BnbPlan, BnbReport, plan_bnb
from .gguf import GGUFMatrix, GGUFReport, GGUFVariant, plan_gguf_matrix


@dataclass
class FusedReport:
    gguf: list[GGUFReport] = field(default_factory=list)
    bnb: list[BnbReport] = field(default_factory=list)


def export_fused(
    model: str | Path,
    gguf_outputs: str | Path | Sequence[str | Path] = (),
    gguf_types: Sequence[str | GGUFVariant] = (),
    gguf_options: dict[str, Any] | None = None,
    bnb: Sequence[dict[str, Any]] = (),
    warn: Callable[[str], None] | None = None,
) -> FusedReport:
    """Write, from one read of `model` (an HF checkpoint), the GGUF files of
    `export_gguf_matrix(model, gguf_outputs, gguf_types, warn=warn, **gguf_options)` (none when
    `gguf_types` is empty) and, for each entry of `bnb`, `export_bnb(model, **entry)` (its
    keyword arguments, `output` included). Options that change the tensors the GGUF side reads
    (`lora`, `tp_config`) are refused: every output reads the checkpoint's tensors as they are.
    Each file of each output is the one its own run writes."""
    options = dict(gguf_options or {})
    changes = [k for k in ("lora", "tp_config") if options.get(k)]
    if changes:
        raise WeightopsError(
            f"a fused export reads the tensors of {model} as they are; "
            f"{', '.join('--' + k.replace('_', '-') for k in changes)} change what the GGUF export reads"
        )
    if not gguf_types and not bnb:
        raise WeightopsError("nothing to export: no GGUF type and no bitsandbytes output")
    ckpt = open_checkpoint(model)
    shared = SharedRead(ckpt.tensors)
    view = replace(ckpt, tensors=shared.refs)
    matrix = plan_gguf_matrix(view, gguf_outputs, gguf_types, warn=warn, **options) if gguf_types else None
    plans = [plan_bnb(view, **entry) for entry in bnb]
    shared.release()  # the last weight a double-quant sizing pass read
    with contextlib.ExitStack() as stack:
        if matrix is not None:
            stack.enter_context(matrix.writing())
        writers = [stack.enter_context(plan.writing()) for plan in plans]
        _pass(shared, matrix, list(zip(plans, writers, strict=True)))
    return FusedReport(matrix.reports() if matrix is not None else [], [p.report for p in plans])


def _pass(shared: SharedRead, matrix: GGUFMatrix | None, bnb: list[tuple[BnbPlan, HFWeights]]) -> None:
    """Each source tensor once: what every output computes from it, then it is released."""
    gguf_refs = _by_origin(matrix.refs if matrix is not None else [])
    bnb_refs = [_by_origin(plan.refs) for plan, _ in bnb]
    total = (matrix.remaining() if matrix is not None else 0) + sum(r.nbytes for p, _ in bnb for r in p.refs)
    desc = " + ".join(([matrix.desc] if matrix is not None else []) + [p.desc for p, _ in bnb])
    order: list[str | None] = [r.name for r in shared.sources]
    known = set(order)
    order += [o for o in dict.fromkeys([*gguf_refs, *(o for g in bnb_refs for o in g)]) if o not in known]
    with progress.bar(total, desc) as bar:
        for origin in order:  # the checkpoint's order, then what no source tensor feeds
            if matrix is not None:
                for ref in gguf_refs.pop(origin, []):
                    bar.update(matrix.put(ref))
            for (_, weights), refs in zip(bnb, bnb_refs, strict=True):
                for ref in refs.pop(origin, []):
                    weights.put(ref, ref.load())
                    ref.release()
                    bar.update(ref.nbytes)
            shared.release()


def _by_origin(refs: list[TensorRef]) -> dict[str | None, list[TensorRef]]:
    """A consumer's tensors grouped by the source tensor each is computed from, in its order."""
    groups: dict[str | None, list[TensorRef]] = {}
    for ref in refs:
        groups.setdefault(ref.origin, []).append(ref)
    return groups
