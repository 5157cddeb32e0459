"""Job files: read, validate and expand a TOML job into steps (what the plan and the runner use).

A step is one `weightops` command with the same options as on the command line (the
command's parameters, declared in `weightops.commands` for the CLI and job files alike,
validate the keys, so a typo is an error, never ignored).
A gguf step may take a list of types, `type = ["q4_k_m", "q8_0"]`, with `{type}` in its
output: it stands for one step per type, named `NAME.TYPE` (`@NAME.TYPE` refers to one),
each its own artefact with its own finished marker and report entry; the plan fuses them
(and other gguf steps on the same input) into one read.
"""

from __future__ import annotations

import difflib
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from .. import commands
from ..errors import WeightopsError, names_file
from ..io import gguf_split
from ..verify import manifest as manifest_lib
from . import card

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

STATE_DIR = ".weightops-job"
REPORT = "release-report"
_JOB_KEYS = {"name", "output", "base_model", "executor", "split_max_size"}
_STEP_KEYS = {"name", "op", "gpu"}
EXECUTOR_NAMES = ("local", "ray")  # executors.EXECUTORS: where units run
# options the runner sets itself: why, by op and option
RUNNER_OPTIONS = {
    "verify": {
        "json": f"it keeps the result in {STATE_DIR}",
        "reference_cache": f"it keeps the reference logits in {STATE_DIR}",
    },
    "gguf": {"resume": "`weightops run --resume` passes it, to continue a killed step's files"},
}
RESUMABLE = {"gguf"}  # ops that continue a killed run's temporary when given --resume
# step names become file names in the state directory (NAME.log, NAME.done.json)
_STEP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_UNBUILT = object()  # a step too broken to build: its problems are reported, references to it are not
_SEVERAL = object()  # a multi-type gguf step: `@NAME.TYPE` names one of its outputs
TYPE_FIELD = "{type}"  # in a multi-type gguf step's output: replaced by each type


@dataclass
class Step:
    name: str
    op: str
    options: dict[str, Any]
    output: Path | None = None
    output_text: str = ""  # as written in the job file, for messages
    inputs: list[Path] = field(default_factory=list)
    paths: dict[str, Path] = field(default_factory=dict)  # option -> a path given literally (not @name)
    sources: dict[str, Path] = field(default_factory=dict)  # argument/option -> the path it reads (first one)
    argv: list[str] = field(default_factory=list)
    label: str = ""  # "step N ('name')", how messages name it
    hub_split: bool = False  # a gguf step split at the Hub's file limit (no split option given)
    gpu: bool = False  # `gpu = true`: the step needs a GPU (an executor places it on one)
    uses_device: bool = False  # its command takes --device


@dataclass
class Job:
    path: Path
    name: str
    output: Path
    inputs: dict[str, Path]
    steps: list[Step]
    base_model: tuple[str, ...] = ()  # [job] base_model: the model card's `base_model`
    executor: str = "local"  # [job] executor: where units run unless `--executor` says otherwise


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
    executor = head.get("executor", "local")
    if executor not in EXECUTOR_NAMES:
        problems.add("[job]", f"executor must be one of {', '.join(map(repr, EXECUTOR_NAMES))}, not {executor!r}")
        executor = "local"
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
        if raw["op"] not in commands.STEP_OPS:
            ops = sorted(commands.STEP_OPS)
            problems.add(where, f"unknown op {raw['op']!r}{_suggest(str(raw['op']), ops)}; ops: {', '.join(ops)}")
            known.setdefault(name, _UNBUILT)
            continue
        expanded = _expand_types(problems, where, raw)
        if expanded is None:
            known.setdefault(name, _UNBUILT)
            continue
        for sub_where, sub in expanded:
            if sub is not raw and sub["name"] in known:
                problems.add(sub_where, f"name {sub['name']!r} is already used")
            step = _build_step(problems, sub_where, sub, commands.params(raw["op"]), known, path.parent, out_dir)
            known.setdefault(sub["name"], step.output)
            steps.append(step)
        if len(expanded) > 1 or expanded[0][1] is not raw:
            known.setdefault(name, _SEVERAL)
    if not steps and not problems.items:
        problems.add("[[steps]]", "the job has no steps")
    _check_paths(problems, path, out_text, out_dir, inputs, steps)
    _split_gguf_steps(problems, head, steps)
    problems.raise_if_any()
    return Job(path, head.get("name", path.stem), out_dir, inputs, steps, tuple(base_model), executor)


