"""Core commands: inspect, manifest."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..commands.core import MANIFEST_CREATE
from ..pipelines.inspect import inspect_checkpoint, render
from ..pipelines.manifest import check_manifest, create_manifest
from . import main


@main.command()
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
@click.option(
    "--tp-config",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="TencentPretrain model config json, for a TencentPretrain checkpoint.",
)
@click.option(
    "--model",
    type=click.Path(exists=True, path_type=Path),
    help="With an importance-matrix PATH: report which of this model's weights it misses or barely covers.",
)
def inspect(path: Path, as_json: bool, tp_config: Path | None, model: Path | None) -> None:
    """Show format, architecture, tensor and parameter counts, dtypes, files and the
    vocabulary triple (config vocab_size / tokenizer size / embedding rows) of PATH.

    Only headers are read. PATH may be an HF directory or file (safetensors or .bin,
    sharded or not), a TencentPretrain .bin or sharded directory, or a GGUF file.
    An importance matrix (llama-imatrix's GGUF or legacy .dat) is reported by entries,
    chunks, datasets and token counts; with --model, by its coverage of that model.
    """
    from ..pipelines.inspect_imatrix import inspect_imatrix, is_imatrix, render_imatrix

    if model is not None or is_imatrix(path):
        summary = inspect_imatrix(path, model, tp_config)
        click.echo(json.dumps(summary, indent=2) if as_json else render_imatrix(summary))
        return
    summary = inspect_checkpoint(path, tp_config)
    click.echo(json.dumps(summary, indent=2) if as_json else render(summary))


@main.group()
def manifest() -> None:
    """sha256 manifests of every file and every tensor of a checkpoint."""


@manifest.command("create", params=list(MANIFEST_CREATE))
def manifest_create(path: Path) -> None:
    """Write weightops-manifest.json into PATH (or FILE.weightops-manifest.json beside a file)."""
    out = create_manifest(path)
    doc = json.loads(out.read_text())
    click.echo(f"wrote {out}: {len(doc['files'])} files, {len(doc['tensors'])} tensors")


@manifest.command("check")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
def manifest_check(path: Path) -> None:
    """Recompute every hash; exit 3 naming each file and tensor that differs."""
    doc = check_manifest(path)
    click.echo(f"ok: {len(doc['files'])} files and {len(doc['tensors'])} tensors match")
