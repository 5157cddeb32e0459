"""Where a job's units run. The runner decides what may start (dependencies, `--jobs`, the
memory budget) and hands each unit to an executor as a `Task`: plain data (the child's
command line, its log, its memory estimate), so an executor that runs tasks elsewhere (a Ray
cluster: one remote task per unit, `memory=task.memory_bytes`, on a shared file system) needs
nothing else. The local executor runs each task in a child process on this machine, one thread
waiting on each, and measures its wall time and peak RSS.

What a task does where it runs is `run_task`, the same for every executor: count the attempt,
remove what an earlier attempt that died published (only what weightops wrote), run the child,
measure it and say where it ran (node, device). A retried task therefore starts from the state
the runner left, and the operators' atomic outputs (io/outputs.py) publish nothing
half-written, so a retry writes the same bytes.
"""

from __future__ import annotations

import json
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from .. import console
from ..errors import WeightopsError
from ..io import outputs

if TYPE_CHECKING:
    from .planner import Unit
    from .spec import Job


@dataclass(frozen=True)
class Task:
    unit: str
    args: tuple[
        str, ...
    ]  # after the interpreter: ("-m", "weightops", "-q", ...) or ("-m", "weightops.jobs.worker", ...)
    log: Path  # the child's stdout and stderr
    memory_bytes: int  # the plan's estimate of its peak
    cpus: float = 1  # CPUs to reserve (the planner's say)
    gpu: bool = False  # a step of it has `gpu = true`: it runs where there is a GPU
    uses_device: bool = False  # its command takes --device (where `auto` picks CUDA when present)
    clear: tuple[Path, ...] = ()  # what an attempt that died may have published: removed first
    published: Path | None = None  # a fused unit's list of published outputs: emptied on a retry
    attempts: Path | None = None  # one JSON line per attempt is appended here


@dataclass(frozen=True)
class Outcome:
    unit: str
    exit_code: int  # -1 when the executor could not run it (see `error`)
    wall_s: float
    peak_rss_mb: float
    started: float  # time.time() when the child started
    ended: float
    node: str = ""
    device: str = ""  # "cpu", "cuda" or "cuda (GPU N)"
    executor: str = "local"
    attempts: int = 1
    error: str = ""  # why the executor could not run it (e.g. its worker died every time)

    def measured(self) -> dict:
        """What the report and the finished marker keep of it."""
        return {
            "wall_s": round(self.wall_s, 3),
            "peak_rss_mb": round(self.peak_rss_mb, 1),
            "node": self.node,
            "device": self.device,
            "executor": self.executor,
            "attempts": self.attempts,
        }


class Executor(Protocol):
    def check(self, job: Job, units: list[Unit]) -> None:
        """Refuse (WeightopsError) before anything runs what cannot run here: a GPU nobody
        has, paths the workers cannot see."""

    def submit(self, task: Task) -> None:
        """Start the task; return at once."""

    def wait(self) -> Outcome:
        """Block until a submitted task ends; its outcome."""

    def close(self) -> None:
        """Stop what still runs (the runner is interrupted, or failed) and wait for it."""


class PeakRss(threading.Thread):
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


def _die_with_parent() -> Callable[[], None]:
    """A child's pre-exec hook (Linux) that has the kernel kill it when the process that
    started it dies: a Ray worker killed mid-step must not leave its step running on, still
    writing the temporary that the retry is about to replace."""
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved before fork: the hook only calls it
    return lambda: prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL


def run_child(
    args: tuple[str, ...] | list[str],
    log: Path,
    started: Callable[[subprocess.Popen], None] | None = None,
    append: bool = False,
    die_with_parent: bool = False,
) -> tuple[int, float, float]:
    """Run `python ARGS` with its output (stdout, stderr, other libraries' warnings) going to
    LOG only (appended to: a retry's). `started(proc)` is told the process once it runs.
    Returns (exit code, wall seconds, peak RSS in MB)."""
    env = dict(os.environ, **console.child_env())
    hook = _die_with_parent() if die_with_parent and sys.platform == "linux" else None
    start = time.perf_counter()
    with open(log, "ab" if append else "wb") as logf:
        proc = subprocess.Popen(
            [sys.executable, *args], stdout=logf, stderr=subprocess.STDOUT, env=env, preexec_fn=hook
        )
        if started is not None:
            started(proc)
        sampler = PeakRss(proc.pid)
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


