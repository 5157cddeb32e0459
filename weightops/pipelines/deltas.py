"""`weightops apply-delta` / `make-delta`: checkpoints in, an HF checkpoint out, around the
stream operators of `ops.delta` (which join by name and hold only a pair in flight)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..errors import WeightopsError
from ..io.checkpoint import Checkpoint, open_checkpoint, save_hf
from ..io.outputs import Output
from ..ops import delta as ops_delta
from ..ops.delta import DeltaReport, _dtype_name
from ..stream import TensorRef

__all__ = ["DeltaReport", "apply_delta", "make_delta"]


def _open_hf(path: Path, label: str) -> Checkpoint:
    ckpt = open_checkpoint(path)
    if not ckpt.format.is_hf:
        raise WeightopsError(
            f"{label} {path} is a {ckpt.format} checkpoint; deltas join tensors by their Hugging "
            "Face names, so convert it to an HF directory first (weightops convert)"
        )
    return ckpt


def _config_update(aux: list[Path], dtype: torch.dtype | None) -> dict | None:
    """Record an explicit --dtype in config.json under the key it already uses."""
    cfg = next((f for f in aux if f.name == "config.json"), None)
    if dtype is None or cfg is None:
        return None
    keys = [k for k in ("dtype", "torch_dtype") if k in json.loads(cfg.read_text())]
    return {k: _dtype_name(dtype) for k in keys} or None


def apply_delta(
    base: Path,
    delta: Path,
    output: Path,
    *,
    dtype: torch.dtype | None = None,
    replace: Sequence[str] = (),
    force: bool = False,
    allow_suspicious: bool = False,
    max_shard_size: str | int = "5GB",
) -> DeltaReport:
    """Rebuild a released model from BASE and DELTA into OUTPUT (HF safetensors) with the
    delta's config and tokenizer files. `force` replaces an OUTPUT weightops wrote;
    `allow_suspicious` overrides the norm-weight guard rail."""
    report, _ = _combine(
        ops_delta.apply_delta, base, delta, "DELTA", output, dtype, replace, force, allow_suspicious, max_shard_size
    )
    return report


def make_delta(
    base: Path,
    target: Path,
    output: Path,
    *,
    dtype: torch.dtype | None = None,
    replace: Sequence[str] = (),
    force: bool = False,
    allow_suspicious: bool = False,
    max_shard_size: str | int = "5GB",
) -> DeltaReport:
    """Write TARGET − BASE into OUTPUT (HF safetensors) with the target's config and tokenizer
    files, and warn when the delta will not rebuild the target bit for bit. `force` and
    `allow_suspicious` as for `apply_delta`."""
    report, refs = _combine(
        ops_delta.make_delta, base, target, "TARGET", output, dtype, replace, force, allow_suspicious, max_shard_size
    )
    warning = report.round_trip_warning("/".join(sorted({_dtype_name(r.dtype) for r in refs})))
    if warning:
        report.warnings.append(warning)
    return report


def _combine(
    op: Callable[..., list[TensorRef]],
    base: Path,
    other: Path,
    label: str,
    output: Path,
    dtype: torch.dtype | None,
    replace: Sequence[str],
    force: bool,
    allow_suspicious: bool,
    max_shard_size: str | int,
) -> tuple[DeltaReport, list[TensorRef]]:
    """BASE and OTHER (the delta, or the target) through the stream operator `op` into OUTPUT,
    with OTHER's config and tokenizer files: apply and make differ only in `op` and the label."""
    b, o = _open_hf(Path(base), "BASE"), _open_hf(Path(other), label)
    target = Output(output, [b.path, o.path], kind="dir", force=force)
    report = DeltaReport()
    refs = op(
        b.tensors,
        o.tensors,
        dtype=dtype,
        replace=replace,
        allow_suspicious=allow_suspicious,
        labels=(f"BASE {b.path}", f"{label} {o.path}"),
        report=report,
    )
    report.files = save_hf(
        refs,
        target,
        aux_files=o.aux_files,
        max_shard_size=max_shard_size,
        config_update=_config_update(o.aux_files, dtype),
        desc="applying delta" if label == "DELTA" else "making delta",
    )
    return report, refs
