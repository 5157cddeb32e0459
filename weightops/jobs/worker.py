"""A fused unit's child process: `python -m weightops.jobs.worker UNIT.json`.

UNIT.json names the command line of the unit's first gguf step (`argv`, as the job file
builds it; null when the unit runs no gguf step), the `(type, output)` of every gguf step,
the command line of every bnb step (`bnb`), and `done`, a file where each output is listed
once it is published (the runner marks those steps complete). Each command's declared
parameters parse its command line and `commands.gguf.export_arguments` /
`commands.bnb.export_arguments` map them, as for the command line. gguf steps alone are one
`pipelines.gguf.export_gguf_matrix`; with bnb steps, one `pipelines.fused.export_fused`: MODEL
is read once for every output either way, and the outputs are published together at the end.
Errors and warnings are printed as the CLI prints them (`error: ...`, `warning: ...`); the exit
codes are the CLI's.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import Any

import click

from .. import commands, console, progress
from ..commands.bnb import export_arguments as bnb_arguments
from ..commands.gguf import export_arguments as gguf_arguments
from ..errors import WeightopsError, shown
from ..heap import one_malloc_arena
from ..pipelines.fused import export_fused
from ..pipelines.gguf import export_gguf_matrix


def run_unit(spec: dict[str, Any]) -> None:
    done = Path(spec["done"])

    def published(path: Path) -> None:
        with open(done, "a", encoding="utf-8") as f:
            f.write(json.dumps(str(path)) + "\n")

    def warn(message: str) -> None:
        print(f"warning: {message}", file=sys.stderr, flush=True)

    gguf = commands.parser("gguf").make_context("gguf", list(spec["argv"][1:])).params if spec["argv"] else None
    bnb = [commands.parser("bnb").make_context("bnb", list(argv[1:])).params for argv in spec.get("bnb", [])]
    outputs = [Path(o) for _, o in spec["outputs"]]
    types = [t for t, _ in spec["outputs"]]
    options = {**gguf_arguments(gguf), "force": False} if gguf else {}  # the runner has cleared the outputs
    entries = [{**bnb_arguments(values), "force": False} for values in bnb]
    if bnb:
        model = gguf["model"] if gguf else bnb[0]["model"]
        report = export_fused(model, outputs, types, options, entries, warn=warn)
        gguf_reports, bnb_reports = report.gguf, report.bnb
    else:
        assert gguf is not None  # a unit runs at least one step
        gguf_reports, bnb_reports = export_gguf_matrix(gguf["model"], outputs, types, warn=warn, **options), []
    for (qtype, output), result in zip(spec["outputs"], gguf_reports, strict=True):
        published(Path(output))
        counts = f"{result.encoded} tensors encoded, {result.shared} shared{result.resumed_note}"
        print(f"wrote {output} ({qtype}; {counts})")
    for entry, bnb_report in zip(entries, bnb_reports, strict=True):
        published(Path(entry["output"]))
        print(f"wrote {entry['output']} (bnb; {len(bnb_report.quantized)} linear weights on {bnb_report.device})")


def _terminated(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt  # unwinds every `with`: nothing half-written is published


def main(argv: list[str]) -> int:
    console.install()
    one_malloc_arena()
    progress.set_quiet(True)
    signal.signal(signal.SIGTERM, _terminated)
    try:
        run_unit(json.loads(Path(argv[0]).read_text()))
    except WeightopsError as e:
        print(f"error: {shown(str(e))}", file=sys.stderr)
        return e.exit_code
    except click.ClickException as e:  # options the commands refuse, as the CLI says it
        print(f"error: {shown(e.format_message())}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted; no output was published", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
