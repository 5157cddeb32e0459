"""The `weightops` command line: parses options, calls the library, maps errors to exit
codes (0 ok, 1 error, 2 usage, 3 verification or manifest mismatch)."""
from __future__ import annotations

import sys

import click

from .. import progress
from ..errors import WeightopsError


class _Group(click.Group):
    """Turns library errors into one clear line and an exit code (a traceback with --debug)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except WeightopsError as e:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"error: {e}", err=True)
            ctx.exit(e.exit_code)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except KeyboardInterrupt:
            click.echo("interrupted; no output was published", err=True)
            ctx.exit(130)
        except Exception as e:  # an unexpected failure: still one line unless --debug
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"error: {type(e).__name__}: {e} (run with --debug for a traceback)", err=True)
            ctx.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--debug", is_flag=True, help="Show a traceback on errors.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@click.version_option(package_name="weightops")
@click.pass_context
def main(ctx: click.Context, debug: bool, quiet: bool) -> None:
    """Streaming tools for LLM release engineering: merge deltas, convert TencentPretrain
    checkpoints, expand vocabularies, export GGUF and bitsandbytes files, and prove with
    checksums and logits that nothing broke.

    Every command reads checkpoints lazily (one tensor in memory at a time) and publishes
    its output atomically. Exit codes: 0 ok, 1 error, 2 usage, 3 verification or manifest
    mismatch.
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    progress.set_quiet(quiet)


def run() -> None:
    main(prog_name="weightops")


from . import core  # noqa: E402,F401  (registers commands)
from . import jobs  # noqa: E402,F401
from . import delta  # noqa: E402,F401
from . import vocab  # noqa: E402,F401
from . import gguf  # noqa: E402,F401
from . import bnb  # noqa: E402,F401
from . import convert  # noqa: E402,F401
from . import verify  # noqa: E402,F401

if __name__ == "__main__":
    sys.exit(run())
