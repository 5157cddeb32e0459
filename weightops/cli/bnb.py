"""bnb: write a pre-quantized bitsandbytes checkpoint (int8, nf4, fp4) one tensor at a time."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ..commands.bnb import BNB, export_arguments
from ..pipelines.bnb import export_bnb
from . import main


@main.command(
    "bnb",
    params=list(BNB),
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
def bnb(model: Path, output: Path, bits: str, quant_type: str, double_quant: bool, **_: Any) -> None:
    report = export_bnb(model, **export_arguments(click.get_current_context().params))
    kind = "int8" if bits == "8" else quant_type + (" double-quant" if double_quant else "")
    kept = f", {len(report.skipped)} kept by --skip" if report.skipped else ""
    click.echo(
        f"wrote {output}: {len(report.quantized)} linear weights as {kind} on {report.device}{kept} "
        f"({len(report.files)} files)"
    )
