"""Running a job: units start as their inputs are ready, up to `--jobs` at a time and within a
memory budget (planner.py), on an executor (executors.py); each step is then finished on its own:
a sha256 manifest for its output and a finished marker recording the hashes of its inputs and
of its output files.

`--resume` skips a step only when that marker exists, its options are unchanged and its inputs
and output files hash now as they did then; a fused unit runs again for its incomplete steps
only. Hashes are of what is on disk now (a manifest an input carries is never trusted), through
a stat cache in the state directory so unchanged files are not read again
(verify/hash_cache.py). Everything else is redone from scratch — operators publish atomically,
so a killed step leaves only a temporary sibling, which is removed — except a gguf step's (or
fused unit's), which `--resume` continues from the tensors it had written (`io.gguf_partial`).
The runner removes a step's
previous output only when weightops wrote it (`io.outputs`); anything else there stops the job.

A failed step stops the job: no unit starts after it, the units already running finish (and
their steps are recorded), then the report is written.

Verify steps share reference logits: each gets `--reference-cache STATE/logits/SHA`, SHA
the hash of its reference's files, so checks against the same reference (same prompts and
settings) run the reference once (`verify.logits.LogitCache`).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import MismatchError, WeightopsError
from ..io import gguf_split, outputs
from ..io.index import parse_size
from ..pipelines.manifest import create_manifest
from ..verify import manifest as manifest_lib
from ..verify.hash_cache import HashCache
from . import card, planner
from .executors import EXECUTORS, Executor, Outcome, Task
from .report import write_report
from .screen import Screen, reason, verify_detail
from .spec import REPORT, RESUMABLE, STATE_DIR, Job, Step, load_job

HASH_CACHE = "hashes.json"  # in STATE_DIR: (path, size, mtime, ctime, inode) -> sha256, see verify/hash_cache.py
LOGITS = "logits"  # in STATE_DIR: reference logits shared by verify steps, one directory per reference content
SKIPPED = "skipped (complete)"


def run_job(
    path: str | Path,
    resume: bool = False,
    dry_run: bool = False,
    *,
    jobs: int = 1,
    max_memory: str | int | None = None,
    executor: str | None = None,
    ray_address: str | None = None,
) -> dict:
    """Run (or plan) a job; returns the report document. `jobs`: units run at once; `max_memory`:
    the budget their memory estimates must fit (default: the memory available now); `executor`
    ("local" or "ray", default: [job] executor) runs the units, `ray_address` names the Ray
    cluster. A failed verify gate raises MismatchError after the report is written; any other
    failure raises WeightopsError."""
    job = load_job(path)
    if jobs < 1:
        raise WeightopsError(f"--jobs {jobs}: run at least one unit at a time")
    executor = executor or job.executor
    if executor not in EXECUTORS:
        raise WeightopsError(f"--executor {executor!r}: choose one of {', '.join(EXECUTORS)}")
    budget = parse_size(max_memory) if max_memory is not None else planner.available_memory()
    if dry_run:
        return planner.document(job, jobs, budget)
    card.check_writable(job)
    return _Run(job, resume, jobs, budget).run(EXECUTORS[executor](ray_address))


@dataclass
class _Started:
    """A unit handed to the executor: the steps it runs and their inputs' hashes before it ran."""

    unit: planner.Unit
    steps: list[Step]
    inputs: dict[str, dict[str, str]]  # step name -> input fingerprint
    log: Path
    done: Path | None  # a fused unit's list of published outputs
    entry: dict[str, Any]  # its report["units"] entry
    task: Task


