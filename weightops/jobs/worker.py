"""A fused unit's child process: `python -m weightops.jobs.worker UNIT.json`.

UNIT.json names the command line of the unit's first gguf step (`argv`, as the job file
builds it; the gguf command's declared parameters parse it and `commands.gguf.export_arguments`
maps them, as for the command line), the `(type, output)` of every step in the unit, and
`done`, a file where each output is listed once it is published (the runner marks those
steps complete). The unit is one `pipelines.gguf.export_gguf_matrix`: MODEL is read once for
every type, and the outputs are published together at the end. Errors and warnings are
printed as the CLI prints them (`error: ...`, `warning: ...`); the exit codes are the CLI's.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import Any

import click

from .. import commands, console, progress
from ..commands.gguf import export_arguments
from ..errors import WeightopsError, shown
from ..pipelines.gguf import export_gguf_matrix


def run_unit(spec: dict[str, Any]) -> None:
    values = commands.parser("gguf").make_context("gguf", list(spec["argv"][1:])).params
    done = Path(spec["done"])

    def published(path: Path) -> None:
        with open(done, "a", encoding="utf-8") as f:
            f.write(json.dumps(str(path)) + "\n")

    def warn(message: str) -> None:
        print(f"warning: {message}", file=sys.stderr, flush=True)

    options = {**export_arguments(values), "force": False}  # the runner has cleared the outputs
    outputs = [Path(o) for _, o in spec["outputs"]]
    reports = export_gguf_matrix(values["model"], outputs, [t for t, _ in spec["outputs"]], warn=warn, **options)
    for (qtype, output), report in zip(spec["outputs"], reports, strict=True):
        published(Path(output))
        counts = f"{report.encoded} tensors encoded, {report.shared} shared{report.resumed_note}"
        print(f"wrote {output} ({qtype}; {counts})")


def _terminated(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt  # unwinds every `with`: nothing half-written is published


def main(argv: list[str]) -> int:
    console.install()
    progress.set_quiet(True)
    signal.signal(signal.SIGTERM, _terminated)
    try:
        run_unit(json.loads(Path(argv[0]).read_text()))
    except WeightopsError as e:
        print(f"error: {shown(str(e))}", file=sys.stderr)
        return e.exit_code
    except click.ClickException as e:  # options the gguf command refuses, as the CLI says it
        print(f"error: {shown(e.format_message())}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted; no output was published", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
