"""`weightops convert`: TencentPretrain <-> Hugging Face, both ways, streaming."""

from __future__ import annotations

from pathlib import Path

import click

from .. import dtypes
from ..commands.convert import CONVERT
from ..pipelines.convert import convert_checkpoint
from . import main, warn


@main.command("convert", params=list(CONVERT))
def convert_cmd(
    input: Path,
    output: Path,
    to: str,
    arch: str | None,
    tp_config: Path | None,
    tokenizer: Path | None,
    dtype: str,
    max_shard_size: str | None,
    force: bool,
) -> None:
    """Convert between TencentPretrain and Hugging Face checkpoints (LLaMA incl. GQA, BLOOM).

    \b
    INPUT: a TencentPretrain .bin file or sharded directory, or an HF directory
    (safetensors or .bin, sharded or not). OUTPUT: a directory.

    \b
    Only names change, except
      * LLaMA q/k rows: HF's rotate-half order <-> TencentPretrain's interleaved pairs, per
        head (k with the key/value head count);
      * BLOOM's fused query_key_value <-> TencentPretrain's three attention linears.
    Every tensor is bit-identical otherwise, so HF -> TP -> HF returns the same bits.

    \b
    To hf: config.json (vocab_size = embedding rows, num_key_value_heads, rms_norm_eps =
    layernorm_eps or TencentPretrain's 1e-6 default, tie_word_embeddings when the checkpoint
    has no separate output layer), generation_config.json and tokenizer files, so that
    AutoTokenizer / AutoModelForCausalLM.from_pretrained(OUTPUT) work. Sizes are read from the
    tensors; head counts need --tp-config.
    To tencentpretrain: the state dict, tencentpretrain_config.json (pass it as
    --config_path) and the tokenizer files (tokenizer.model is --spm_model_path).

    Unknown or missing tensors are errors listing them: TencentPretrain itself loads with
    strict=False and would ignore them silently. One tensor is in memory at a time.
    """
    report = convert_checkpoint(
        input,
        output,
        to=to,
        arch=arch,
        tp_config=tp_config,
        tokenizer=tokenizer,
        dtype=dtypes.from_choice(dtype),
        max_shard_size=max_shard_size,
        force=force,
    )
    for w in report.warnings:
        warn(w)
    click.echo(
        f"wrote {output}: {report.architecture}, {report.tensors} tensors, {len(report.files)} files"
        + (f", tokenizer from {report.tokenizer}" if report.tokenizer else ", no tokenizer")
    )
