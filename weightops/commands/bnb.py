"""bnb, and how its values become `pipelines.bnb.export_bnb`'s arguments (the CLI and a job's
fused unit call it alike)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import click

from .. import dtypes
from ..devices import DEVICES
from ..quant.bnb import QUANT_TYPES
from . import Params
from .common import force, path_argument, save_pretrained_shard_size

BNB: Params = (
    path_argument("model"),
    path_argument("output", exists=False),
    click.Option(
        ["--bits"],
        type=click.Choice(["8", "4"]),
        required=True,
        help="8: LLM.int8() (BitsAndBytesConfig(load_in_8bit=True)); 4: NF4/FP4 (load_in_4bit=True).",
    ),
    click.Option(
        ["--quant-type"],
        type=click.Choice(QUANT_TYPES),
        default="nf4",
        show_default=True,
        help="4-bit data type: nf4 (normal-float, QLoRA's choice, usually more accurate) or fp4. "
        "Note that BitsAndBytesConfig itself defaults to fp4. Ignored with --bits 8.",
    ),
    click.Option(
        ["--double-quant"],
        is_flag=True,
        help="4-bit only: quantize the block maxima too (bnb_4bit_use_double_quant). Reads each "
        "quantized weight twice: once to size its quant-state entry, once to quantize it.",
    ),
    click.Option(
        ["--compute-dtype"],
        type=click.Choice(list(dtypes.FLOAT_CHOICES)),
        default="float32",
        show_default=True,
        help="bnb_4bit_compute_dtype recorded in the config: the dtype 4-bit layers compute in after "
        "loading (BitsAndBytesConfig's default is float32; bfloat16 is faster on GPUs). Changes no "
        "stored tensor.",
    ),
    click.Option(
        ["--skip"],
        multiple=True,
        metavar="GLOB",
        help="Keep these linear weights unquantized too (shell globs on tensor names, repeatable), e.g. "
        "'*.mlp.down_proj.weight'. Recorded with lm_head in llm_int8_skip_modules so that loading "
        "keeps them. A glob that matches no linear weight is an error.",
    ),
    click.Option(
        ["--device"],
        type=click.Choice(DEVICES),
        default="auto",
        show_default=True,
        help="Where bitsandbytes quantizes: auto = CUDA if torch sees a GPU, else the CPU (bitsandbytes' "
        "CPU backend). The tensors are those transformers writes when it quantizes on the same kind "
        "of device.",
    ),
    save_pretrained_shard_size(),
    force(),
)


def export_arguments(values: Mapping[str, Any]) -> dict[str, Any]:
    """`export_bnb`'s keyword arguments from the bnb command's parsed values, OUTPUT included
    (MODEL is the caller's); --double-quant with --bits 8 is refused as a usage error."""
    if values["double_quant"] and values["bits"] == "8":
        raise click.UsageError("--double-quant applies to --bits 4 only")
    return {**{k: v for k, v in values.items() if k != "model"}, "bits": int(values["bits"])}
