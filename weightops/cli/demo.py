"""`weightops demo`: the release pipeline on tiny models built from nothing."""

from __future__ import annotations

from pathlib import Path

import click

from ..jobs import demo as demo_lib
from . import main


@main.command()
@click.argument("workdir", required=False, default="weightops-demo", type=click.Path(path_type=Path))
@click.option(
    "--force",
    is_flag=True,
    help="Replace a WORKDIR an earlier demo wrote (it says what it removes); a directory holding "
    "anything else, or the current directory, is refused.",
)
def demo(workdir: Path, force: bool) -> None:
    """Build tiny models from nothing (no downloads) and run the release pipeline on them:
    one line per step, then a summary and the report's path. WORKDIR defaults to
    ./weightops-demo."""
    demo_lib.run_demo(workdir, force=force)