def _split_gguf_steps(problems: _Problems, head: dict, steps: list[Step]) -> None:
    """Give every gguf step that sets no split option of its own the job's `split_max_size`, or
    else the Hub's limit (`gguf_split.HUB_SPLIT_SIZE`), so that no step writes a file the Hub
    cannot take."""
    size = str(head.get("split_max_size", gguf_split.HUB_SPLIT_SIZE))
    try:
        gguf_split.parse_split_size(size)
    except WeightopsError as e:
        problems.add("[job]", f"split_max_size: {e}")
    for step in steps:
        if step.op == "gguf" and not step.options.keys() & {"split_max_size", "split_max_tensors"}:
            step.argv += ["--split-max-size", size]
            step.hub_split = "split_max_size" not in head


def _expand_types(problems: _Problems, where: str, raw: dict) -> list[tuple[str, dict]] | None:
    """A gguf step with a list of types as one step per type (`NAME.TYPE`, output with
    `{type}` replaced); any other step as itself. None when the list is unusable."""
    types = raw.get("type")
    if raw["op"] != "gguf" or not isinstance(types, list):
        return [(where, raw)]
    output = raw.get("output")
    ok = True
    if not types or not all(isinstance(t, str) and t for t in types):
        problems.add(where, "type must be a type name or a non-empty list of them")
        ok = False
    elif len({t.lower() for t in types}) != len(types):
        problems.add(where, f"type lists a type twice: {types}")
        ok = False
    if not isinstance(output, str) or TYPE_FIELD not in output:
        problems.add(
            where,
            f"with a list of types, output must contain {TYPE_FIELD} (one file per type), "
            'e.g. output = "model-{type}.gguf"',
        )
        ok = False
    if not ok or not isinstance(output, str):
        return None
    return [
        (
            f"{where} type {t!r}",
            {**raw, "name": f"{raw['name']}.{t.lower()}", "type": t, "output": output.replace(TYPE_FIELD, t.lower())},
        )
        for t in types
    ]


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
    declared: commands.Params,
    known: dict[str, Any],
    job_dir: Path,
    out_dir: Path,
) -> Step:
    # a key is an argument's name or an option's long flag (`type` for --type), - or _ alike
    params = {_key(p): p for p in declared}
    options = {k.replace("-", "_"): v for k, v in raw.items() if k not in _STEP_KEYS}
    for key in sorted(options.keys() - params.keys()):
        problems.add(where, f"unknown option {key.replace('_', '-')!r} for {raw['op']}{_suggest(key, params)}")
    for key, why in sorted(RUNNER_OPTIONS.get(raw["op"], {}).items()):
        if key in options:
            problems.add(where, f"option {key!r} is set by the runner ({why})")
    step = Step(str(raw["name"]), raw["op"], options, label=where, uses_device="device" in params)
    gpu = raw.get("gpu", False)
    if not isinstance(gpu, bool):
        problems.add(where, "gpu is a flag: write true or false")
    elif gpu and "device" not in params:
        problems.add(where, f"gpu = true, but {raw['op']} runs on the CPU only (it has no --device)")
    elif gpu and options.setdefault("device", "cuda") != "cuda":
        problems.add(where, f"gpu = true asks for a GPU, but device = {options['device']!r}")
    step.gpu = gpu is True

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
            elif known[ref] is _SEVERAL:
                problems.add(where, f"{text!r} writes one file per type: name one, e.g. '@{ref}.TYPE'")
            elif known[ref] is not _UNBUILT:
                step.inputs.append(known[ref])
                step.sources.setdefault(param.name or "", known[ref])
                return str(known[ref])
            return text
        if isinstance(param.type, click.Path):
            resolved = _resolve(job_dir, text)
            step.inputs.append(resolved)
            step.paths[param.name] = resolved
            step.sources.setdefault(param.name, resolved)
            return str(resolved)
        return text

    argv: list[str] = []
    for p in declared:
        if isinstance(p, click.Argument):
            if p.name not in options:
                if p.required:
                    problems.add(where, f"{raw['op']} needs `{p.name}`")
                continue
            values = options[p.name] if isinstance(options[p.name], list) else [options[p.name]]
            argv += [resolve(v, p) for v in values]
    for p in declared:
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
