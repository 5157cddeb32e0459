"""gguf, and how its values become `pipelines.gguf.export_gguf_matrix`'s arguments (the CLI
and a job's fused unit call it alike)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click

from ..devices import DEVICES
from ..pipelines.gguf import QUALITIES
from ..quant.ggml_types import FILE_TYPE_NAMES, FILE_TYPES, NAMES, VIA_NAMES
from . import Params
from .common import force, path_argument, tp_config
from .merge_lora import lora_options

CONVERTER_TYPES = "/".join(f.name for f in FILE_TYPES if not f.quantizer)
QUANTIZER_TYPES = "/".join(f.name for f in FILE_TYPES if f.quantizer)
_QUANTIZER_SPAN = " ... ".join(QUANTIZER_TYPES.split("/")[:: len(QUANTIZER_TYPES.split("/")) - 1])  # first ... last
_LORA = ("rounding", "tp_lora_r", "tp_lora_alpha")  # lora_options' parameter names

GGUF: Params = (
    path_argument("model"),
    click.Argument(["output"], type=click.Path()),
    click.Option(
        ["--type", "qtype"],
        type=click.Choice(FILE_TYPE_NAMES, case_sensitive=False),
        multiple=True,
        default=["f16"],
        show_default=True,
        help="File type: the 2-D weights' type, or one of llama-quantize's mixes (see above). Repeat it for a "
        "matrix: OUTPUT is then a directory with one file per type.",
    ),
    click.Option(
        ["--pure"],
        is_flag=True,
        help=f"With a llama-quantize --type ({_QUANTIZER_SPAN}): every 2-D weight in the mix's base type, no "
        "mix rules "
        "(= llama-quantize --pure).",
    ),
    click.Option(
        ["--tensor-type", "tensor_types"],
        multiple=True,
        metavar="GLOB=TYPE",
        help="Type of matching tensors (GGUF names, shell globs; repeatable, the first match wins, as in "
        "llama-quantize), e.g. 'blk.*.ffn_down.weight=q8_0' or 'output.weight=f16'.",
    ),
    click.Option(
        ["--output-tensor-type"],
        type=click.Choice(NAMES, case_sensitive=False),
        help="Type of output.weight (of token_embd when the embeddings are tied), before any other rule "
        "(= llama-quantize --output-tensor-type).",
    ),
    click.Option(
        ["--token-embedding-type"],
        type=click.Choice(NAMES, case_sensitive=False),
        help="Type of token_embd.weight, before any other rule (= llama-quantize --token-embedding-type).",
    ),
    click.Option(
        ["--via"],
        type=click.Choice(VIA_NAMES, case_sensitive=False),
        help=f"With a llama-quantize --type ({_QUANTIZER_SPAN}): round the weights to this type first, to "
        "reproduce byte for byte a file made the two-pass way (convert to F16/BF16, then llama-quantize). "
        "Default: quantize from the source values (= llama-quantize on an F32 file).",
    ),
    click.Option(
        ["--imatrix"],
        metavar="FILE",
        type=click.Path(exists=True, dir_okay=False),
        help=f"With a llama-quantize --type ({_QUANTIZER_SPAN}): an importance matrix (weightops imatrix or "
        "llama-imatrix, GGUF or .dat): weighted quantization, its type rules and its quantize.imatrix.* "
        "metadata, byte for byte as llama-quantize --imatrix FILE. Tensors without an entry are quantized "
        "unweighted; an entry whose size does not fit the model is refused.",
    ),
    click.Option(
        ["--quality"],
        type=click.Choice(QUALITIES),
        default="reference",
        show_default=True,
        help="Quantization rounding: 'reference' is llama.cpp's own (bit-identical blocks).",
    ),
    click.Option(
        ["--device"],
        type=click.Choice(DEVICES),
        default="auto",
        show_default=True,
        help="Where the quantization kernels run: auto = CUDA when available, else CPU. The bytes are the same "
        "either way.",
    ),
    click.Option(
        ["--tokenizer"],
        type=click.Path(exists=True, path_type=Path),
        help="Directory with the HF tokenizer files (default: MODEL's directory). Needed for "
        "TencentPretrain checkpoints, which carry no tokenizer.",
    ),
    click.Option(
        ["--pre-tokenizer"],
        metavar="NAME",
        help="llama.cpp pre-tokenizer name for a BPE tokenizer (e.g. bloom, gpt-2, llama-bpe); default: "
        "recognised as llama.cpp does, else from tokenizer.json or the architecture.",
    ),
    tp_config("TencentPretrain model config JSON, for a TencentPretrain MODEL."),
    click.Option(
        ["--lora"],
        multiple=True,
        metavar="ADAPTER",
        type=click.Path(exists=True, path_type=Path),
        help="Merge this LoRA adapter on the way, as merge-lora does (repeatable, applied in order); "
        "no merged checkpoint is written.",
    ),
    *lora_options("--lora-rounding"),
    click.Option(
        ["--split-max-size"],
        metavar="SIZE",
        help="Write a split set OUTPUT-00001-of-0000N.gguf ... whose files hold at most SIZE bytes of tensor data "
        "each (bytes, or a whole number of K, M or G: decimal, 1G = 10^9; metadata not counted; a larger tensor "
        "gets a file of its own), laid out as convert_hf_to_gguf.py --split-max-size lays it out.",
    ),
    click.Option(
        ["--split-max-tensors"],
        type=click.IntRange(min=1),
        metavar="N",
        help="Write a split set whose files hold at most N tensors each (= convert_hf_to_gguf.py --split-max-tensors).",
    ),
    click.Option(
        ["--resume"],
        is_flag=True,
        help="Continue the temporary a killed run of the same command left (tensors whose bytes match its "
        "journal are kept); without it such a temporary is removed.",
    ),
    force(),
)


def export_arguments(values: Mapping[str, Any]) -> dict[str, Any]:
    """`export_gguf_matrix`'s keyword arguments from the gguf command's parsed values: every
    option but --type (the caller turns MODEL, OUTPUT and the types into the matrix's outputs)."""
    options = {k: v for k, v in values.items() if k not in {"model", "output", "qtype", *_LORA}}
    return {**options, "lora_options": {k: values[k] for k in _LORA}}
