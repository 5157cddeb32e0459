"""merge-lora, and the adapter options gguf --lora shares."""

from __future__ import annotations

from pathlib import Path

import click

from .. import dtypes
from ..pipelines.merge_lora import ROUNDINGS
from . import Params
from .common import force, path_argument, save_pretrained_shard_size


def lora_options(rounding_flag: str = "--rounding") -> Params:
    """The options every command that merges adapters takes (merge-lora, gguf --lora)."""
    return (
        click.Option(
            [rounding_flag, "rounding"],
            type=click.Choice(ROUNDINGS),
            default="once",
            show_default=True,
            help="once: W + scaling * B @ A in float32, rounded once (the Chinese-LLaMA merge scripts); "
            "peft: bit for bit what PEFT's merge_and_unload gives on CPU, adapter after adapter.",
        ),
        click.Option(
            ["--tp-lora-r"],
            type=click.IntRange(min=1),
            help="Rank of a TencentPretrain adapter (its --lora_r; must match the factors' shapes).",
        ),
        click.Option(
            ["--tp-lora-alpha"],
            type=float,
            help="lora_alpha of a TencentPretrain adapter (its --lora_alpha when trained; the file has no config).",
        ),
    )


MERGE_LORA: Params = (
    path_argument("base"),
    click.Argument(
        ["adapters"], nargs=-1, required=True, metavar="ADAPTER...", type=click.Path(exists=True, path_type=Path)
    ),
    path_argument("output", exists=False),
    click.Option(
        ["--dtype"],
        type=click.Choice(dtypes.DTYPE_CHOICES),
        default="auto",
        show_default=True,
        help="dtype of the written tensors (auto: each keeps BASE's).",
    ),
    *lora_options(),
    save_pretrained_shard_size(),
    force(),
)
