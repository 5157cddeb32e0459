"""imatrix: llama.cpp's importance matrix of any checkpoint, computed one layer at a time."""

from __future__ import annotations

from pathlib import Path

import click

from ..devices import DEVICES
from ..pipelines.imatrix import FORMATS, compute_imatrix
from . import main, warn


@main.command(
    help="""Compute MODEL's importance matrix over a calibration text and write it as
    llama.cpp's imatrix file (what llama-imatrix writes; llama-quantize --imatrix and
    weightops gguf --imatrix read it).

    For every matrix of every decoder layer (and the output matrix with --process-output),
    the file holds the sum of the squared activations entering each input column and the
    number of tokens. The text is tokenized by the model's tokenizer and cut into --ctx-token
    chunks (BOS first, when the tokenizer adds one), as llama-imatrix does.

    MODEL is an HF directory, a TencentPretrain checkpoint (with --tp-config) or a GGUF file
    (dequantized). All chunks go through one layer at a time, so memory holds one layer
    plus the chunks' hidden states, whatever the model size; the states go to a temporary
    file (removed on exit) when they exceed --memory-budget.

    \b
    Examples:
      weightops imatrix llama-7b imatrix.gguf --text calibration.txt
      weightops imatrix llama-7b imatrix.dat --text calibration.txt --format dat --chunks 100
      weightops imatrix llama-7b all.gguf --in-file part1.gguf --in-file part2.gguf
"""
)
@click.argument("model", type=click.Path(exists=True, path_type=Path))
@click.argument("output", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--text",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Calibration text (UTF-8). Optional with --in-file.",
)
@click.option("--ctx", type=click.IntRange(min=1), default=512, show_default=True, help="Tokens per chunk.")
@click.option("--chunks", type=click.IntRange(min=1), help="Use at most this many chunks (default: the whole text).")
@click.option(
    "--device",
    type=click.Choice(DEVICES),
    default="auto",
    show_default=True,
    help="Where the layers run: auto = CUDA when available, else CPU (float32 either way).",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(FORMATS),
    default="gguf",
    show_default=True,
    help="gguf: llama.cpp's current imatrix format; dat: the legacy one.",
)
@click.option(
    "--process-output",
    is_flag=True,
    help="Also collect the output matrix (output.weight; none when it is tied to the embedding).",
)
@click.option(
    "--in-file",
    "in_files",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="An imatrix file to add in (repeatable): sums and counts are added, as llama-imatrix --in-file.",
)
@click.option(
    "--tokenizer",
    type=click.Path(exists=True, path_type=Path),
    help="Directory with the HF tokenizer files (default: MODEL's own; a GGUF file's is llama.cpp's).",
)
@click.option(
    "--tp-config",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="TencentPretrain model config JSON, for a TencentPretrain MODEL.",
)
@click.option(
    "--memory-budget",
    metavar="SIZE",
    help="RAM for the chunks' hidden states between layers (e.g. 8GB); beyond it they go to a "
    "temporary file beside OUTPUT. Default: a quarter of the available memory.",
)
@click.option(
    "--force",
    is_flag=True,
    help="Replace an existing OUTPUT that weightops wrote; anything else at OUTPUT is refused.",
)
def imatrix(
    model: Path,
    output: Path,
    text: Path | None,
    ctx: int,
    chunks: int | None,
    device: str,
    fmt: str,
    process_output: bool,
    in_files: tuple[Path, ...],
    tokenizer: Path | None,
    tp_config: Path | None,
    memory_budget: str | None,
    force: bool,
) -> None:
    r = compute_imatrix(
        model,
        output,
        text=text,
        ctx=ctx,
        chunks=chunks,
        device=device,
        format=fmt,
        process_output=process_output,
        in_files=in_files,
        tokenizer=tokenizer,
        tp_config=tp_config,
        memory_budget=memory_budget,
        force=force,
        warn=warn,
    )
    done = f"{r.chunks} chunks of {r.chunk_size} tokens on {r.device}" if r.chunks else "no text"
    added = f", {len(r.in_files)} file(s) added in" if r.in_files else ""
    click.echo(f"wrote {r.output} ({r.format}, {r.entries} matrices; {done}{added})")
