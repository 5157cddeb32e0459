"""Release jobs: a TOML file of named inputs and ordered steps, run to completion or resumed.

A step is one `weightops` command with the same options as on the command line (the
command's own click parameters validate the keys, so a typo is an error, never ignored).
Each step runs in a child process: memory is given back between steps, and its wall
time and peak RSS are measured (the child's own high-water mark, VmHWM). After a step succeeds its output gets a
sha256 manifest and a finished marker recording the hashes of its inputs and of its output
files; `--resume` skips a step only when that marker exists, its options are unchanged and
its inputs and output files hash now as they did then. Hashes are of what is on disk now
(a manifest an input carries is never trusted), through a stat cache in the state directory
so unchanged files are not read again (verify/hash_cache.py). Everything else is redone from
scratch — operators publish atomically, so a killed step leaves only a temporary sibling,
which is removed — except a gguf step's, which `--resume` continues from the last tensor
that step wrote (`io.gguf_partial`). The runner removes a step's previous output only when weightops wrote
it (`io.outputs`); anything else there stops the job.

Job file:

    [job]
    name = "chatyuan-7b release"
    output = "release"                 # directory for artefacts, the report and the model card
    base_model = "org/model"           # optional: the Hub model the artefacts derive from

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
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from .. import console, dtypes
from ..errors import MismatchError, WeightopsError, names_file
from ..io import outputs
from ..pipelines.manifest import create_manifest
from ..verify import manifest as manifest_lib
from ..verify.hash_cache import HashCache
from . import card
from .screen import Screen, reason, verify_detail

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

STATE_DIR = ".weightops-job"
REPORT = "release-report"
HASH_CACHE = "hashes.json"  # in STATE_DIR: (path, size, mtime, ctime, inode) -> sha256, see verify/hash_cache.py
_JOB_KEYS = {"name", "output", "base_model"}
_STEP_KEYS = {"name", "op"}
_NO_STEP = {"run", "demo", "inspect"}  # commands that make no sense as steps
# options the runner sets itself: why, by op and option
_RUNNER_OPTIONS = {
    "verify": {"json": f"it keeps the result in {STATE_DIR}"},
    "gguf": {"resume": "`weightops run --resume` passes it, to continue a killed step's files"},
}
_RESUMABLE = {"gguf"}  # ops that continue a killed run's temporary when given --resume
# step names become file names in the state directory (NAME.log, NAME.done.json)
_STEP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_UNBUILT = object()  # a step too broken to build: its problems are reported, references to it are not


@dataclass
class Step:
    name: str
    op: str
    options: dict[str, Any]
    output: Path | None = None
    output_text: str = ""  # as written in the job file, for messages
    inputs: list[Path] = field(default_factory=list)
    paths: dict[str, Path] = field(default_factory=dict)  # option -> a path given literally (not @name)
    argv: list[str] = field(default_factory=list)
    label: str = ""  # "step N ('name')", how messages name it


@dataclass
class Job:
    path: Path
    name: str
    output: Path
    inputs: dict[str, Path]
    steps: list[Step]
    base_model: tuple[str, ...] = ()  # [job] base_model: the model card's `base_model`


class _Problems:
    """Collects what is wrong with a job file so one refusal lists everything."""

    def __init__(self, job_path: Path):
        self.job_path = job_path
        self.items: list[str] = []

    def add(self, where: str, message: str) -> None:
        self.items.append(f"{where}: {message}")

    def raise_if_any(self) -> None:
        if len(self.items) == 1:
            raise WeightopsError(f"{self.job_path}: {self.items[0]}")
        if self.items:
            raise WeightopsError(
                f"{self.job_path}: {len(self.items)} problems (nothing was run):\n  " + "\n  ".join(self.items)
            )


def _commands() -> dict[str, click.Command]:
    from ..cli import all_commands

    commands = all_commands()
    cmds = {n: c for n, c in commands.items() if n not in _NO_STEP and not isinstance(c, click.Group)}
    manifest = commands["manifest"]
    assert isinstance(manifest, click.Group)  # `manifest create|check`
    cmds["manifest"] = manifest.commands["create"]
    return cmds


def _suggest(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


@names_file("job file (TOML)")
def load_job(path: str | Path) -> Job:
    """Parse and validate a job file: every key known, every @reference resolvable, every step
    name a plain file name, and no path the runner replaces (a step's output) touching the
    job file, an input or another step's output. Refuses with every problem listed, before
    anything is written."""
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise WeightopsError(f"{path}: cannot read job file: {e}") from None
    if any("\0" in text for text in _strings(doc)):  # no path can hold one; Path() would raise
        raise WeightopsError(f"{path}: a string contains a NUL character")
    tables = {"job": dict, "inputs": dict, "steps": list}
    if any(not isinstance(doc.get(k, t()), t) for k, t in tables.items()) or not all(
        isinstance(raw, dict) for raw in doc.get("steps", [])
    ):
        raise WeightopsError(f"{path}: [job] and [inputs] must be tables and steps an array of [[steps]] tables")
    problems = _Problems(path)
    for key in sorted(doc.keys() - tables.keys()):
        problems.add("top level", f"unknown table {key!r}{_suggest(key, ['job', 'inputs', 'steps'])}")
    head = doc.get("job", {})
    for key in sorted(head.keys() - _JOB_KEYS):
        problems.add("[job]", f"unknown key {key!r}{_suggest(key, _JOB_KEYS)}")
    base = path.parent
    out_text = head.get("output", "release")
    if not isinstance(out_text, str) or not out_text:
        problems.add("[job]", "output must be a non-empty path")
        out_text = "release"
    out_dir = _resolve(base, out_text)
    base_model = head.get("base_model", [])
    base_model = [base_model] if isinstance(base_model, str) else base_model
    if "base_model" in head and not (
        isinstance(base_model, list) and base_model and all(isinstance(b, str) and b.strip() for b in base_model)
    ):
        problems.add("[job]", 'base_model must be a Hub model id ("org/name") or a list of them')
        base_model = []
    inputs = {}
    for k, v in doc.get("inputs", {}).items():
        if not isinstance(v, str) or not v:
            problems.add("[inputs]", f"{k!r} must be a non-empty path")
        else:
            inputs[k] = _resolve(base, v)
    commands = _commands()
    known: dict[str, Any] = dict(inputs)
    folded: dict[str, str] = {}
    steps = []
    for i, raw in enumerate(doc.get("steps", [])):
        name = raw.get("name")
        where = f"step {i + 1}" + (f" ({name!r})" if name is not None else "")
        if "op" not in raw or name is None:
            problems.add(where, "every step needs `name` and `op`")
            continue
        if not isinstance(name, str) or not _STEP_NAME.fullmatch(name):
            problems.add(
                where,
                f"name {name!r} is not a plain file name (it names {STATE_DIR}/NAME.log and "
                "NAME.done.json): use up to 128 letters, digits, '.', '_' or '-', starting with a "
                "letter or digit",
            )
            name = str(name)
        if name in known:
            problems.add(where, f"name {name!r} is already used")
        elif name.casefold() in folded:
            problems.add(
                where,
                f"name {name!r} differs from step {folded[name.casefold()]!r} only in case "
                "(the same file on a case-insensitive file system)",
            )
        folded.setdefault(name.casefold(), name)
        if raw["op"] not in commands:
            problems.add(
                where,
                f"unknown op {raw['op']!r}{_suggest(str(raw['op']), commands)}; ops: {', '.join(sorted(commands))}",
            )
            known.setdefault(name, _UNBUILT)
            continue
        step = _build_step(problems, where, raw, commands[raw["op"]], known, path.parent, out_dir)
        known.setdefault(name, step.output)
        steps.append(step)
    if not steps and not problems.items:
        problems.add("[[steps]]", "the job has no steps")
    _check_paths(problems, path, out_text, out_dir, inputs, steps)
    problems.raise_if_any()
    return Job(path, head.get("name", path.stem), out_dir, inputs, steps, tuple(base_model))


def _resolve(base: Path, text: str) -> Path:
    """Absolute, symlinks followed: what the runner compares is where bytes would really go."""
    return (base / text).resolve()


def _strings(value: Any):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def _overlap(a: Path, b: Path) -> bool:
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


def _check_paths(
    problems: _Problems, job_path: Path, out_text: str, out_dir: Path, inputs: dict[str, Path], steps: list[Step]
) -> None:
    """The runner writes the job output directory and replaces each step's output (and its
    manifest sidecar): none of them may be, contain or lie inside anything it did not write."""
    job_file = job_path.resolve()
    protected = {"the job file": job_file, **{f"input {k!r}": p for k, p in inputs.items()}}
    for step in steps:
        protected.update({f"{opt} of step {step.name!r}": p for opt, p in step.paths.items()})
    if out_dir == job_file.parent:
        problems.add(
            "[job]",
            f"output {out_text!r} is the job file's own directory; name a directory for the "
            'artefacts, e.g. output = "release"',
        )
    elif job_file.is_relative_to(out_dir):
        problems.add("[job]", f"output {out_text!r} ({out_dir}) contains the job file")
    for label, p in protected.items():
        if label != "the job file" and _overlap(out_dir, p):
            how = "is" if out_dir == p else "lies inside" if out_dir.is_relative_to(p) else "contains"
            problems.add("[job]", f"output {out_text!r} ({out_dir}) {how} {label} ({p})")
    reserved = [out_dir / STATE_DIR, out_dir / f"{REPORT}.json", out_dir / f"{REPORT}.md", out_dir / card.CARD]
    owned: list[tuple[Step, list[Path]]] = []
    for step in steps:
        if step.output is None:
            continue
        where, out = step.label, step.output
        shown = f"output {step.output_text!r}" + ("" if step.output_text == str(out) else f" ({out})")
        if out == out_dir:
            problems.add(
                where,
                f"{shown} is the job's output directory itself; the runner replaces a step's "
                "output before the step runs: name a path inside it",
            )
            continue
        if not out.is_relative_to(out_dir):
            problems.add(
                where,
                f"{shown} must be a relative path inside the job's output directory {out_dir} "
                "(the runner replaces a step's output before the step runs)",
            )
            continue
        paths = [out, out.with_name(out.name + "." + manifest_lib.MANIFEST)]
        for r in reserved:
            if any(_overlap(p, r) for p in paths):
                problems.add(where, f"{shown} overlaps {r.name}, which the runner writes")
        for label, p in protected.items():
            if any(_overlap(o, p) for o in paths):
                problems.add(where, f"{shown} overlaps {label} ({p}); the runner would replace it")
        for other, theirs in owned:
            if any(_overlap(a, b) for a in paths for b in theirs):
                problems.add(where, f"{shown} overlaps the output of step {other.name!r} ({other.output})")
        owned.append((step, paths))


def _key(param: click.Parameter) -> str:
    longs = [o for o in getattr(param, "opts", []) if o.startswith("--")] if isinstance(param, click.Option) else []
    return (longs[0][2:] if longs else param.name).replace("-", "_")


def _build_step(
    problems: _Problems,
    where: str,
    raw: dict,
    command: click.Command,
    known: dict[str, Any],
    job_dir: Path,
    out_dir: Path,
) -> Step:
    # a key is an argument's name or an option's long flag (`type` for --type), - or _ alike
    params = {_key(p): p for p in command.params if p.name != "help"}
    options = {k.replace("-", "_"): v for k, v in raw.items() if k not in _STEP_KEYS}
    for key in sorted(options.keys() - params.keys()):
        problems.add(where, f"unknown option {key.replace('_', '-')!r} for {raw['op']}{_suggest(key, params)}")
    for key, why in sorted(_RUNNER_OPTIONS.get(raw["op"], {}).items()):
        if key in options:
            problems.add(where, f"option {key!r} is set by the runner ({why})")
    step = Step(str(raw["name"]), raw["op"], options, label=where)

    def resolve(value: Any, param: click.Parameter) -> str:
        text = str(value)
        if param.name == "output":
            if text.startswith("@"):
                problems.add(
                    where,
                    f"output {text!r} must be a path inside the job's output directory, not a "
                    "reference (the runner replaces a step's output)",
                )
            step.output, step.output_text = _resolve(out_dir, text), text
            return str(step.output)
        if text.startswith("@"):
            ref = text[1:]
            if ref not in known:
                problems.add(
                    where,
                    f"{param.name} refers to {text!r}, which is neither an input nor an earlier "
                    f"step{_suggest(ref, known)}",
                )
            elif known[ref] is None:
                problems.add(where, f"{text!r} has no output to use")
            elif known[ref] is not _UNBUILT:
                step.inputs.append(known[ref])
                return str(known[ref])
            return text
        if isinstance(param.type, click.Path):
            resolved = _resolve(job_dir, text)
            step.inputs.append(resolved)
            step.paths[param.name] = resolved
            return str(resolved)
        return text

    argv: list[str] = []
    for p in command.params:
        if isinstance(p, click.Argument):
            if p.name not in options:
                if p.required:
                    problems.add(where, f"{raw['op']} needs `{p.name}`")
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
                problems.add(where, f"{flag} is a flag: write true or false")
            elif value:
                argv.append(flag)
            continue
        for v in value if (p.multiple and isinstance(value, list)) else [value]:
            argv += [flag, resolve(v, p)]
    step.argv = [*(["manifest", "create"] if raw["op"] == "manifest" else [raw["op"]]), *argv]
    return step


# ---------------------------------------------------------------------------------------------- running


def _fingerprint(paths: list[Path], cache: HashCache) -> dict[str, str]:
    """sha256 over each input's current file hashes (through the stat cache). A manifest the
    input carries is never used: it says what the files were, not what they are."""
    out = {}
    for p in paths:
        if not p.exists():
            raise WeightopsError(f"input {p} does not exist")
        files = manifest_lib.file_hashes(p, cache.sha256)
        out[str(p)] = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    return out


def _output_state(output: Path, cache: HashCache) -> dict | None:
    """The output's files and its manifest as they are on disk now; None when either is gone."""
    mpath = manifest_lib.manifest_path(output)
    if not output.exists() or not mpath.is_file():
        return None
    return {"files": manifest_lib.file_hashes(output, cache.sha256), "manifest": cache.sha256(mpath)}


