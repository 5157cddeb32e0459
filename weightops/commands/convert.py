"""convert."""

from __future__ import annotations

from pathlib import Path

import click

from .. import dtypes
from ..arch import supported
from ..pipelines.convert import TARGETS
from . import Params
from .common import force, path_argument, tp_config

CONVERT: Params = (
    path_argument("input"),
    path_argument("output", exists=False),
    click.Option(
        ["--to", "to"],
        type=click.Choice(TARGETS),
        required=True,
        help="Format to write: hf (a from_pretrained directory) or tencentpretrain (a TencentPretrain "
        "state dict plus its model config json).",
    ),
    click.Option(
        ["--arch"],
        type=click.Choice(supported(tencentpretrain=True)),
        help="Architecture, when the tensor names (TencentPretrain) or config.json (HF) do not tell it.",
    ),
    tp_config(
        "TencentPretrain model config json of INPUT (e.g. models/llama/7b_config.json): the source of "
        "heads_num and local_kv_heads_num (GQA), which no tensor shape tells; sizes it states are "
        "checked against the tensors. Default: tencentpretrain_config.json beside INPUT, if any."
    ),
    click.Option(
        ["--tokenizer"],
        type=click.Path(exists=True, path_type=Path),
        help="Tokenizer to ship with OUTPUT. To hf: a SentencePiece tokenizer.model (LLaMA; HF tokenizer "
        "files are generated from it) or an HF tokenizer directory (BLOOM, or LLaMA). To "
        "tencentpretrain: a tokenizer.model or directory to copy. Default: the tokenizer files "
        "beside INPUT.",
    ),
    click.Option(
        ["--dtype"],
        type=click.Choice(dtypes.DTYPE_CHOICES),
        default="auto",
        show_default=True,
        help="dtype of the written floating-point tensors; auto keeps each tensor's own (bit-exact).",
    ),
    click.Option(
        ["--max-shard-size"],
        default=None,
        help="Largest output file (decimal KB/MB/GB or binary KiB/MiB/GiB). To hf: safetensors shards, "
        "default 5GB. To tencentpretrain: default one tencentpretrain_model.bin; when set and "
        "exceeded, tencentpretrain_model-N.bin parts plus tencentpretrain_model.bin.index.json.",
    ),
    force(),
)
