"""merge-lora: merge LoRA adapters (PEFT or TencentPretrain) into a base model, streaming."""

from __future__ import annotations

from pathlib import Path

import click

from .. import dtypes
from ..commands.merge_lora import MERGE_LORA
from ..pipelines.merge_lora import merge_lora
from . import main, warn


@main.command(
    "merge-lora",
    params=list(MERGE_LORA),
    help="""Merge LoRA adapters into BASE: OUTPUT = BASE + each ADAPTER in turn.

    BASE is an HF directory (safetensors or .bin, sharded or not) or a TencentPretrain
    checkpoint. Each ADAPTER is a PEFT directory (adapter_config.json and
    adapter_model.safetensors or .bin) or a TencentPretrain LoRA .bin (with --tp-lora-r and
    --tp-lora-alpha). Adapters apply in the order given, each to the result of the ones
    before, in one pass that holds one tensor (and the small adapters) in memory. OUTPUT is a
    Hugging Face directory (sharded safetensors) with BASE's config and the tokenizer of the
    last adapter directory that has one (else BASE's).

    \b
    PEFT features: r and lora_alpha with rank_pattern / alpha_pattern, use_rslora,
    fan_in_fan_out, target_modules / exclude_modules / layers_to_transform, bias and lora_bias,
    LoRA on embeddings, DoRA, modules_to_save (whole tensors, which may add vocabulary rows:
    config.json's vocab_size follows). A tied output head is untied when an adapter changes
    the embedding or the head (config.json says so). Anything that does not fit (a module BASE
    lacks, a shape, another architecture, an unsupported PEFT feature) is refused with every
    problem listed, and nothing is written.

    \b
    Examples:
      weightops merge-lora llama-7b-hf chinese-llama-plus-lora-7b chinese-alpaca-plus-lora-7b \\
          chinese-alpaca-plus-7b --dtype float16
      weightops merge-lora llama-7b-tp.bin lora.bin merged --tp-lora-r 8 --tp-lora-alpha 16
""",
)
def merge_lora_command(
    base: Path,
    adapters: tuple[Path, ...],
    output: Path,
    dtype: str,
    rounding: str,
    tp_lora_r: int | None,
    tp_lora_alpha: float | None,
    max_shard_size: str,
    force: bool,
) -> None:
    report = merge_lora(
        base,
        adapters,
        output,
        dtype=dtypes.from_choice(dtype),
        rounding=rounding,
        tp_lora_r=tp_lora_r,
        tp_lora_alpha=tp_lora_alpha,
        max_shard_size=max_shard_size,
        force=force,
    )
    for w in report.warnings:
        warn(w)
    extra = [f"{len(report.merged)} tensors merged"]
    if report.replaced:
        extra.append(f"{len(set(report.replaced))} carried whole")
    if report.vocab:
        extra.append(f"vocabulary {report.vocab[0]} -> {report.vocab[1]} rows")
    if report.untied:
        extra.append("output head untied")
    click.echo(f"wrote {output} ({len(report.files)} files; {len(report.adapters)} adapter(s)): {', '.join(extra)}")
