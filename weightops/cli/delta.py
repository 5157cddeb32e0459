"""apply-delta and make-delta: rebuild a model released as `target − base`, or make such a delta."""

from __future__ import annotations

from pathlib import Path

import click

from .. import dtypes
from ..commands.delta import APPLY_DELTA, MAKE_DELTA
from ..pipelines import deltas
from ..pipelines.deltas import DeltaReport
from . import main, warn

_SEMANTICS = """
    Tensors are matched by NAME, never by file or shard position, so the two inputs may
    be sharded differently and stored in different formats (safetensors or .bin, single
    or sharded). Each tensor is computed in float32 and rounded once to --dtype; only the
    tensors in flight are in memory, never a whole model.

    \b
    Conventions:
      * expanded vocabulary: when the {other}'s embedding / lm_head has more rows than the
        base's (e.g. Chinese-LLaMA 49953 vs 32000), the first rows are differences and the
        extra rows are stored as they are (the early Vicuna "zero-padded base" convention);
      * --replace GLOB: tensors the delta carries whole instead of as differences (Ziya-style
        deltas: --replace '*embed_tokens*' --replace 'lm_head*');
      * any other shape mismatch, a tensor on one side only, or tied vs untied embeddings is
        an error naming the tensor, both shapes and both files (nothing is dropped silently);
      * guard rail: if the norm weights (RMSNorm/LayerNorm gains) of the difference are as
        large as the base's, the inputs are not a model and its fine-tune (a full model given
        as the delta, a delta already applied, the wrong base); refused unless
        --allow-suspicious-delta.
"""


def _finish(output: Path, report: DeltaReport) -> None:
    for w in report.warnings:
        warn(w)
    extra = []
    if report.expanded:
        extra.append(f"vocabulary rows added in {', '.join(report.expanded)}")
    if report.replaced:
        extra.append(f"{len(report.replaced)} tensors carried whole")
    click.echo(f"wrote {output} ({len(report.files)} files)" + (f"; {'; '.join(extra)}" if extra else ""))


@main.command(
    "apply-delta",
    params=list(APPLY_DELTA),
    help=f"""Rebuild a model released as a delta: OUTPUT = BASE + DELTA.

    BASE is the original model (e.g. LLaMA-7B in HF format), DELTA the published difference
    (e.g. ChatYuan-7B). OUTPUT is a Hugging Face directory (sharded safetensors) with the
    delta's config and tokenizer files, loadable with from_pretrained as it is.
    --dtype auto keeps each tensor in the delta's dtype. On float16 inputs the result is
    bit for bit what the reference scripts' in-place `param += delta` gives.
{_SEMANTICS.format(other="delta")}
    \b
    Example:
      weightops apply-delta llama-7b-hf chatyuan-7b-delta chatyuan-7b --dtype float16
""",
)
def apply_delta(
    base: Path,
    delta: Path,
    output: Path,
    dtype: str,
    replace: tuple[str, ...],
    max_shard_size: str,
    force: bool,
    allow_suspicious_delta: bool,
) -> None:
    report = deltas.apply_delta(
        base,
        delta,
        output,
        dtype=dtypes.from_choice(dtype),
        replace=replace,
        force=force,
        allow_suspicious=allow_suspicious_delta,
        max_shard_size=max_shard_size,
    )
    _finish(output, report)


@main.command(
    "make-delta",
    params=list(MAKE_DELTA),
    help=f"""Publish a fine-tune as a delta: OUTPUT = TARGET - BASE.

    OUTPUT is a Hugging Face directory with the target's config and tokenizer files;
    `weightops apply-delta BASE OUTPUT REBUILT` gives TARGET back. --dtype auto keeps each
    tensor in the target's dtype; a 16-bit delta usually does not rebuild the target
    exactly, and a warning says for what fraction of elements. A --dtype float32 delta,
    applied with --dtype set to the target's dtype, rebuilds a bf16/fp16 target bit for bit.
{_SEMANTICS.format(other="target")}
    \b
    Example:
      weightops make-delta llama-7b-hf my-finetune my-finetune-delta --dtype float32
""",
)
def make_delta(
    base: Path,
    target: Path,
    output: Path,
    dtype: str,
    replace: tuple[str, ...],
    max_shard_size: str,
    force: bool,
    allow_suspicious_delta: bool,
) -> None:
    report = deltas.make_delta(
        base,
        target,
        output,
        dtype=dtypes.from_choice(dtype),
        replace=replace,
        force=force,
        allow_suspicious=allow_suspicious_delta,
        max_shard_size=max_shard_size,
    )
    _finish(output, report)
