"""Release jobs: a TOML file of named inputs and ordered steps, run to completion or resumed.

A step is one `weightops` command with the same options as on the command line (the
command's own click parameters validate the keys, so a typo is an error, never ignored).
Each step runs in a child process: memory is given back between steps, and its wall
time and peak RSS are measured (the child's own high-water mark, VmHWM). After a step succeeds its output gets a
sha256 manifest and a finished marker recording the hashes of its inputs; `--resume`
skips a step only when that marker exists, its options are unchanged, its inputs still
hash the same and its output files are all there. Everything else is redone from
scratch — operators publish atomically, so a killed step leaves only a temporary sibling,
which is removed.

Job file:

    [job]
    name = "chatyuan-7b release"
    output = "release"                 # directory for artefacts and the report

    [inputs]
    base = "llama-7b"                   # paths relative to the job file
    delta = "chatyuan-7b-delta"

    [[steps]]
    name = "merged"
    op = "apply-delta"
    base = "@base"                      # @name: an input or an earlier step's output
    delta = "@delta"
    output = "merged"                   # relative to the job's output directory
    dtype = "float16"

    [[steps]]
    name = "gate"
    op = "verify"
    reference = "@merged"
    candidate = "@q4"
    max-kld = 0.1
"""
from __future__ import annotations

import difflib
import hashlib
import json
import os
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from . import progress
from .errors import MismatchError, WeightopsError, names_file
from .io.atomic import atomic_file
from .verify import manifest as manifest_lib

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

STATE_DIR = ".weightops-job"
REPORT = "release-report"
_JOB_KEYS = {"name", "output"}
_STEP_KEYS = {"name", "op"}
_NO_STEP = {"run", "demo", "inspect"}  # commands that make no sense as steps


@dataclass
class Step:
    name: str
    op: str
    options: dict[str, Any]
    output: Path | None = None
    inputs: list[Path] = field(default_factory=list)
    argv: list[str] = field(default_factory=list)


@dataclass
class Job:
    path: Path
    name: str
    output: Path
    inputs: dict[str, Path]
    steps: list[Step]


def _commands() -> dict[str, click.Command]:
    from .cli import all_commands
    commands = all_commands()
    cmds = {n: c for n, c in commands.items() if n not in _NO_STEP and not isinstance(c, click.Group)}
    cmds["manifest"] = commands["manifest"].commands["create"]
    return cmds


