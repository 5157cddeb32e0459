"""`--executor ray`: each unit of a job is a Ray task on a cluster (`pip install weightops[ray]`).

The Ray task runs the unit's child process as the local executor does (`executors.run_task`:
measured, told where it ran), on whichever node has the CPUs, memory (the plan's estimate) and
GPU the unit asks for.
The runner stays on the machine that started the job: it hashes, writes the markers, the
report and the card. So every path a step names must mean the same bytes on every node:
shared storage. Before anything runs the executor refuses, instead of leaving Ray to wait
forever for resources nobody has, a unit that no node can place (a GPU step on a cluster
without GPUs), and paths that a node does not see as the runner does (a task per node
compares them, and reads back a file the runner has just written into the job's output).

A task whose worker dies (its node lost, the process OOM-killed) is retried by Ray up to
`MAX_RETRIES` times. Step outputs are published atomically, so the retry starts from nothing
half-written, removes what a dead attempt did publish, and writes the same bytes. A step that
fails on its own (a non-zero exit) is not retried: it would fail again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import WeightopsError, shown
from ..io import outputs
from .executors import Outcome, Task, run_task

if TYPE_CHECKING:
    from .planner import Unit
    from .spec import Job

MAX_RETRIES = 3  # of a task whose worker died
CHECK_TIMEOUT_S = 120.0  # for every node to answer the path check (it starts a worker on each)


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise WeightopsError(
            "--executor ray needs Ray on this machine and on the cluster: pip install 'weightops[ray]'"
        ) from None
    return ray


@contextlib.contextmanager
def _gpus_hidden(hide: bool):
    """A unit that asked for no GPU sees none (else `--device auto` would take one that Ray
    gave to another task); restored after, since Ray reuses the worker."""
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    if hide:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    try:
        yield
    finally:
        if hide and before is None:
            del os.environ["CUDA_VISIBLE_DEVICES"]
        elif hide and before is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = before


def _run_unit(task: Task) -> Outcome:
    """The Ray task: the unit's child process on this worker's node."""
    with _gpus_hidden(not task.gpu):
        try:
            return run_task(task, "ray", die_with_parent=True)
        except WeightopsError as e:  # e.g. an earlier attempt's output is not weightops' own
            now = time.time()
            return Outcome(task.unit, -1, 0.0, 0.0, now, now, socket.gethostname(), "", "ray", error=str(e))


def _look(paths: list[tuple[str, int | None]], token: str, text: str) -> tuple[str, list[str]]:
    """Run on each node: (its host name, how the paths differ from the runner's view). A
    path is (name, size of a file, None for a directory); `token` must hold `text`."""
    problems = []
    for name, size in paths:
        p = Path(name)
        try:
            st = p.stat()
        except OSError as e:
            problems.append(f"{name}: {e.strerror}")
            continue
        if size is None and not p.is_dir():
            problems.append(f"{name}: not a directory here")
        elif size is not None and (not p.is_file() or st.st_size != size):
            problems.append(f"{name}: a different file here ({st.st_size} bytes, {size} where the job runs)")
    try:
        same = Path(token).read_text() == text
    except OSError:
        same = False
    if not same:
        problems.append(f"{Path(token).parent.parent}: the job's output directory is not the same directory here")
    return socket.gethostname(), problems


def _node_name(node: dict) -> str:
    return shown(node.get("NodeManagerHostname") or node.get("NodeManagerAddress") or node["NodeID"][:8])


def _resources(node: dict) -> str:
    r = node.get("Resources", {})
    return f"{_node_name(node)}: {r.get('CPU', 0):g} CPU, {r.get('GPU', 0):g} GPU, {r.get('memory', 0) / 2**30:.1f} GiB"


class RayExecutor:
    name = "ray"

    def __init__(self, address: str | None = None):
        self.address = address or os.environ.get("RAY_ADDRESS") or "auto"
        self._ray: Any = None
        self._task: Any = None  # _run_unit as a Ray remote function
        self._connected_here = False
        self._running: dict[Any, tuple[Task, float]] = {}  # Ray object ref -> (task, when submitted)

    def _connect(self) -> Any:
        """Join the cluster (or use the connection this process already has)."""
        if self._ray is not None:
            return self._ray
        ray = _import_ray()
        if not ray.is_initialized():
            try:
                ray.init(address=self.address, logging_level=logging.WARNING, log_to_driver=False)
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise WeightopsError(
                    f"cannot join the Ray cluster at {shown(self.address)}: {shown(str(e).strip().splitlines()[0])}"
                    " (start one with `ray start --head`, then pass its address with --ray-address)"
                ) from None
            self._connected_here = True
        self._ray, self._task = ray, ray.remote(_run_unit)
        return ray

    def check(self, job: Job, units: list[Unit]) -> None:
        if not units:
            return
        ray = self._connect()
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        where = f"the Ray cluster at {shown(self.address)} ({'; '.join(map(_resources, nodes)) or 'no nodes'})"
        for unit in units:
            step = next((s.name for s in unit.steps if s.gpu), unit.steps[0].name)
            fits = [
                node
                for node in nodes
                if node["Resources"].get("CPU", 0) >= unit.cpus
                and node["Resources"].get("GPU", 0) >= (1 if unit.gpu else 0)
                and node["Resources"].get("memory", 0) >= unit.memory_bytes
            ]
            if fits:
                continue
            if unit.gpu and not any(node["Resources"].get("GPU", 0) for node in nodes):
                raise WeightopsError(
                    f"{job.path}: step {step!r} asks for a GPU (gpu = true), but no node of {where} has one; "
                    "nothing was run: add a GPU node, or drop gpu to run it on a CPU"
                )
            raise WeightopsError(
                f"{job.path}: step {step!r} needs {unit.cpus:g} CPU{', a GPU' if unit.gpu else ''}, "
                f"{unit.memory_bytes / 2**30:.1f} GiB on one node, which no node of {where} has; nothing was run"
            )
        self._check_paths(ray, job, [n for n in nodes if n["Resources"].get("CPU", 0) > 0])

    def _check_paths(self, ray: Any, job: Job, nodes: list[dict]) -> None:
        """Every node that may run a step sees the inputs and the output directory as the runner does."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from .spec import STATE_DIR

        named = [*job.inputs.values(), *(p for s in job.steps for p in s.paths.values())]
        paths = [(str(p), None if p.is_dir() else p.stat().st_size) for p in dict.fromkeys(named) if p.exists()]
        token = job.output / STATE_DIR / "ray-path-check"
        text = uuid.uuid4().hex
        outputs.start_file(token, "the Ray path check")
        token.write_text(text)
        look = ray.remote(_look)
        try:
            refs = {
                _node_name(node): look.options(
                    num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
                ).remote(paths, str(token), text)
                for node in nodes
            }
            ready, late = ray.wait(list(refs.values()), num_returns=len(refs), timeout=CHECK_TIMEOUT_S)
            problems = [f"{name}: did not answer within {CHECK_TIMEOUT_S:g} s" for name, r in refs.items() if r in late]
            for name, ref in refs.items():
                if ref in ready:
                    try:
                        host, seen = ray.get(ref)
                    except Exception as e:  # e.g. weightops is not installed there
                        problems.append(f"{name}: {type(e).__name__}: {shown(str(e).strip().splitlines()[-1])}")
                        continue
                    problems += [f"{shown(host)}: {shown(p)}" for p in seen]
            for ref in late:
                ray.cancel(ref, force=True)
        finally:
            outputs.remove(token, "the Ray path check", announce=False)
        if problems:
            raise WeightopsError(
                f"{job.path}: the Ray workers do not see the job's paths as this machine does (put inputs and "
                "[job] output on storage every node mounts at the same path); nothing was run:\n  "
                + "\n  ".join(problems)
            )

    def submit(self, task: Task) -> None:
        self._connect()
        remote = self._task.options(
            num_cpus=task.cpus,
            num_gpus=1 if task.gpu else 0,
            memory=task.memory_bytes,
            max_retries=MAX_RETRIES,
            retry_exceptions=False,
            name=f"weightops {task.unit}",
        )
        self._running[remote.remote(task)] = (task, time.time())

    def wait(self) -> Outcome:
        """The first task to end; a Ray task that failed (its worker died more than
        MAX_RETRIES times) as an outcome with `error` set."""
        ray = self._connect()
        while True:
            ready, _ = ray.wait(list(self._running), num_returns=1, timeout=0.5)  # a timeout keeps Ctrl-C deliverable
            if ready:
                break
        task, began = self._running.pop(ready[0])
        try:
            return ray.get(ready[0])
        except Exception as e:
            first = (str(e).strip().splitlines() or [""])[0]
            tried = len(task.attempts.read_text().splitlines()) if task.attempts and task.attempts.is_file() else 0
            what = type(e).__name__ + (f": {shown(first)}" if first else "")
            why = f"its Ray task failed ({what}) after {tried} attempt(s)"
            return Outcome(task.unit, -1, 0.0, 0.0, began, time.time(), "", "", "ray", tried, why)

    def close(self) -> None:
        """Cancel what still runs (its child dies with its worker), then leave the cluster."""
        if self._ray is not None:
            for ref in self._running:
                with contextlib.suppress(Exception):
                    self._ray.cancel(ref, force=True)
            self._running.clear()
        if self._connected_here:
            self._ray.shutdown()
            self._connected_here = False
