"""expand-vocab."""

from __future__ import annotations

from pathlib import Path

import click

from ..ops.vocab import INIT_RULES
from . import Params
from .common import force, path_argument

EXPAND_VOCAB: Params = (
    path_argument("model"),
    path_argument("output", exists=False),
    click.Option(
        ["--merge-spm"],
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        help="SentencePiece model whose pieces MODEL's tokenizer.model lacks are appended, in that model's "
        "order, as normal pieces with score 0 (Chinese-LLaMA's rule); existing ids never move.",
    ),
    click.Option(
        ["--add-tokens"],
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        help="File with one token per line, added as normal tokens (after any --merge-spm pieces).",
    ),
    click.Option(
        ["--special-token", "special_tokens"],
        multiple=True,
        metavar="TOKEN",
        help="Add TOKEN as a special token: never split, marked special, listed in "
        "special_tokens_map.json. Repeat for several (e.g. --special-token '<|End|>').",
    ),
    click.Option(
        ["--new-tokenizer"],
        type=click.Path(exists=True, file_okay=False, path_type=Path),
        help="Directory of another tokenizer to remap to: rows of tokens both vocabularies share are "
        "carried (bit-identical) to their new ids, the rest initialised.",
    ),
    click.Option(
        ["--init"],
        type=click.Choice(INIT_RULES),
        default="subtoken-mean",
        show_default=True,
        help="How new rows start: subtoken-mean = mean of the old rows of the token's pieces under the old "
        "tokenizer (no BOS; the mean when it has none); mean = mean of all old rows; normal = "
        "N(mean, 1e-9 x covariance of the old rows), as transformers' mean_resizing; zeros.",
    ),
    click.Option(
        ["--seed"],
        type=click.IntRange(0, 2**64 - 1),
        default=0,
        show_default=True,
        help="Seed of the normal init (deterministic).",
    ),
    click.Option(
        ["--pad-to-multiple"],
        type=click.IntRange(min=1),
        metavar="N",
        help="Round the row count up to a multiple of N (e.g. 64 for tensor cores); padding rows get "
        "the mean and are reported. Also keeps BLOOM's padded row count instead of shrinking.",
    ),
    click.Option(["--max-shard-size"], default="5GB", show_default=True, help="Largest safetensors shard."),
    click.Option(
        ["--allow-shrink"],
        is_flag=True,
        help="Allow a new tokenizer smaller than the embedding to cut rows off (they are dropped).",
    ),
    force(),
    click.Option(
        ["--reinit-rows"],
        is_flag=True,
        help="Allow re-initialising the trained rows of tokens the new tokenizer lacks (with --new-tokenizer); "
        "without it such a remap is refused.",
    ),
)
