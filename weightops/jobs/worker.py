"""A fused unit's child process: `python -m weightops.jobs.worker UNIT.json`.

UNIT.json names the command line of the unit's first gguf step (`argv`, as the job file
builds it; the click command parses it, so the options mean what they mean on the command
line), the `(type, output)` of every step in the unit, and `done`, a file where each output
is listed once it is published (the runner marks those steps complete). The unit is one
`pipelines.gguf.export_gguf_matrix`: MODEL is read once for every type, and the outputs are
published together at the end. Errors and warnings are printed as the CLI prints
them (`error: ...`, `warning: ...`); the exit codes are the CLI's.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import Any

import click

from .. import console, progress
from ..errors import WeightopsError, shown
from ..pipelines.gguf import export_gguf_matrix


def gguf_options(params: dict[str, Any]) -> dict[str, Any]:
    """export_gguf's keyword arguments from the gguf command's parsed options, as cli/gguf.py
    passes them (the type and output are the unit's own; the runner has cleared the outputs)."""
    options = {k: v for k, v in params.items() if k not in {"model", "output", "qtype", "force"}}
    options["lora_options"] = {k: options.pop(k) for k in ("rounding", "tp_lora_r", "tp_lora_alpha") if k in options}
    return options


def run_unit(spec: dict[str, Any]) -> None:
    from .spec import command  # the gguf command's parameters parse the step's options

    gguf = command("gguf")
    params = gguf.make_context("gguf", list(spec["argv"][1:])).params
    done = Path(spec["done"])

    def published(path: Path) -> None:
        with open(done, "a", encoding="utf-8") as f:
            f.write(json.dumps(str(path)) + "\n")

    def warn(message: str) -> None:
        print(f"warning: {message}", file=sys.stderr, flush=True)

    reports = export_gguf_matrix(
        params["model"],
        [Path(o) for _, o in spec["outputs"]],
        [t for t, _ in spec["outputs"]],
        warn=warn,
        **gguf_options(params),
    )
    for (qtype, output), report in zip(spec["outputs"], reports, strict=True):
        published(Path(output))
        kept = f"; {report.resumed} tensors kept from the interrupted run" if report.resumed else ""
        print(f"wrote {output} ({qtype}; {report.encoded} tensors encoded, {report.shared} shared{kept})")


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