def _marker(job: Job, step: Step) -> Path:
    return job.output / STATE_DIR / f"{step.name}.done.json"


def _completed(job: Job, step: Step, inputs: dict[str, str], cache: HashCache) -> dict | None:
    """The finished marker when it still holds: same options, inputs that hash as they did
    and output files (manifest included) that hash as they did when the step finished, all
    hashed now. Else None and the step runs again."""
    try:
        done = json.loads(_marker(job, step).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(done, dict) or done.get("argv") != step.argv or done.get("inputs") != inputs:
        return None
    if step.output is not None and (done.get("output") is None or done["output"] != _output_state(step.output, cache)):
        return None
    return done


def _clear(step: Step, output: Path) -> None:
    """Remove a step's previous output (and the manifest beside it), but only what weightops
    wrote: anything else stops the job. (A partial one is only a temporary sibling, which
    the step itself removes when it plans the same output.)"""
    what = f"step {step.name!r}: output"
    for path in (output, manifest_lib.manifest_path(output)):
        outputs.remove(path, what)


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
    """Run `python -m weightops -q ARGV` with its output (stdout, stderr, other libraries'
    warnings) going to LOG only: the runner's screen shows one line per step. Returns (exit
    code, wall seconds, peak RSS in MB)."""
    import subprocess

    env = dict(os.environ, **console.child_env())
    start = time.perf_counter()
    with open(log, "wb") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "weightops", "-q", *argv], stdout=logf, stderr=subprocess.STDOUT, env=env
        )
        sampler = _PeakRss(proc.pid)
        sampler.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:  # the runner is interrupted or terminated: so is its step
            proc.terminate()
            proc.wait()
            raise
        finally:
            sampler.stop()
    proc.returncode = os.waitstatus_to_exitcode(status)
    peak_kb = sampler.peak_kb or usage.ru_maxrss  # no /proc: the (inflated) kernel figure
    return proc.returncode, time.perf_counter() - start, peak_kb / 1024


