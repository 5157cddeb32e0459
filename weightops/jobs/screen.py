"""What `weightops run` (and `demo`) shows while a job runs: one line per step, then a
one-screen summary and where the report is. The full tables stay in the report and each
step's output in its log; everything shown here from a log or a file name is escaped."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import click

from .. import console, progress
from ..errors import shown

_STATUS = {"ok": "ok", "failed": "FAILED", "skipped (complete)": "skipped"}
_WARNING = "warning: "  # how weightops' own commands start a warning line (a third party's: console.py)
_CUT = 160  # characters of a warning the summary shows; the log holds all of it
_SHOWN = 3  # warnings of one step the summary shows: its first ones and its last (often a count)


def duration(seconds: float) -> str:
    return f"{seconds:.1f}s" if seconds < 60 else f"{int(seconds // 60)}m {seconds % 60:02.0f}s"


def reason(log_text: str, code: int) -> str:
    """The last meaningful line of a failed step's log: its `error:` line, else the last line
    that is not a warning (a traceback's exception), else what ended it."""
    lines = [line.strip() for line in log_text.splitlines() if line.strip()]
    errors = [line.removeprefix("error: ") for line in lines if line.startswith("error: ")]
    plain = [line for line in lines if not line.startswith(("warning", "note: "))]
    if errors or plain:
        return shown((errors or plain)[-1])
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return "it wrote nothing to its log"


def verify_detail(result: dict[str, Any]) -> str:
    if result.get("mode") == "structure":
        return "structure matches" if result.get("passed") else "structure differs"
    t = result.get("thresholds", {})
    return (
        f"KLD {result.get('kld_mean', float('nan')):.3g} (max {t.get('max_kld', float('nan')):g}), "
        f"top-1 {100 * result.get('top1_agreement', float('nan')):.1f}% "
        f"(min {100 * t.get('min_top1', float('nan')):.1f}%)"
    )


class Screen:
    """Writes the step lines as steps finish and the summary at the end (all on stderr: stdout
    is left to `--json`), and keeps what the summary lists besides the report."""

    def __init__(self, name: str, output: Path, state: Path, steps: list[str]):
        self.name, self.output, self.state, self.total = name, output, state, len(steps)
        self.width = min(max(len(shown(s)) for s in steps), 28)
        self.start = time.perf_counter()
        self.remarks: list[tuple[str, str, str]] = []  # (kind, step, text)

    def _head(self, n: int, status: str, name: str, op: str) -> str:
        return f"[{n:>{len(str(self.total))}}/{self.total}] {status:<7} {shown(name):<{self.width}} {op:<12}"

    def waiting(self, units: list[str]) -> progress.Ticker:
        """The live line while units run: their names and the seconds waited."""
        shown_units = ", ".join(shown(u) for u in units[:3]) + (f" (+{len(units) - 3})" if len(units) > 3 else "")
        return progress.Ticker(f"{'':>{2 * len(str(self.total)) + 3}} running {shown_units}")

    def artefact(self, path: Path, nbytes: int) -> str:
        return f"{shown(os.path.relpath(path, self.output))}  {progress.human_size(nbytes)}"

    def step(self, n: int, entry: dict[str, Any], detail: str, log: Path | None) -> None:
        """One line for a finished (or skipped) step; the warnings in `log` (a unit's log: given
        with its first step only) and our notes on what its libraries warned about are kept
        for the summary."""
        text = log.read_text(errors="replace") if log is not None and log.is_file() else ""
        own = [shown(line.strip().removeprefix(_WARNING)) for line in text.splitlines() if line.startswith(_WARNING)]
        kept = own if len(own) <= _SHOWN else [*own[: _SHOWN - 1], f"... {len(own) - _SHOWN} more in its log", own[-1]]
        source = entry.get("unit", entry["name"])  # a fused unit's log is all its steps'
        self.remarks += [("warning", source, w) for w in kept]
        self.remarks += [
            ("note", source, note) for note in console.notes_in(text) if note not in {r[2] for r in self.remarks}
        ]
        wall = duration(entry["wall_s"]) if entry["status"] != "skipped (complete)" else "-"
        extra = f" ({len(own)} warning{'s' * (len(own) > 1)}, see the summary)" if own else ""
        click.echo(
            f"{self._head(n, _STATUS.get(entry['status'], entry['status']), entry['name'], entry['op'])}"
            f" {wall:>7}  {detail}{extra}".rstrip(),
            err=True,
        )

    def summary(self, report: dict[str, Any], report_path: Path, card: Path | None = None) -> None:
        steps = report["steps"]
        counts = {s: sum(1 for e in steps if e["status"] == s) for s in dict.fromkeys(e["status"] for e in steps)}
        failed = [e for e in steps if e["status"] == "failed"]
        took = duration(time.perf_counter() - self.start)
        if failed:
            head = (
                f"FAILED  {shown(self.name)}: step {shown(failed[0]['name'])!r} "
                f"({failed[0]['op']}) failed, step {len(steps)} of {self.total}, after {took}"
            )
        else:
            ran = "all ok" if list(counts) == ["ok"] else ", ".join(f"{k} {s}" for s, k in counts.items())
            head = (
                f"{'PASSED' if report['passed'] else 'FAILED'}  {shown(self.name)}: "
                f"{self.total} steps, {ran}, in {took}"
            )
        lines = [head, f"  {'checks':<10} {self._checks(report['verifications'])}"]
        files = [f for step in report["artefacts"].values() for f in step.values()]
        if report["artefacts"]:
            total = progress.human_size(sum(int(f["size"]) for f in files))
            lines.append(
                f"  {'artefacts':<10} {len(report['artefacts'])} ({total})"
                f" in {shown(str(self.output))}, each with a sha256 manifest"
            )
        for kind, step, text in self.remarks:
            cut = text if len(text) <= _CUT else text[:_CUT] + "... (the rest in its log)"
            lines.append(f"  {kind:<10} {shown(step)}: {cut}")
        lines.append(f"  {'report':<10} {shown(str(report_path))}")
        if card is not None:
            lines.append(f"  {'card':<10} {shown(str(card))}")
        logs = self.state / (failed[0].get("log", f"{failed[0]['name']}.log") if failed else "STEP.log")
        lines.append(f"  {'step log' if failed else 'step logs':<10} {shown(str(logs))}")
        click.echo("\n".join(lines), err=True)

    @staticmethod
    def _checks(verifications: list[dict[str, Any]]) -> str:
        if not verifications:
            return "none in this job"
        passed = sum(1 for v in verifications if v.get("passed"))
        text = f"{passed} of {len(verifications)} passed"
        logits = [v for v in verifications if v.get("mode") != "structure" and "top1_agreement" in v]
        if len(logits) > 1:
            low = min(logits, key=lambda v: v["top1_agreement"])
            high = max(logits, key=lambda v: v.get("kld_mean", 0))
            text += (
                f"; lowest top-1 {100 * low['top1_agreement']:.1f}% ({shown(low['step'])}), "
                f"highest mean KLD {high.get('kld_mean', float('nan')):.3g} ({shown(high['step'])})"
            )
        return text