class _Run:
    def __init__(self, job: Job, resume: bool, jobs: int, budget: int):
        self.job, self.resume, self.jobs, self.budget = job, resume, jobs, budget
        self.state = outputs.make_dir(outputs.make_dir(job.output) / STATE_DIR)
        self.cache = HashCache(self.state / HASH_CACHE)
        self.number = {s.name: n for n, s in enumerate(job.steps, 1)}
        self.screen = Screen(job.name, job.output, self.state, [s.name for s in job.steps])
        self.report: dict[str, Any] = {
            "job": job.name,
            "job_file": str(job.path),
            "output": str(job.output),
            "jobs": jobs,
            "memory_budget_bytes": budget,
            "units": [],
            "steps": [],
            "verifications": [],
            "artefacts": {},
            "passed": True,
        }
        self.entries: dict[str, dict[str, Any]] = {}
        self.failure: WeightopsError | None = None
        self.t0 = time.time()

    # ------------------------------------------------------------------------------------ schedule

    def run(self, executor: Executor) -> dict:
        pending = planner.make_plan(self.job)
        running: dict[str, _Started] = {}
        ready: set[str] = set()  # units finished (or skipped) without failing
        try:
            executor.check(self.job, self._pending(pending))
            while pending or running:
                if self.failure is None:
                    for unit in list(pending):
                        if len(running) >= self.jobs:
                            break
                        used = sum(r.unit.memory_bytes for r in running.values())
                        if not set(unit.after) <= ready or (running and used + unit.memory_bytes > self.budget):
                            continue
                        pending.remove(unit)
                        started = self._start(unit, sorted(running))
                        if started is None:
                            ready.add(unit.name)
                        else:
                            running[unit.name] = started
                            executor.submit(started.task)
                if not running:
                    break  # nothing left that may start
                with self.screen.waiting(sorted(running)):
                    outcome = executor.wait()
                if self._finish(running.pop(outcome.unit), outcome):
                    ready.add(outcome.unit)
        finally:
            executor.close()
            self.cache.save()
        return self._end()

    def _pending(self, units: list[planner.Unit]) -> list[planner.Unit]:
        """The units a run will start, as far as can be told now (one whose inputs an earlier
        unit makes counts as pending): what the executor must be able to run before any starts."""
        if not self.resume:
            return units

        def complete(step: Step) -> bool:
            try:
                return _completed(self.job, step, _fingerprint(step.inputs, self.cache), self.cache) is not None
            except WeightopsError:  # an input not made yet
                return False

        return [u for u in units if not all(complete(s) for s in u.steps)]

    # ------------------------------------------------------------------------------------ one unit

    def _start(self, unit: planner.Unit, alongside: list[str]) -> _Started | None:
        """Record the unit's steps, skip the complete ones (--resume), clear what the others
        will write and build the task; None when every step is complete."""
        entry: dict[str, Any] = {"name": unit.name, "steps": [s.name for s in unit.steps], "fused": unit.fused}
        self.report["units"].append(entry)
        todo, inputs = [], {}
        for step in unit.steps:
            step_entry: dict[str, Any] = {
                "name": step.name,
                "op": step.op,
                "unit": unit.name,
                "output": str(step.output) if step.output else None,
            }
            self.entries[step.name] = step_entry
            self.report["steps"].append(step_entry)
            fingerprint = _fingerprint(step.inputs, self.cache)  # now: an input changed meanwhile reruns it
            done = _completed(self.job, step, fingerprint, self.cache) if self.resume else None
            if done is not None:
                step_entry.update(status=SKIPPED, **done.get("measured", {}))
                if step.output is not None:
                    self.report["artefacts"][step.name] = done["output"]["files"]
                self._show(step, step_entry, "", None)
                continue
            outputs.remove(_marker(self.job, step), f"step {step.name!r}: finished marker", announce=False)
            if step.output is not None:
                _clear(step, step.output)
            if step.op == "verify":
                outputs.remove(self._verify_json(step), f"step {step.name!r}: verification result", announce=False)
            todo.append(step)
            inputs[step.name] = fingerprint
        self.cache.save()
        if not todo:
            entry["status"] = SKIPPED
            return None
        log = self.state / f"{unit.name}.log"
        outputs.start_file(log, f"unit {unit.name!r}: log")
        attempts = outputs.start_file(self.state / f"{unit.name}.attempts", f"unit {unit.name!r}: attempts")
        done_file = None
        if len(todo) == 1:
            args = ("-m", "weightops", "-q", *self._argv(todo[0], inputs[todo[0].name]))
        else:
            done_file = self.state / f"{unit.name}.published"
            outputs.start_file(done_file, f"unit {unit.name!r}: published list")
            spec_file = self.state / f"{unit.name}.unit.json"
            gguf = [s for s in todo if s.op == "gguf"]
            spec = {
                "argv": gguf[0].argv + self._resuming(gguf[0]) if gguf else None,
                "outputs": [[str(s.options.get("type", "f16")).lower(), str(s.output)] for s in gguf],
                "bnb": [s.argv for s in todo if s.op == "bnb"],
                "done": str(done_file),
            }
            with outputs.Output(spec_file, kind="file", force=True).writing() as tmp:
                tmp.write_text(json.dumps(spec, indent=2))
            args = ("-m", "weightops.jobs.worker", str(spec_file))
        entry.update(runs=[s.name for s in todo], alongside=alongside)
        clear = [p for s in todo if s.output is not None for p in (s.output, manifest_lib.manifest_path(s.output))]
        clear += [self._verify_json(s) for s in todo if s.op == "verify"]
        task = Task(
            unit.name,
            args,
            log,
            unit.memory_bytes,
            cpus=unit.cpus,
            gpu=unit.gpu,
            uses_device=len(todo) == 1 and todo[0].uses_device,
            clear=tuple(clear),
            published=done_file,
            attempts=attempts,
        )
        return _Started(unit, todo, inputs, log, done_file, entry, task)

    def _argv(self, step: Step, inputs: dict[str, str]) -> list[str]:
        present = {str(p): str(gguf_split.first_split(p)) for p in step.inputs}  # a split set: its first file
        argv = [present.get(a, a) for a in step.argv] + self._resuming(step)
        if step.op != "verify":
            return argv
        argv = [*argv, "--json", str(self._verify_json(step))]
        reference = step.sources.get("reference")
        if reference is not None and str(reference) in inputs:
            argv += ["--reference-cache", str(self.state / LOGITS / inputs[str(reference)])]
        return argv

    def _resuming(self, step: Step) -> list[str]:
        """`--resume` for a step that continues the tensors a killed run wrote, when resuming."""
        return ["--resume"] if self.resume and step.op in RESUMABLE else []

    def _verify_json(self, step: Step) -> Path:
        return self.state / f"{step.name}.verify.json"

    def _finish(self, started: _Started, outcome: Outcome) -> bool:
        """Finish each step of an ended unit: ok (manifest, marker, artefact) or failed."""
        measured = outcome.measured()
        started.entry.update(
            status="ok" if outcome.exit_code == 0 else "failed",
            exit_code=outcome.exit_code,
            **measured,
            started_s=round(outcome.started - self.t0, 3),
            ended_s=round(outcome.ended - self.t0, 3),
        )
        published = _published(started.done) if started.done else set()
        text = started.log.read_text(errors="replace") if started.log.is_file() else ""
        first = True
        for step in started.steps:
            entry = self.entries[step.name]
            entry.update(**measured, log=started.log.name)
            detail = ""
            if outcome.exit_code == 0 or (step.output is not None and str(step.output) in published):
                entry["status"] = "ok"
                self._complete(step, started.inputs[step.name], measured, started.unit.name)
            elif outcome.error:
                entry.update(status="failed", why=outcome.error)
                detail = outcome.error
                if self.failure is None:
                    self.failure = WeightopsError(f"step {step.name!r} ({step.op}) could not run: {outcome.error}")
            else:
                entry.update(status="failed", exit_code=outcome.exit_code)
                entry["why"] = "\n".join(text.strip().splitlines()[-5:])
                detail = f"exit {outcome.exit_code}: {reason(text, outcome.exit_code)}"
                if self.failure is None:
                    where = f"{step.op}" + (f", fused unit {started.unit.name!r}" if started.unit.fused else "")
                    self.failure = (MismatchError if outcome.exit_code == 3 else WeightopsError)(
                        f"step {step.name!r} ({where}) failed with exit code {outcome.exit_code}: "
                        f"{reason(text, outcome.exit_code)}"
                    )
            self._show(step, entry, detail, started.log if first else None)
            first = False
        self.cache.save()
        return outcome.exit_code == 0

    def _complete(self, step: Step, inputs: dict[str, str], measured: dict, unit: str) -> None:
        output = None
        if step.output is not None:
            mpath = create_manifest(step.output, self.cache.sha256)
            files = json.loads(mpath.read_text())["files"]  # hashed from disk just now
            output = {"files": files, "manifest": self.cache.sha256(mpath)}
            self.report["artefacts"][step.name] = files
            if step.hub_split and len(files) > 1:
                note = (
                    f"split into {len(files)} files: one file would exceed the Hugging Face Hub's "
                    f"{gguf_split.HUB_FILE_LIMIT // 10**9} GB per-file limit (set split_max_size to choose)"
                )
                self.entries[step.name]["note"] = note
                self.screen.remarks.append(("note", step.name, note))
        with outputs.Output(_marker(self.job, step), kind="file", force=True).writing() as tmp:
            tmp.write_text(
                json.dumps(
                    {"argv": step.argv, "inputs": inputs, "output": output, "measured": measured, "unit": unit},
                    indent=2,
                )
            )

    def _show(self, step: Step, entry: dict[str, Any], detail: str, log: Path | None) -> None:
        """The step's screen line; a verify step's result goes into the report."""
        if step.op == "verify" and self._verify_json(step).is_file():
            result = json.loads(self._verify_json(step).read_text())
            self.report["verifications"].append({"step": step.name, **result})
            self.report["passed"] &= bool(result.get("passed"))
            detail = detail or verify_detail(result)
        elif step.name in self.report["artefacts"] and step.output is not None:
            size = sum(int(f["size"]) for f in self.report["artefacts"][step.name].values())
            detail = self.screen.artefact(step.output, size)
        elif step.op == "manifest" and entry["status"] != "failed":  # it writes beside its input
            written = manifest_lib.manifest_path(step.inputs[0])
            detail = self.screen.artefact(written, written.stat().st_size) if written.is_file() else ""
        self.screen.step(self.number[step.name], entry, detail, log)

    # ------------------------------------------------------------------------------------ the end

    def _end(self) -> dict:
        """Report in job order (the card is the same bytes however units interleaved)."""
        order = self.number
        report = self.report
        report["steps"].sort(key=lambda e: order[e["name"]])
        report["verifications"].sort(key=lambda v: order[v["step"]])
        report["artefacts"] = dict(sorted(report["artefacts"].items(), key=lambda kv: order[kv[0]]))
        if self.failure:
            report["passed"] = False
        write_report(self.job, report)
        if self.failure:
            card.remove(self.job)
        else:
            card.write(self.job, report, self.cache.sha256)
            self.cache.save()
        self.screen.summary(report, self.job.output / f"{REPORT}.md", None if self.failure else card.path(self.job))
        if self.failure:
            raise self.failure
        return report


def _published(done: Path) -> set[str]:
    try:
        return {json.loads(line) for line in done.read_text(encoding="utf-8").splitlines() if line.strip()}
    except (OSError, ValueError):
        return set()


def _fingerprint(paths: list[Path], cache: HashCache) -> dict[str, str]:
    """sha256 over each input's current file hashes (through the stat cache). A manifest the
    input carries is never used: it says what the files were, not what they are."""
    out = {}
    for p in map(gguf_split.first_split, paths):  # an earlier gguf step's split set: its first file
        if not p.exists():
            raise WeightopsError(f"input {p} does not exist")
        files = manifest_lib.file_hashes(p, cache.sha256)
        out[str(p)] = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    return out


def _output_state(output: Path, cache: HashCache) -> dict | None:
    """The output's files and its manifest as they are on disk now; None when either is gone."""
    mpath = manifest_lib.manifest_path(output)
    output = gguf_split.first_split(output)
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
    splits = gguf_split.slot_files(output) if step.op == "gguf" else []  # an earlier split set of it
    for path in (manifest_lib.manifest_path(output), output, *splits):
        outputs.remove(path, what)
