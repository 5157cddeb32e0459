"""imatrix: llama.cpp's importance matrix of any checkpoint, computed one layer at a time."""

from __future__ import annotations

from pathlib import Path

import click

from ..commands.imatrix import IMATRIX
from ..pipelines.imatrix import compute_imatrix
from . import main, warn


@main.command(
    params=list(IMATRIX),
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
""",
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