def device(task: Task) -> str:
    """What the task computed on: a command without --device runs on the CPU; `auto` is CUDA
    when the process sees a GPU (an executor that gave it none hides them all)."""
    if not task.uses_device:
        return "cpu"
    argv = list(task.args)
    asked = argv[argv.index("--device") + 1] if "--device" in argv else "auto"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if asked == "cpu" or (visible is not None and visible.strip() in ("", "-1")):
        return "cpu"
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    return f"cuda (GPU {visible})" if visible else "cuda"


def run_task(
    task: Task,
    executor: str,
    started: Callable[[subprocess.Popen], None] | None = None,
    die_with_parent: bool = False,
) -> Outcome:
    """Run one task here: count the attempt, clear what an earlier one published, run, measure."""
    attempt = 1
    if task.attempts is not None:
        if task.attempts.is_file():
            attempt += len(task.attempts.read_text().splitlines())
        with open(task.attempts, "a") as f:
            f.write(json.dumps({"attempt": attempt, "node": socket.gethostname(), "pid": os.getpid()}) + "\n")
    if attempt > 1:
        for path in task.clear:  # what an attempt that died after publishing left
            outputs.remove(path, f"unit {task.unit!r}: output of an earlier attempt", announce=False)
        if task.published is not None and task.published.is_file():
            task.published.write_text("")
        with open(task.log, "ab") as f:
            f.write(f"\nweightops: attempt {attempt} (the process running attempt {attempt - 1} died)\n".encode())
    began = time.time()
    code, wall, rss = run_child(task.args, task.log, started, append=attempt > 1, die_with_parent=die_with_parent)
    return Outcome(
        task.unit, code, wall, rss, began, time.time(), socket.gethostname(), device(task), executor, attempt
    )


class LocalExecutor:
    """Each task a child process of this one, waited on by a thread of its own."""

    def __init__(self) -> None:
        self._done: queue.Queue[Outcome | BaseException] = queue.Queue()
        self._procs: dict[str, subprocess.Popen] = {}
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def check(self, job: Job, units: list[Unit]) -> None:
        gpu = [s.name for u in units if u.gpu for s in u.steps if s.gpu]
        if gpu:
            import torch

            if not torch.cuda.is_available():
                raise WeightopsError(
                    f"{job.path}: step {gpu[0]!r} asks for a GPU (gpu = true), but torch sees no CUDA device on "
                    "this machine; run it where there is one (--executor ray on a cluster with GPUs) or drop gpu"
                )

    def submit(self, task: Task) -> None:
        thread = threading.Thread(target=self._run, args=(task,), daemon=True)
        self._threads.append(thread)
        thread.start()

    def _run(self, task: Task) -> None:
        def started(proc: subprocess.Popen) -> None:
            with self._lock:
                self._procs[task.unit] = proc

        try:
            self._done.put(run_task(task, "local", started))
        except BaseException as e:  # reported to the runner's thread, which raises it
            self._done.put(e)
        finally:
            with self._lock:
                self._procs.pop(task.unit, None)

    def wait(self) -> Outcome:
        while True:
            try:
                item = self._done.get(timeout=0.5)  # a timeout keeps Ctrl-C deliverable
            except queue.Empty:
                continue
            if isinstance(item, BaseException):
                raise item
            return item

    def close(self) -> None:
        with self._lock:
            running = list(self._procs.values())
        for proc in running:
            if proc.poll() is None:
                proc.terminate()
        for thread in self._threads:
            thread.join()
        self._threads.clear()


def _ray(address: str | None) -> Executor:
    from .ray_executor import RayExecutor

    return RayExecutor(address)


def _local(address: str | None) -> Executor:
    if address:
        raise WeightopsError('--ray-address needs --executor ray (or executor = "ray" in [job])')
    return LocalExecutor()


EXECUTORS: dict[str, Callable[[str | None], Executor]] = {"local": _local, "ray": _ray}
"""Executors by name (`--executor`, `[job] executor`), each made from the cluster address."""