def _suggest(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _fail(job_path: Path, where: str, message: str) -> WeightopsError:
    return WeightopsError(f"{job_path}: {where}: {message}")


@names_file("job file (TOML)")
def load_job(path: str | Path) -> Job:
    """Parse and validate a job file; every key must be known and every @reference resolvable."""
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise WeightopsError(f"{path}: cannot read job file: {e}") from None
    for key in doc.keys() - {"job", "inputs", "steps"}:
        raise _fail(path, "top level", f"unknown table {key!r}{_suggest(key, ['job', 'inputs', 'steps'])}")
    head = doc.get("job", {})
    for key in head.keys() - _JOB_KEYS:
        raise _fail(path, "[job]", f"unknown key {key!r}{_suggest(key, _JOB_KEYS)}")
    base = path.parent
    out_dir = (base / head.get("output", "release")).resolve()
    inputs = {k: (base / v).resolve() for k, v in doc.get("inputs", {}).items()}
    commands = _commands()
    known: dict[str, Path | None] = dict(inputs)
    steps = []
    for i, raw in enumerate(doc.get("steps", [])):
        where = f"step {i + 1}" + (f" ({raw['name']})" if "name" in raw else "")
        if "op" not in raw or "name" not in raw:
            raise _fail(path, where, "every step needs `name` and `op`")
        if raw["op"] not in commands:
            raise _fail(path, where, f"unknown op {raw['op']!r}{_suggest(raw['op'], commands)}; "
                                     f"ops: {', '.join(sorted(commands))}")
        if raw["name"] in known:
            raise _fail(path, where, f"name {raw['name']!r} is already used")
        step = _build_step(path, where, raw, commands[raw["op"]], known, out_dir)
        known[step.name] = step.output
        steps.append(step)
    if not steps:
        raise _fail(path, "[[steps]]", "the job has no steps")
    return Job(path, head.get("name", path.stem), out_dir, inputs, steps)


def _key(param: click.Parameter) -> str:
    longs = [o for o in getattr(param, "opts", []) if o.startswith("--")] if isinstance(param, click.Option) else []
    return (longs[0][2:] if longs else param.name).replace("-", "_")


def _build_step(job_path: Path, where: str, raw: dict, command: click.Command, known: dict[str, Path | None],
                out_dir: Path) -> Step:
    # a key is an argument's name or an option's long flag (`type` for --type), - or _ alike
    params = {_key(p): p for p in command.params if p.name != "help"}
    options = {k.replace("-", "_"): v for k, v in raw.items() if k not in _STEP_KEYS}
    for key in options.keys() - params.keys():
        raise _fail(job_path, where, f"unknown option {key.replace('_', '-')!r} for {raw['op']}"
                                     f"{_suggest(key, params)}")
    step = Step(raw["name"], raw["op"], options)

    def resolve(value: Any, param: click.Parameter) -> str:
        text = str(value)
        if text.startswith("@"):
            ref = text[1:]
            if ref not in known:
                raise _fail(job_path, where, f"{param.name} refers to {text!r}, which is neither an input "
                                             f"nor an earlier step{_suggest(ref, known)}")
            if known[ref] is None:
                raise _fail(job_path, where, f"{text!r} has no output to use")
            step.inputs.append(known[ref])
            return str(known[ref])
        if param.name == "output":
            if Path(text).is_absolute() or ".." in Path(text).parts:
                raise _fail(job_path, where, f"output {text!r} must be a relative path inside the job's output "
                                             "directory (the runner replaces what is there)")
            step.output = out_dir / text
            return str(step.output)
        if isinstance(param.type, click.Path):
            resolved = (job_path.parent / text).resolve()
            step.inputs.append(resolved)
            return str(resolved)
        return text

    argv: list[str] = []
    for p in command.params:
        if isinstance(p, click.Argument):
            if p.name not in options:
                if p.required:
                    raise _fail(job_path, where, f"{raw['op']} needs `{p.name}`")
                continue
            values = options[p.name] if isinstance(options[p.name], list) else [options[p.name]]
            argv += [resolve(v, p) for v in values]
    for p in command.params:
        if not isinstance(p, click.Option) or _key(p) not in options:
            continue
        flag = "--" + _key(p).replace("_", "-")
        value = options[_key(p)]
        if p.is_flag:
            if not isinstance(value, bool):
                raise _fail(job_path, where, f"{flag} is a flag: write true or false")
            if value:
                argv.append(flag)
            continue
        for v in value if (p.multiple and isinstance(value, list)) else [value]:
            argv += [flag, resolve(v, p)]
    step.argv = [*(["manifest", "create"] if raw["op"] == "manifest" else [raw["op"]]), *argv]
    return step


# ---------------------------------------------------------------------------------------------- running


def _fingerprint(paths: list[Path]) -> dict[str, str]:
    """sha256 over each input's file hashes, reusing a manifest written by an earlier step."""
    out = {}
    for p in paths:
        mpath = manifest_lib.manifest_path(p)
        if mpath.is_file():
            out[str(p)] = hashlib.sha256(mpath.read_bytes()).hexdigest()
        elif p.exists():
            out[str(p)] = hashlib.sha256(json.dumps(manifest_lib.file_hashes(p), sort_keys=True).encode()).hexdigest()
        else:
            raise WeightopsError(f"input {p} does not exist")
    return out


def _marker(job: Job, step: Step) -> Path:
    return job.output / STATE_DIR / f"{step.name}.done.json"


def _is_done(job: Job, step: Step) -> bool:
    marker = _marker(job, step)
    if not marker.is_file():
        return False
    done = json.loads(marker.read_text())
    if done.get("argv") != step.argv or done.get("inputs") != _fingerprint(step.inputs):
        return False
    if step.output is not None:
        mpath = manifest_lib.manifest_path(step.output)
        if not mpath.is_file():
            return False
        files = json.loads(mpath.read_text())["files"]
        root = step.output if step.output.is_dir() else step.output.parent
        return all((root / f).is_file() and (root / f).stat().st_size == meta["size"] for f, meta in files.items())
    return True


def _clear(output: Path) -> None:
    """Remove a step's previous or partial output, temporary siblings included."""
    for stale in output.parent.glob(f".{output.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    if output.is_dir():
        shutil.rmtree(output)
    elif output.exists():
        output.unlink()
    mpath = manifest_lib.manifest_path(output)
    if mpath.is_file():
        mpath.unlink()


class _PeakRss(threading.Thread):
    """Samples a child's VmHWM, its own high-water mark. wait4's ru_maxrss also counts the
    parent's memory that the child was forked from: a 42 MB manifest step run by a 360 MB
    job runner showed as 360 MB. The mark only rises, so sampling misses at most what the
    child gains in its last interval."""

    def __init__(self, pid: int, interval: float = 0.01):
        super().__init__(daemon=True)
        self.status, self.interval, self.peak_kb = Path(f"/proc/{pid}/status"), interval, 0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            self.sample()
            self._done.wait(self.interval)

    def sample(self) -> None:
        try:
            text = self.status.read_text()
        except OSError:  # exited (zombies have no memory lines), or no /proc
            return
        for line in text.splitlines():
            if line.startswith("VmHWM:"):
                self.peak_kb = max(self.peak_kb, int(line.split()[1]))

    def stop(self) -> None:
        self._done.set()
        self.join()


def _run_child(argv: list[str], log: Path) -> tuple[int, float, float]:
    """Run `python -m weightops ARGV`, forwarding its stderr live and keeping a log;
    returns (exit code, wall seconds, peak RSS in MB)."""
    import subprocess
    env = dict(os.environ, WEIGHTOPS_PROGRESS="1" if progress.enabled() else "0")
    start = time.perf_counter()
    with open(log, "wb") as logf:
        proc = subprocess.Popen([sys.executable, "-m", "weightops", *argv], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, env=env)
        sampler = _PeakRss(proc.pid)
        sampler.start()
        assert proc.stdout is not None
        while chunk := proc.stdout.read1(65536):
            logf.write(chunk)
            sys.stderr.buffer.write(chunk)
            sys.stderr.flush()
        sampler.stop()
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    peak_kb = sampler.peak_kb or usage.ru_maxrss  # no /proc: the (inflated) kernel figure
    return proc.returncode, time.perf_counter() - start, peak_kb / 1024


def run_job(path: str | Path, resume: bool = False, dry_run: bool = False) -> dict:
    """Run (or plan) a job; returns the report document. A failed verify gate raises
    MismatchError after the report is written; any other failure raises WeightopsError."""
    job = load_job(path)
    if dry_run:
        return plan(job)
    state = job.output / STATE_DIR
    state.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"job": job.name, "job_file": str(job.path), "output": str(job.output), "steps": [],
                              "verifications": [], "artefacts": {}, "passed": True}
    failure: WeightopsError | None = None
    for n, step in enumerate(job.steps, 1):
        entry: dict[str, Any] = {"name": step.name, "op": step.op, "output": str(step.output) if step.output else None}
        report["steps"].append(entry)
        click.echo(f"[{n}/{len(job.steps)}] {step.name} ({step.op})", err=True)
        verify_json = state / f"{step.name}.verify.json"
        argv = step.argv + (["--json", str(verify_json)] if step.op == "verify" else [])
        if resume and _is_done(job, step):
            entry.update(status="skipped (complete)", **json.loads(_marker(job, step).read_text())["measured"])
        else:
            _marker(job, step).unlink(missing_ok=True)
            if step.output is not None:
                _clear(step.output)
            code, wall, rss = _run_child(argv, state / f"{step.name}.log")
            entry.update(wall_s=round(wall, 3), peak_rss_mb=round(rss, 1))
            if code != 0:
                tail = (state / f"{step.name}.log").read_text(errors="replace").strip().splitlines()[-5:]
                entry.update(status="failed", exit_code=code, why="\n".join(tail))
                failure = (MismatchError if code == 3 else WeightopsError)(
                    f"step {step.name!r} ({step.op}) failed with exit code {code}: {tail[-1] if tail else ''}")
            else:
                entry["status"] = "ok"
                if step.output is not None:
                    manifest_lib.create(step.output)
                with atomic_file(_marker(job, step)) as tmp:
                    tmp.write_text(json.dumps({"argv": step.argv, "inputs": _fingerprint(step.inputs),
                                               "measured": {"wall_s": entry["wall_s"],
                                                            "peak_rss_mb": entry["peak_rss_mb"]}}, indent=2))
        if step.op == "verify" and verify_json.is_file():
            result = json.loads(verify_json.read_text())
            report["verifications"].append({"step": step.name, **result})
            report["passed"] &= bool(result.get("passed"))
        if step.output is not None and manifest_lib.manifest_path(step.output).is_file():
            report["artefacts"][step.name] = json.loads(manifest_lib.manifest_path(step.output).read_text())["files"]
        if failure:
            report["passed"] = False
            break
    write_report(job, report)
    if failure:
        raise failure
    return report


# ---------------------------------------------------------------------------------------------- plan, report

_BYTES_PER_WEIGHT = {"f32": 4, "f16": 2, "bf16": 2, "q8_0": 34 / 32, "q4_0": 18 / 32, "q4_1": 20 / 32,
                     "q5_0": 22 / 32, "q5_1": 24 / 32, "float32": 4, "float16": 2, "bfloat16": 2}


def _estimate(step: Step, sizes: dict[Path, tuple[int, int]]) -> tuple[int, int] | None:
    """(parameters, bytes) the step's output will hold, from the size of the input it follows
    (the delta for apply-delta and the target for make-delta, whose dtype `auto` keeps)."""
    follows = step.inputs[1:2] if step.op in ("apply-delta", "make-delta") else step.inputs[:1]
    source = sizes.get(follows[0]) if follows else None
    if source is None or step.output is None:
        return None
    params, nbytes = source
    o = step.options
    if step.op == "gguf":
        return params, int(params * _BYTES_PER_WEIGHT.get(str(o.get("type", "f16")), 2))
    if step.op == "bnb":
        return params, int(params * (1 if int(o.get("bits", 8)) == 8 else 0.55))
    if str(o.get("dtype", "auto")) in _BYTES_PER_WEIGHT:
        return params, int(params * _BYTES_PER_WEIGHT[str(o["dtype"])])
    return params, nbytes


def plan(job: Job) -> dict:
    """What `--dry-run` prints: steps, inputs, outputs and expected sizes; writes nothing."""
    from .checkpoint import open_checkpoint
    sizes: dict[Path, tuple[int, int]] = {}
    for p in job.inputs.values():
        try:
            refs = open_checkpoint(p).tensors
            sizes[p] = (sum(r.numel for r in refs), sum(r.nbytes for r in refs))
        except WeightopsError:
            pass
    steps = []
    for step in job.steps:
        est = _estimate(step, sizes)
        if est and step.output is not None:
            sizes[step.output] = est
        steps.append({"name": step.name, "op": step.op, "inputs": [str(p) for p in step.inputs],
                      "output": str(step.output) if step.output else None,
                      "expected_bytes": est[1] if est else None, "command": "weightops " + " ".join(step.argv)})
    return {"job": job.name, "output": str(job.output), "dry_run": True, "steps": steps}


def render_plan(doc: dict) -> str:
    lines = [f"job {doc['job']} -> {doc['output']} (dry run: nothing is written)"]
    for i, s in enumerate(doc["steps"], 1):
        size = f"~{s['expected_bytes'] / 1e6:.1f} MB" if s["expected_bytes"] else "-"
        lines.append(f"{i:>2}. {s['name']} [{s['op']}]  output: {s['output'] or '-'}  ({size})")
        lines.append(f"    $ {s['command']}")
    return "\n".join(lines)


def render_report(report: dict) -> str:
    out = [f"# Release report: {report['job']}", "",
           f"Result: **{'PASSED' if report['passed'] else 'FAILED'}**", "", "## Steps", "",
           "| step | op | status | wall (s) | peak RSS (MB) |", "|---|---|---|---|---|"]
    for s in report["steps"]:
        out.append(f"| {s['name']} | {s['op']} | {s.get('status', '-')} | {s.get('wall_s', '-')} | "
                   f"{s.get('peak_rss_mb', '-')} |")
    for s in report["steps"]:
        if s.get("why"):
            out += ["", f"Step `{s['name']}` failed:", "", "```", s["why"], "```"]
    if report["verifications"]:
        out += ["", "## Verification", "", "| step | KLD mean | KLD p99 | top-1 | PPL ratio | passed |",
                "|---|---|---|---|---|---|"]
        for v in report["verifications"]:
            ratio = (v["ppl_candidate"] / v["ppl_reference"]) if v.get("ppl_reference") else None
            out.append(f"| {v['step']} | {v.get('kld_mean', float('nan')):.3g} | {v.get('kld_p99', float('nan')):.3g}"
                       f" | {v.get('top1_agreement', float('nan')):.4f} | "
                       f"{'-' if ratio is None else f'{ratio:.4f}'} | {v.get('passed')} |")
    out += ["", "## Artefacts (sha256)", ""]
    for step, files in report["artefacts"].items():
        out.append(f"### {step}")
        out += [f"- `{name}` {meta['size']} bytes `{meta['sha256']}`" for name, meta in sorted(files.items())]
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def write_report(job: Job, report: dict) -> None:
    job.output.mkdir(parents=True, exist_ok=True)
    with atomic_file(job.output / f"{REPORT}.json") as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")
    with atomic_file(job.output / f"{REPORT}.md") as tmp:
        tmp.write_text(render_report(report))
