"""imatrix."""

from __future__ import annotations

from pathlib import Path

import click

from ..devices import DEVICES
from ..pipelines.imatrix import FORMATS
from . import Params
from .common import force, path_argument, tp_config

IMATRIX: Params = (
    path_argument("model"),
    path_argument("output", exists=False, dir_okay=False),
    click.Option(
        ["--text"],
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        help="Calibration text (UTF-8). Optional with --in-file.",
    ),
    click.Option(["--ctx"], type=click.IntRange(min=1), default=512, show_default=True, help="Tokens per chunk."),
    click.Option(
        ["--chunks"], type=click.IntRange(min=1), help="Use at most this many chunks (default: the whole text)."
    ),
    click.Option(
        ["--device"],
        type=click.Choice(DEVICES),
        default="auto",
        show_default=True,
        help="Where the layers run: auto = CUDA when available, else CPU (float32 either way).",
    ),
    click.Option(
        ["--format", "fmt"],
        type=click.Choice(FORMATS),
        default="gguf",
        show_default=True,
        help="gguf: llama.cpp's current imatrix format; dat: the legacy one.",
    ),
    click.Option(
        ["--process-output"],
        is_flag=True,
        help="Also collect the output matrix (output.weight; none when it is tied to the embedding).",
    ),
    click.Option(
        ["--in-file", "in_files"],
        multiple=True,
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        help="An imatrix file to add in (repeatable): sums and counts are added, as llama-imatrix --in-file.",
    ),
    click.Option(
        ["--tokenizer"],
        type=click.Path(exists=True, path_type=Path),
        help="Directory with the HF tokenizer files (default: MODEL's own; a GGUF file's is llama.cpp's).",
    ),
    tp_config("TencentPretrain model config JSON, for a TencentPretrain MODEL."),
    click.Option(
        ["--memory-budget"],
        metavar="SIZE",
        help="RAM for the chunks' hidden states between layers (e.g. 8GB); beyond it they go to a "
        "temporary file beside OUTPUT. Default: a quarter of the available memory.",
    ),
    force("Replace an existing OUTPUT that weightops wrote; anything else at OUTPUT is refused."),
)