def run_job(path: str | Path, resume: bool = False, dry_run: bool = False) -> dict:
    """Run (or plan) a job; returns the report document. A failed verify gate raises
    MismatchError after the report is written; any other failure raises WeightopsError."""
    job = load_job(path)
    if dry_run:
        return plan(job)
    card.check_writable(job)
    state = outputs.make_dir(outputs.make_dir(job.output) / STATE_DIR)
    cache = HashCache(state / HASH_CACHE)
    report: dict[str, Any] = {
        "job": job.name,
        "job_file": str(job.path),
        "output": str(job.output),
        "steps": [],
        "verifications": [],
        "artefacts": {},
        "passed": True,
    }
    screen = Screen(job.name, job.output, state, [s.name for s in job.steps])
    failure: WeightopsError | None = None
    for n, step in enumerate(job.steps, 1):
        entry: dict[str, Any] = {"name": step.name, "op": step.op, "output": str(step.output) if step.output else None}
        report["steps"].append(entry)
        verify_json = state / f"{step.name}.verify.json"
        log = state / f"{step.name}.log"
        argv = step.argv + (["--json", str(verify_json)] if step.op == "verify" else [])
        argv += ["--resume"] if resume and step.op in _RESUMABLE else []  # tensors a killed run wrote
        detail = ""  # what the step's line says after its time
        inputs = _fingerprint(step.inputs, cache)  # before the step: an input changed meanwhile reruns it
        done = _completed(job, step, inputs, cache) if resume else None
        if done is not None:
            entry.update(status="skipped (complete)", **done.get("measured", {}))
            if step.output is not None:
                report["artefacts"][step.name] = done["output"]["files"]
        else:
            outputs.remove(_marker(job, step), f"step {step.name!r}: finished marker", announce=False)
            if step.output is not None:
                _clear(step, step.output)
            if step.op == "verify":
                outputs.remove(verify_json, f"step {step.name!r}: verification result", announce=False)
            outputs.start_file(log, f"step {step.name!r}: log")
            with screen.running(n, step.name, step.op):
                code, wall, rss = _run_child(argv, log)
            entry.update(wall_s=round(wall, 3), peak_rss_mb=round(rss, 1))
            if code != 0:
                text = log.read_text(errors="replace")
                entry.update(status="failed", exit_code=code, why="\n".join(text.strip().splitlines()[-5:]))
                detail = f"exit {code}: {reason(text, code)}"
                failure = (MismatchError if code == 3 else WeightopsError)(
                    f"step {step.name!r} ({step.op}) failed with exit code {code}: {reason(text, code)}"
                )
            else:
                entry["status"] = "ok"
                output = None
                if step.output is not None:
                    mpath = create_manifest(step.output, cache.sha256)
                    files = json.loads(mpath.read_text())["files"]  # hashed from disk just now
                    output = {"files": files, "manifest": cache.sha256(mpath)}
                    report["artefacts"][step.name] = files
                with outputs.Output(_marker(job, step), kind="file", force=True).writing() as tmp:
                    tmp.write_text(
                        json.dumps(
                            {
                                "argv": step.argv,
                                "inputs": inputs,
                                "output": output,
                                "measured": {"wall_s": entry["wall_s"], "peak_rss_mb": entry["peak_rss_mb"]},
                            },
                            indent=2,
                        )
                    )
        cache.save()
        if step.op == "verify" and verify_json.is_file():
            result = json.loads(verify_json.read_text())
            report["verifications"].append({"step": step.name, **result})
            report["passed"] &= bool(result.get("passed"))
            detail = detail or verify_detail(result)
        elif step.name in report["artefacts"] and step.output is not None:
            detail = screen.artefact(step.output, sum(int(f["size"]) for f in report["artefacts"][step.name].values()))
        elif step.op == "manifest" and entry["status"] != "failed":  # it writes beside its input
            written = manifest_lib.manifest_path(step.inputs[0])
            detail = screen.artefact(written, written.stat().st_size) if written.is_file() else ""
        screen.step(n, entry, detail, log)
        if failure:
            report["passed"] = False
            break
    write_report(job, report)
    if failure:
        card.remove(job)
    else:
        card.write(job, report, cache.sha256)
        cache.save()
    screen.summary(report, job.output / f"{REPORT}.md", None if failure else card.path(job))
    if failure:
        raise failure
    return report


