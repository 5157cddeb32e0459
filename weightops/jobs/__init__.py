"""Release jobs: a TOML file of named inputs and steps, planned into units, run to completion
or resumed.

    spec.py       load and validate a job file into steps (a gguf step's type list: one step per type)
    planner.py    units (gguf steps on one input fused into one read), their order, memory estimates
    executors.py  where units run: the interface, local child processes, `run_task` (attempts, retries)
    ray_executor.py  `--executor ray`: each unit a Ray task (resource and path checks first)
    worker.py     the child process of a fused unit
    runner.py     scheduling (`--jobs`, the memory budget), resume, finishing each step
    report.py     release-report.json / .md;  card.py  the model card;  screen.py  what is shown

Job file:

    [job]
    name = "chatyuan-7b release"
    output = "release"                 # directory for artefacts, the report and the model card
    base_model = "org/model"           # optional: the Hub model the artefacts derive from
    executor = "local"                 # or "ray": units as tasks on a Ray cluster (--executor overrides)
    split_max_size = "50G"             # optional: GGUF steps write split sets of files this size
                                       # (default: split only what the Hub's 200 GB limit refuses)

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

from .planner import document as plan_document
from .planner import render as render_plan
from .report import render_report, write_report
from .runner import HASH_CACHE, run_job
from .spec import REPORT, STATE_DIR, Job, Step, load_job


def plan(job: Job, jobs: int = 1, budget: int | None = None) -> dict:
    """What `--dry-run` prints for a loaded job (writes nothing)."""
    from .planner import available_memory

    return plan_document(job, jobs, available_memory() if budget is None else budget)


__all__ = [
    "HASH_CACHE",
    "REPORT",
    "STATE_DIR",
    "Job",
    "Step",
    "load_job",
    "plan",
    "render_plan",
    "render_report",
    "run_job",
    "write_report",
]
