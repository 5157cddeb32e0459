"""The release report: `release-report.json` (the runner's record: every step, unit, timing,
verification and artefact hash) and `release-report.md`, its tables."""

from __future__ import annotations

import json

from ..errors import shown
from ..io import outputs
from .spec import REPORT, Job


def _ran_on(entry: dict) -> str:
    """Node and device of a step (a skipped one: of the run that made it), the executor when
    not local, and how many attempts it took when more than one."""
    if not entry.get("node"):
        return "-"
    text = f"{shown(entry['node'])}, {entry.get('device') or '-'}"
    if entry.get("executor", "local") != "local":
        text += f" ({entry['executor']})"
    if entry.get("attempts", 1) > 1:
        text += f", {entry['attempts']} attempts"
    return text.replace("|", "\\|")


def render_report(report: dict) -> str:
    out = [
        f"# Release report: {report['job']}",
        "",
        f"Result: **{'PASSED' if report['passed'] else 'FAILED'}**",
        "",
        "## Steps",
        "",
        "| step | op | status | ran on | wall (s) | peak RSS (MB) | unit |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in report["steps"]:
        out.append(
            f"| {s['name']} | {s['op']} | {s.get('status', '-')} | {_ran_on(s)} | {s.get('wall_s', '-')} | "
            f"{s.get('peak_rss_mb', '-')} | {s.get('unit', '-')} |"
        )
    ran = [u for u in report.get("units", []) if "started_s" in u]
    if any(u["fused"] for u in ran) or any(u.get("alongside") for u in ran):
        out += [
            "",
            "## Units",
            "",
            f"Up to {report.get('jobs', 1)} at a time. A fused unit writes all its steps' files from one read.",
            "",
            "| unit | steps run | started (s) | ended (s) | started alongside |",
            "|---|---|---|---|---|",
        ]
        for u in ran:
            out.append(
                f"| {u['name']} | {', '.join(u.get('runs', u['steps']))} | {u['started_s']} | {u['ended_s']} | "
                f"{', '.join(u.get('alongside') or []) or '-'} |"
            )
    for s in report["steps"]:
        if s.get("why"):
            out += ["", f"Step `{s['name']}` failed:", "", "```", s["why"], "```"]
    if report["verifications"]:
        out += [
            "",
            "## Verification",
            "",
            "| step | KLD mean | KLD p99 | top-1 | PPL ratio | passed |",
            "|---|---|---|---|---|---|",
        ]
        for v in report["verifications"]:
            ratio = (v["ppl_candidate"] / v["ppl_reference"]) if v.get("ppl_reference") else None
            out.append(
                f"| {v['step']} | {v.get('kld_mean', float('nan')):.3g} | {v.get('kld_p99', float('nan')):.3g}"
                f" | {v.get('top1_agreement', float('nan')):.4f} | "
                f"{'-' if ratio is None else f'{ratio:.4f}'} | {v.get('passed')} |"
            )
    out += ["", "## Artefacts (sha256)", ""]
    for step, files in report["artefacts"].items():
        out.append(f"### {step}")
        out += [f"- `{name}` {meta['size']} bytes `{meta['sha256']}`" for name, meta in sorted(files.items())]
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def write_report(job: Job, report: dict) -> None:
    """Replace the report (the runner's own bookkeeping, rewritten every run: not announced)."""
    outputs.make_dir(job.output)
    for path, text in (
        (job.output / f"{REPORT}.json", json.dumps(report, indent=2) + "\n"),
        (job.output / f"{REPORT}.md", render_report(report)),
    ):
        outputs.remove(path, "the previous report", announce=False)
        with outputs.Output(path, kind="file").writing() as tmp:
            tmp.write_text(text)
