"""The plan of a job: its steps grouped into units (what runs as one child), the order units
depend on each other, and the memory each is expected to need.

Fusion: steps that read the same input as streams are one unit, which reads each source
tensor once for all of them (`pipelines.fused`, called by `worker`): gguf steps whose command
lines are the same but for their type and output (the types of one `type = [...]` step, or
separate steps; one GGUF matrix), and bnb steps on the same input, which join that unit (or
each other). A gguf step with --lora or --tp-config reads other tensors than the
checkpoint's own (merged, or remapped from TencentPretrain), so bnb steps do not join it; its
--tokenizer is only read for the GGUF metadata, so they do. gguf steps with different options
are separate matrices, so separate units.

Memory: a unit's estimate is the interpreter and its libraries plus what its operator holds:
a few of the largest tensors (in float32) for a streaming step, the whole model in float32 for
a step that loads one (verify, imatrix). The runner starts a unit only while the estimates of
the units running and of this one fit the budget (a unit larger than the budget runs alone).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from .. import dtypes
from ..errors import WeightopsError
from .spec import Job, Step

PROCESS_BYTES = 600 * 10**6  # a child's interpreter, torch, transformers and llama.cpp's bindings
_STREAM_TENSORS = 4  # a streaming step holds about this many of its largest tensors (float32)
_LOADS_MODEL = {"verify", "imatrix"}  # steps that hold a whole model, not a stream


class Size(NamedTuple):
    params: int
    nbytes: int
    largest: int  # elements of the largest tensor


@dataclass
class Unit:
    """Steps that run as one child: one step, or fused gguf and bnb steps sharing one read."""

    name: str
    steps: list[Step]
    after: list[str] = field(default_factory=list)  # units whose outputs it reads
    memory_bytes: int = PROCESS_BYTES
    cpus: float = 1  # CPUs an executor reserves for it (a child process computes on about one)

    @property
    def gpu(self) -> bool:
        """A step of it asks for a GPU (`gpu = true`)."""
        return any(s.gpu for s in self.steps)

    @property
    def fused(self) -> bool:
        return len(self.steps) > 1

    @property
    def op(self) -> str:
        """The op of its steps ("gguf+bnb" for a unit of both)."""
        return "+".join(dict.fromkeys(s.op for s in self.steps))


_OWN_READ = ("--lora", "--tp-config")  # a gguf step whose tensors are not the checkpoint's own


def fusion_key(step: Step) -> tuple[str, ...] | None:
    """gguf steps with the same key are one GGUF matrix: their command lines are the same but
    for the output and `--type`. None: not a gguf step (or one without an output)."""
    if step.op != "gguf" or step.output is None:
        return None
    argv, out, kept = step.argv, str(step.output), []
    for i, arg in enumerate(argv):
        if arg == out or arg == "--type" or (i and argv[i - 1] == "--type"):
            continue
        kept.append(arg)
    return tuple(kept)


def shared_read(step: Step) -> Path | None:
    """The checkpoint a step reads as a plain stream, which a bnb step may share with other
    steps (`pipelines.fused`); None when it may not."""
    if step.op not in ("gguf", "bnb") or step.output is None or "model" not in step.sources:
        return None
    if step.op == "gguf" and any(flag in step.argv for flag in _OWN_READ):
        return None
    return step.sources["model"]


def make_plan(job: Job, sizes: dict[Path, Size] | None = None) -> list[Unit]:
    """Units in job order (a fused unit where its first step is), each with the units it
    follows and its memory estimate."""
    matrices: dict[tuple[str, ...], Unit] = {}
    by_read: dict[Path, Unit] = {}
    units: list[Unit] = []
    for step in job.steps:
        key, read = fusion_key(step), shared_read(step)
        unit = matrices.get(key) if key is not None else None
        if unit is None and read is not None and read in by_read:
            joined = by_read[read]
            if step.op == "bnb" or not any(s.op == "gguf" for s in joined.steps):  # one matrix per unit
                unit = joined
        if unit is not None:
            unit.steps.append(step)
        else:
            unit = Unit(step.name, [step])
            units.append(unit)
        if key is not None:
            matrices.setdefault(key, unit)
        if read is not None:
            by_read.setdefault(read, unit)
    for unit in units:
        if unit.fused:
            unit.name = f"{unit.steps[0].name}+{len(unit.steps) - 1}"  # '+' is in no step name
    made_by = {s.output: u.name for u in units for s in u.steps if s.output is not None}
    for unit in units:
        reads = {p for s in unit.steps for p in s.inputs}
        unit.after = sorted({made_by[p] for p in reads if p in made_by and made_by[p] != unit.name})
    sizes = dict(sizes if sizes is not None else input_sizes(job))
    for unit in units:
        for step in unit.steps:
            est = estimate(step, sizes)
            if est is not None and step.output is not None:
                sizes[step.output] = est
        unit.memory_bytes = _memory(unit, sizes)
    return units


def input_sizes(job: Job) -> dict[Path, Size]:
    """Sizes of the job's inputs that are checkpoints, from their headers."""
    from ..io.checkpoint import open_checkpoint

    sizes = {}
    for p in job.inputs.values():
        try:
            refs = open_checkpoint(p).tensors
        except WeightopsError:
            continue
        sizes[p] = Size(
            sum(r.numel for r in refs), sum(r.nbytes for r in refs), max((r.numel for r in refs), default=0)
        )
    return sizes


