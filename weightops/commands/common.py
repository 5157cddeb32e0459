"""Parameters several commands declare alike."""

from __future__ import annotations

from pathlib import Path

import click

FORCE_HELP = (
    "Replace an existing OUTPUT that weightops wrote (it says what it removes); anything else at OUTPUT is refused."
)


def path_argument(name: str, *, exists: bool = True, **attrs) -> click.Argument:
    """A checkpoint (or other path) argument, handed to the command as a Path."""
    return click.Argument([name], type=click.Path(exists=exists, path_type=Path, **attrs))


def force(help: str = FORCE_HELP) -> click.Option:
    return click.Option(["--force"], is_flag=True, help=help)


def save_pretrained_shard_size() -> click.Option:
    return click.Option(
        ["--max-shard-size"],
        default="5GB",
        show_default=True,
        help="Largest output shard (decimal KB/MB/GB or binary KiB/MiB/GiB), as save_pretrained shards.",
    )


def tp_config(help: str) -> click.Option:
    return click.Option(["--tp-config"], type=click.Path(exists=True, dir_okay=False, path_type=Path), help=help)
