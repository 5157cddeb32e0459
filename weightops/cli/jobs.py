"""`weightops run`: release jobs from a TOML file."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .. import jobs as job_lib
from . import main


@main.command()
@click.argument("job_file", metavar="JOB.toml", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--resume",
    is_flag=True,
    help="Skip steps that are complete: finished marker, unchanged options, and inputs and output files "
    "that hash now as they did when the step finished (unchanged files are not read again); redo "
    "anything else from scratch.",
)
@click.option("--dry-run", is_flag=True, help="Print the plan (steps, inputs, outputs, expected sizes); write nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan or report as JSON on stdout.")
@click.option(
    "--jobs",
    "-j",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Units that may run at once (independent ones: a unit starts when the outputs it reads exist).",
)
@click.option(
    "--max-memory",
    metavar="SIZE",
    help="Memory the running units' estimates must fit (e.g. 64GB; default: the memory available now). "
    "A unit larger than this runs alone.",
)
@click.option(
    "--executor",
    type=click.Choice(["local", "ray"]),
    default=None,
    help="Where units run: `local` (child processes on this machine, the default) or `ray` (tasks on a Ray "
    "cluster, which needs `pip install weightops[ray]`; paths must be on storage every node sees). "
    "Overrides [job] executor.",
)
@click.option(
    "--ray-address",
    metavar="ADDR",
    default=None,
    help="The Ray cluster to run on (HOST:PORT of its head, as `ray start --head` prints). "
    "Default: $RAY_ADDRESS, else the cluster running on this machine.",
)
def run(
    job_file: Path,
    resume: bool,
    dry_run: bool,
    as_json: bool,
    jobs: int,
    max_memory: str | None,
    executor: str | None,
    ray_address: str | None,
) -> None:
    """Run the steps of JOB.toml in order and write release-report.md and
    release-report.json (wall time and peak RSS per step, verification results, sha256 of
    every artefact) into the job's output directory.

    The screen (stderr) gets one line per step (status, wall time, artefact and size, or the
    check's KLD and top-1; a failed step's reason) and a short summary with the report's
    path. Each step's own output, other libraries' warnings included, is in its log,
    OUTPUT/.weightops-job/STEP.log.

    Each step is a weightops command with the same options as on the command line; `@name`
    refers to an input or an earlier step's output. A gguf step may take a list of types
    (`type = ["q4_k_m", "q8_0"]`, output "name-{type}.gguf"); gguf steps that read the same
    input with the same options are fused: one read writes every file, and bnb steps on that
    input join it (unless the gguf step merges --lora or reads --tp-config). Verify steps against
    the same reference run it once. --dry-run shows the units. A verify step that fails stops the
    job with exit code 3 and the report says why. See examples/release.toml.

    Refused before anything runs (every problem listed): a step output that is not a path
    inside the job's output directory, or that is, holds or lies inside the job file, an input
    or another step's output; a job output that is the job file's directory or holds an
    input; step names that are not plain file names, or repeat; a step with gpu = true where
    no GPU is (this machine for --executor local, every node for ray); with --executor ray,
    paths a node does not see as this machine does.
    """
    doc = job_lib.run_job(
        job_file,
        resume=resume,
        dry_run=dry_run,
        jobs=jobs,
        max_memory=max_memory,
        executor=executor,
        ray_address=ray_address,
    )
    if as_json:
        click.echo(json.dumps(doc, indent=2))
    elif dry_run:
        click.echo(job_lib.render_plan(doc))
