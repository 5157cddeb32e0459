"""The `weightops` command line: parses options, calls the library, maps errors to exit
codes (0 ok, 1 error, 2 usage, 3 verification or manifest mismatch)."""

from __future__ import annotations

import importlib
import signal
import sys
from collections.abc import Mapping

import click

from .. import console, progress
from ..errors import WeightopsError, describe, os_error_message, shown
from ..heap import one_malloc_arena

# The module that defines each command, imported only when that command is used (or help
# lists them all): `weightops inspect` then never pays for importing torch and llama.cpp's
# bindings, which it does not touch (measured: benchmarks/README.md).
_MODULES = {
    "inspect": "core",
    "manifest": "core",
    "demo": "demo",
    "run": "jobs",
    "apply-delta": "delta",
    "make-delta": "delta",
    "merge-lora": "merge_lora",
    "expand-vocab": "vocab",
    "gguf": "gguf",
    "imatrix": "imatrix",
    "bnb": "bnb",
    "convert": "convert",
    "verify": "verify",
}


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that every `with` block cleans up on the way out
    (temporaries are removed, nothing half-written is published), as Ctrl-C does."""


def _on_sigterm(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second TERM must not interrupt the cleanup
    raise Terminated()


class _Group(click.Group):
    """Loads command modules on demand; turns library errors into one clear line and an exit
    code (a traceback with --debug)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(_MODULES) | set(self.commands))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self.commands and name in _MODULES:
            importlib.import_module(f"{__name__}.{_MODULES[name]}")
        return super().get_command(ctx, name)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except WeightopsError as e:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            _error(str(e))
            ctx.exit(e.exit_code)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except KeyboardInterrupt:
            click.echo("interrupted; no output was published", err=True)
            ctx.exit(130)
        except OSError as e:  # a file that cannot be read or written: its path and the system's reason
            if ctx.obj and ctx.obj.get("debug"):
                raise
            _error(os_error_message(e))
            ctx.exit(1)
        except Exception as e:  # an unexpected failure: still one line unless --debug
            if ctx.obj and ctx.obj.get("debug"):
                raise
            _error(f"{describe(e)} (run with --debug for a traceback)")
            ctx.exit(1)


def _error(message: str) -> None:
    echo_escaped(f"error: {message}")


def warn(message: str) -> None:
    echo_escaped(f"warning: {message}")


def echo_escaped(message: str) -> None:
    """Print to stderr with control characters escaped line by line: the last line of
    defence against a string from a file that a message forgot to pass through `shown`."""
    click.echo("\n".join(shown(line) for line in message.split("\n")), err=True)


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
    """The `weightops` entry point: `main` plus SIGTERM handling (exit 143, as a TERM-killed
    shell command reports), with other libraries' warnings shown once each (console.py)."""
    console.install()
    one_malloc_arena()
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        main(prog_name="weightops")
    except Terminated:
        click.echo("terminated; no output was published", err=True)
        sys.exit(143)


def all_commands() -> Mapping[str, click.Command]:
    """Every command, its module imported (the tests of help texts and docs walk them all)."""
    for module in sorted(set(_MODULES.values())):
        importlib.import_module(f"{__name__}.{module}")
    return main.commands
