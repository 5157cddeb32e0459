"""merge-lora: merge LoRA adapters (PEFT or TencentPretrain) into a base model, streaming."""

from __future__ import annotations

from pathlib import Path

import click

from .. import dtypes
from ..pipelines.merge_lora import ROUNDINGS, merge_lora
from . import main, warn


def lora_options(rounding_flag: str = "--rounding"):
    """The options every command that merges adapters takes (merge-lora, gguf --lora)."""
    return lambda fn: _lora_options(fn, rounding_flag)


def _lora_options(fn, rounding_flag: str):
    fn = click.option(
        "--tp-lora-alpha",
        type=float,
        help="lora_alpha of a TencentPretrain adapter (its --lora_alpha when trained; the file has no config).",
    )(fn)
    fn = click.option(
        "--tp-lora-r",
        type=click.IntRange(min=1),
        help="Rank of a TencentPretrain adapter (its --lora_r; must match the factors' shapes).",
    )(fn)
    fn = click.option(
        rounding_flag,
        "rounding",
        type=click.Choice(ROUNDINGS),
        default="once",
        show_default=True,
        help="once: W + scaling * B @ A in float32, rounded once (the Chinese-LLaMA merge scripts); "
        "peft: bit for bit what PEFT's merge_and_unload gives on CPU, adapter after adapter.",
    )(fn)
    return fn


@main.command(
    "merge-lora",
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
@click.argument("base", type=click.Path(exists=True, path_type=Path))
@click.argument("adapters", nargs=-1, required=True, metavar="ADAPTER...", type=click.Path(exists=True, path_type=Path))
@click.argument("output", type=click.Path(path_type=Path))
@click.option(
    "--dtype",
    type=click.Choice(dtypes.DTYPE_CHOICES),
    default="auto",
    show_default=True,
    help="dtype of the written tensors (auto: each keeps BASE's).",
)
@lora_options()
@click.option(
    "--max-shard-size",
    default="5GB",
    show_default=True,
    help="Largest output shard (decimal KB/MB/GB or binary KiB/MiB/GiB), as save_pretrained shards.",
)
@click.option(
    "--force",
    is_flag=True,
    help="Replace an existing OUTPUT that weightops wrote (it says what it removes); anything else at "
    "OUTPUT is refused.",
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