def _gguf_bytes_per_weight(type_name: str) -> float:
    """Of the 2-D weights of a `--type` (2 when unknown: click rejects it later)."""
    from ..quant import ggml_types

    ftype = ggml_types.find_file_type(type_name)
    return ggml_types.parse(ftype.tensor_type).bytes_per_weight if ftype else 2


def _follows(step: Step) -> list[Path]:
    """The input whose size the output follows (the delta for apply-delta and the target for
    make-delta, whose dtype `auto` keeps)."""
    return step.inputs[1:2] if step.op in ("apply-delta", "make-delta") else step.inputs[:1]


def estimate(step: Step, sizes: dict[Path, Size]) -> Size | None:
    """The size of what the step's output will hold, from the size of the input it follows."""
    if step.op == "imatrix":  # a few floats per matrix column, not a model
        return None
    follows = _follows(step)
    source = sizes.get(follows[0]) if follows else None
    if source is None or step.output is None:
        return None
    params, nbytes, largest = source
    o = step.options
    if step.op == "gguf":
        return Size(params, int(params * _gguf_bytes_per_weight(str(o.get("type", "f16")))), largest)
    if step.op == "bnb":
        return Size(params, int(params * (1 if int(o.get("bits", 8)) == 8 else 0.55)), largest)
    if str(o.get("dtype", dtypes.AUTO)) in dtypes.FLOAT_CHOICES:
        return Size(params, int(params * dtypes.itemsize(dtypes.FLOAT_CHOICES[str(o["dtype"])])), largest)
    return source


def _memory(unit: Unit, sizes: dict[Path, Size]) -> int:
    """A fused unit holds what one stream holds, plus about one more of the largest tensors for
    each bnb output beside it (the quantized parts of the weight it is writing)."""
    step = unit.steps[0]
    known = [sizes[p] for p in step.inputs if p in sizes]
    if not known:
        return PROCESS_BYTES
    if step.op in _LOADS_MODEL:
        return PROCESS_BYTES + 4 * max(s.params for s in known)
    held = _STREAM_TENSORS + sum(s.op == "bnb" for s in unit.steps[1:])
    return PROCESS_BYTES + 4 * held * max(s.largest for s in known)


def available_memory() -> int:
    """What the runner may plan with by default: MemAvailable (Linux), else 8 GB."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 10**9


# ---------------------------------------------------------------------------------------------- --dry-run


def document(job: Job, jobs: int, budget: int) -> dict:
    """What `--dry-run` prints: units (fused steps, what they wait for, memory), then every
    step's inputs, output and expected size; writes nothing."""
    sizes = input_sizes(job)
    units = make_plan(job, sizes)
    unit_of = {s.name: u.name for u in units for s in u.steps}
    steps = []
    for step in job.steps:
        est = estimate(step, sizes)
        if est is not None and step.output is not None:
            sizes[step.output] = est
        steps.append(
            {
                "name": step.name,
                "op": step.op,
                "unit": unit_of[step.name],
                "inputs": [str(p) for p in step.inputs],
                "output": str(step.output) if step.output else None,
                "expected_bytes": est.nbytes if est else None,
                "command": "weightops " + " ".join(step.argv),
            }
        )
    return {
        "job": job.name,
        "output": str(job.output),
        "dry_run": True,
        "jobs": jobs,
        "memory_budget_bytes": budget,
        "units": [
            {
                "name": u.name,
                "op": u.op,
                "fused": u.fused,
                "steps": [s.name for s in u.steps],
                "reads": str(u.steps[0].inputs[0]) if u.fused else None,
                "after": u.after,
                "memory_bytes": u.memory_bytes,
            }
            for u in units
        ],
        "steps": steps,
    }


def render(doc: dict) -> str:
    steps = {s["name"]: s for s in doc["steps"]}
    lines = [
        f"job {doc['job']} -> {doc['output']} (dry run: nothing is written)",
        f"{len(doc['steps'])} steps in {len(doc['units'])} units; up to {doc['jobs']} at a time within "
        f"{doc['memory_budget_bytes'] / 1e9:.1f} GB (estimated)",
    ]
    for i, u in enumerate(doc["units"], 1):
        after = f"  after: {', '.join(u['after'])}" if u["after"] else ""
        memory = f"  memory ~{u['memory_bytes'] / 1e9:.2f} GB"
        if u["fused"]:
            lines.append(
                f"{i:>2}. {u['name']} [{u['op']} x{len(u['steps'])}, fused: one read of {u['reads']}]{after}{memory}"
            )
            for name in u["steps"]:
                s = steps[name]
                lines.append(f"    - {name}  output: {s['output'] or '-'}  ({_size(s)})")
                lines.append(f"      = {s['command']}")
        else:
            s = steps[u["steps"][0]]
            lines.append(f"{i:>2}. {s['name']} [{s['op']}]  output: {s['output'] or '-'}  ({_size(s)}){after}{memory}")
            lines.append(f"    $ {s['command']}")
    return "\n".join(lines)


def _size(step: dict) -> str:
    return f"~{step['expected_bytes'] / 1e6:.1f} MB" if step["expected_bytes"] else "-"
