"""bnb: write a pre-quantized bitsandbytes checkpoint (int8, nf4, fp4) one tensor at a time."""

from __future__ import annotations

from pathlib import Path

import click

from .. import dtypes
from ..devices import DEVICES
from ..pipelines.bnb import export_bnb
from ..quant.bnb import QUANT_TYPES
from . import main


@main.command(
    "bnb",
    help="""Quantize MODEL into OUTPUT, a bitsandbytes checkpoint that
    `AutoModelForCausalLM.from_pretrained(OUTPUT)` loads as an 8-bit or 4-bit model with no
    extra arguments (needs bitsandbytes and accelerate at load time).

    Loading with `BitsAndBytesConfig` quantizes on every start and needs the whole model in
    memory first; this writes, one tensor at a time, the very file transformers saves after
    such a load (`save_pretrained`): the same tensor names, dtypes and values, and the same
    `quantization_config` in config.json. bitsandbytes' own functions do the arithmetic, on
    CUDA when present (see --device) and on its CPU backend otherwise.

    \b
    What is quantized: the linear weights of the decoder layers (LLaMA q/k/v/o, gate/up/down;
    BLOOM query_key_value, dense, dense_h_to_4h, dense_4h_to_h). The embedding, norms, biases
    and lm_head are kept, as transformers keeps them; --skip keeps more. Tensors are first cast
    to the model's dtype (config.json `dtype`), as from_pretrained does.
      --bits 8   LLM.int8(): per-row absmax int8 weight + `SCB` scales (+ `weight_format`).
      --bits 4   4-bit blocks of 64 values: packed `weight` + `absmax`, `quant_map` and the
                 JSON quant state; --double-quant also quantizes the block maxima (8-bit,
                 blocks of 256: `nested_absmax`, `nested_quant_map`), saving ~0.37 bit/param.

    \b
    Examples:
      weightops bnb llama-7b-hf llama-7b-int8 --bits 8
      weightops bnb llama-7b-hf llama-7b-nf4 --bits 4 --double-quant --compute-dtype bfloat16
      weightops bnb bloom-7b1 bloom-int8 --bits 8 --skip 'transformer.h.0.*'
""",
)
@click.argument("model", type=click.Path(exists=True, path_type=Path))
@click.argument("output", type=click.Path(path_type=Path))
@click.option(
    "--bits",
    type=click.Choice(["8", "4"]),
    required=True,
    help="8: LLM.int8() (BitsAndBytesConfig(load_in_8bit=True)); 4: NF4/FP4 (load_in_4bit=True).",
)
@click.option(
    "--quant-type",
    type=click.Choice(QUANT_TYPES),
    default="nf4",
    show_default=True,
    help="4-bit data type: nf4 (normal-float, QLoRA's choice, usually more accurate) or fp4. "
    "Note that BitsAndBytesConfig itself defaults to fp4. Ignored with --bits 8.",
)
@click.option(
    "--double-quant",
    is_flag=True,
    help="4-bit only: quantize the block maxima too (bnb_4bit_use_double_quant). Reads each "
    "quantized weight twice: once to size its quant-state entry, once to quantize it.",
)
@click.option(
    "--compute-dtype",
    type=click.Choice(list(dtypes.FLOAT_CHOICES)),
    default="float32",
    show_default=True,
    help="bnb_4bit_compute_dtype recorded in the config: the dtype 4-bit layers compute in after "
    "loading (BitsAndBytesConfig's default is float32; bfloat16 is faster on GPUs). Changes no "
    "stored tensor.",
)
@click.option(
    "--skip",
    multiple=True,
    metavar="GLOB",
    help="Keep these linear weights unquantized too (shell globs on tensor names, repeatable), e.g. "
    "'*.mlp.down_proj.weight'. Recorded with lm_head in llm_int8_skip_modules so that loading "
    "keeps them. A glob that matches no linear weight is an error.",
)
@click.option(
    "--device",
    type=click.Choice(DEVICES),
    default="auto",
    show_default=True,
    help="Where bitsandbytes quantizes: auto = CUDA if torch sees a GPU, else the CPU (bitsandbytes' "
    "CPU backend). The tensors are those transformers writes when it quantizes on the same kind "
    "of device.",
)
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
def bnb(
    model: Path,
    output: Path,
    bits: str,
    quant_type: str,
    double_quant: bool,
    compute_dtype: str,
    skip: tuple[str, ...],
    device: str,
    max_shard_size: str,
    force: bool,
) -> None:
    if double_quant and bits == "8":
        raise click.UsageError("--double-quant applies to --bits 4 only")
    report = export_bnb(
        model,
        output,
        bits=int(bits),
        quant_type=quant_type,
        double_quant=double_quant,
        compute_dtype=compute_dtype,
        skip=skip,
        device=device,
        max_shard_size=max_shard_size,
        force=force,
    )
    kind = "int8" if bits == "8" else quant_type + (" double-quant" if double_quant else "")
    kept = f", {len(report.skipped)} kept by --skip" if report.skipped else ""
    click.echo(
        f"wrote {output}: {len(report.quantized)} linear weights as {kind} on {report.device}{kept} "
        f"({len(report.files)} files)"
    )