# ---------------------------------------------------------------------------------------------- plan, report


def _gguf_bytes_per_weight(type_name: str) -> float:
    """Of the 2-D weights of a `--type` (2 when unknown: click rejects it later)."""
    from ..quant import ggml_types

    ftype = ggml_types.find_file_type(type_name)
    return ggml_types.parse(ftype.tensor_type).bytes_per_weight if ftype else 2


def _estimate(step: Step, sizes: dict[Path, tuple[int, int]]) -> tuple[int, int] | None:
    """(parameters, bytes) the step's output will hold, from the size of the input it follows
    (the delta for apply-delta and the target for make-delta, whose dtype `auto` keeps)."""
    if step.op == "imatrix":  # a few floats per matrix column, not a model
        return None
    follows = step.inputs[1:2] if step.op in ("apply-delta", "make-delta") else step.inputs[:1]
    source = sizes.get(follows[0]) if follows else None
    if source is None or step.output is None:
        return None
    params, nbytes = source
    o = step.options
    if step.op == "gguf":
        types = o.get("type", "f16")  # a list: a matrix, one file per type
        return params, int(
            params * sum(_gguf_bytes_per_weight(str(t)) for t in (types if isinstance(types, list) else [types]))
        )
    if step.op == "bnb":
        return params, int(params * (1 if int(o.get("bits", 8)) == 8 else 0.55))
    if str(o.get("dtype", dtypes.AUTO)) in dtypes.FLOAT_CHOICES:
        return params, int(params * dtypes.itemsize(dtypes.FLOAT_CHOICES[str(o["dtype"])]))
    return params, nbytes


