"""verify."""

from __future__ import annotations

from pathlib import Path

import click

from .. import dtypes
from ..devices import DEVICES
from . import Params
from .common import force, path_argument, tp_config

VERIFY: Params = (
    path_argument("reference"),
    path_argument("candidate"),
    click.Option(
        ["--prompts"],
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        help='Prompts file: JSONL with a "text" field (optional "name"), or plain text with one prompt '
        "per blank-line-separated paragraph. Default: the built-in set (~2k tokens of English and "
        "Chinese text and Alpaca/ChatYuan/YaYi/Huozi/BLOOM-style chat turns).",
    ),
    click.Option(
        ["--tokenizer"],
        type=click.Path(exists=True, file_okay=False, path_type=Path),
        help="HF tokenizer directory to tokenise the prompts with, instead of the reference's own "
        "(needed for a TencentPretrain reference, which carries no tokenizer).",
    ),
    click.Option(
        ["--device"],
        type=click.Choice(DEVICES),
        default="auto",
        show_default=True,
        help="auto = CUDA when torch sees a GPU, else CPU. GGUF files use the GPU only when "
        "llama-cpp-python was built with GPU support.",
    ),
    click.Option(
        ["--dtype"],
        type=click.Choice(dtypes.DTYPE_CHOICES),
        default="auto",
        show_default=True,
        help="Compute dtype of transformers models: auto = bf16 (fp16 without bf16 "
        "support) on CUDA, fp32 on CPU. The same for both sides.",
    ),
    click.Option(
        ["--max-kld"],
        type=click.FloatRange(min=0),
        help="Highest acceptable mean KL divergence (default: by candidate kind).",
    ),
    click.Option(
        ["--min-top1"],
        type=click.FloatRange(0, 1),
        help="Lowest acceptable top-1 agreement, 0..1 (default: by candidate kind).",
    ),
    click.Option(
        ["--max-tokens"],
        type=click.IntRange(min=1),
        help="Cut each prompt to this many tokens (default: the models' context).",
    ),
    click.Option(
        ["--json", "json_out"],
        metavar="FILE",
        help="Also write the result as JSON to FILE ('-' for stdout; the table then goes to stderr). "
        "Written before the exit code is decided, so a failed gate still leaves its report.",
    ),
    click.Option(
        ["--structure-only"],
        is_flag=True,
        help="Compare names, shapes, checksums, vocabulary and special tokens without running either model.",
    ),
    click.Option(
        ["--gguf-runtime"],
        type=click.Choice(["llama.cpp", "transformers"]),
        default="llama.cpp",
        show_default=True,
        help="What runs a GGUF file: llama.cpp (what users ship) or transformers' GGUF "
        "loader (an independent second reader).",
    ),
    tp_config("TencentPretrain model config json for whichever side is a TencentPretrain checkpoint."),
    click.Option(
        ["--allow-tokenizer-mismatch"],
        is_flag=True,
        help="Report a candidate tokenizer that tokenises differently instead of failing on it.",
    ),
    force("Replace an existing --json FILE that weightops wrote (anything else there is refused)."),
    click.Option(
        ["--reference-cache"],
        type=click.Path(file_okay=False, path_type=Path),
        hidden=True,  # the job runner's: a directory it names by the reference's sha256
        help="Keep (or reuse) the reference's logits in this directory, which belongs to this reference's content.",
    ),
)
