"""`weightops convert`: TencentPretrain <-> Hugging Face, both ways, streaming."""

from __future__ import annotations

from pathlib import Path

import click

from .. import dtypes
from ..arch import supported
from ..pipelines.convert import TARGETS, convert_checkpoint
from . import main, warn


@main.command("convert")
@click.argument("input", type=click.Path(exists=True, path_type=Path))
@click.argument("output", type=click.Path(path_type=Path))
@click.option(
    "--to",
    "to",
    type=click.Choice(TARGETS),
    required=True,
    help="Format to write: hf (a from_pretrained directory) or tencentpretrain (a TencentPretrain "
    "state dict plus its model config json).",
)
@click.option(
    "--arch",
    type=click.Choice(supported(tencentpretrain=True)),
    help="Architecture, when the tensor names (TencentPretrain) or config.json (HF) do not tell it.",
)
@click.option(
    "--tp-config",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="TencentPretrain model config json of INPUT (e.g. models/llama/7b_config.json): the source of "
    "heads_num and local_kv_heads_num (GQA), which no tensor shape tells; sizes it states are "
    "checked against the tensors. Default: tencentpretrain_config.json beside INPUT, if any.",
)
@click.option(
    "--tokenizer",
    type=click.Path(exists=True, path_type=Path),
    help="Tokenizer to ship with OUTPUT. To hf: a SentencePiece tokenizer.model (LLaMA; HF tokenizer "
    "files are generated from it) or an HF tokenizer directory (BLOOM, or LLaMA). To "
    "tencentpretrain: a tokenizer.model or directory to copy. Default: the tokenizer files "
    "beside INPUT.",
)
@click.option(
    "--dtype",
    type=click.Choice(dtypes.DTYPE_CHOICES),
    default="auto",
    show_default=True,
    help="dtype of the written floating-point tensors; auto keeps each tensor's own (bit-exact).",
)
@click.option(
    "--max-shard-size",
    default=None,
    help="Largest output file (decimal KB/MB/GB or binary KiB/MiB/GiB). To hf: safetensors shards, "
    "default 5GB. To tencentpretrain: default one tencentpretrain_model.bin; when set and "
    "exceeded, tencentpretrain_model-N.bin parts plus tencentpretrain_model.bin.index.json.",
)
@click.option(
    "--force",
    is_flag=True,
    help="Replace an existing OUTPUT that weightops wrote (it says what it removes); anything else at "
    "OUTPUT is refused.",
)
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