def plan(job: Job) -> dict:
    """What `--dry-run` prints: steps, inputs, outputs and expected sizes; writes nothing."""
    from ..io.checkpoint import open_checkpoint

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
        steps.append(
            {
                "name": step.name,
                "op": step.op,
                "inputs": [str(p) for p in step.inputs],
                "output": str(step.output) if step.output else None,
                "expected_bytes": est[1] if est else None,
                "command": "weightops " + " ".join(step.argv),
            }
        )
    return {"job": job.name, "output": str(job.output), "dry_run": True, "steps": steps}


def render_plan(doc: dict) -> str:
    lines = [f"job {doc['job']} -> {doc['output']} (dry run: nothing is written)"]
    for i, s in enumerate(doc["steps"], 1):
        size = f"~{s['expected_bytes'] / 1e6:.1f} MB" if s["expected_bytes"] else "-"
        lines.append(f"{i:>2}. {s['name']} [{s['op']}]  output: {s['output'] or '-'}  ({size})")
        lines.append(f"    $ {s['command']}")
    return "\n".join(lines)


def render_report(report: dict) -> str:
    out = [
        f"# Release report: {report['job']}",
        "",
        f"Result: **{'PASSED' if report['passed'] else 'FAILED'}**",
        "",
        "## Steps",
        "",
        "| step | op | status | wall (s) | peak RSS (MB) |",
        "|---|---|---|---|---|",
    ]
    for s in report["steps"]:
        out.append(
            f"| {s['name']} | {s['op']} | {s.get('status', '-')} | {s.get('wall_s', '-')} | "
            f"{s.get('peak_rss_mb', '-')} |"
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
