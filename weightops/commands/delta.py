"""apply-delta and make-delta."""

from __future__ import annotations

import click

from .. import dtypes
from . import Params
from .common import force, path_argument, save_pretrained_shard_size


def _options() -> Params:
    return (
        click.Option(
            ["--dtype"],
            type=click.Choice(dtypes.DTYPE_CHOICES),
            default="auto",
            show_default=True,
            help="dtype of the written tensors; the arithmetic is float32 either way.",
        ),
        click.Option(
            ["--replace", "replace"],
            multiple=True,
            metavar="GLOB",
            help="Tensor names (shell globs, repeatable) carried whole instead of as differences, "
            "e.g. '*embed_tokens*', 'lm_head*', '*rotary_emb.inv_freq'. A glob that matches "
            "nothing is an error.",
        ),
        save_pretrained_shard_size(),
        force(),
        click.Option(
            ["--allow-suspicious-delta"],
            is_flag=True,
            help="Go on even when the norm-weight guard rail says the inputs do not look like a model "
            "and its delta (see above).",
        ),
    )


APPLY_DELTA: Params = (
    path_argument("base"),
    path_argument("delta"),
    path_argument("output", exists=False),
    *_options(),
)
MAKE_DELTA: Params = (
    path_argument("base"),
    path_argument("target"),
    path_argument("output", exists=False),
    *_options(),
)
