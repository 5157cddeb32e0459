"""Where a job's units run. The runner decides what may start (dependencies, `--jobs`, the
memory budget) and hands each unit to an executor as a `Task`: plain data (the child's
command line, its log, its memory estimate), so an executor that runs tasks elsewhere (a Ray
cluster: one remote task per unit, `memory=task.memory_bytes`, on a shared file system) needs
nothing else. The local executor runs each task in a child process on this machine, one thread
waiting on each, and measures its wall time and peak RSS.
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .. import console


@dataclass(frozen=True)
class Task:
    unit: str
    args: tuple[
        str, ...
    ]  # after the interpreter: ("-m", "weightops", "-q", ...) or ("-m", "weightops.jobs.worker", ...)
    log: Path  # the child's stdout and stderr
    memory_bytes: int  # the plan's estimate of its peak


@dataclass(frozen=True)
class Outcome:
    unit: str
    exit_code: int
    wall_s: float
    peak_rss_mb: float
    started: float  # time.time() when the child started
    ended: float


class Executor(Protocol):
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


def run_child(args: tuple[str, ...] | list[str], log: Path, started=None) -> tuple[int, float, float]:
    """Run `python ARGS` with its output (stdout, stderr, other libraries' warnings) going to
    LOG only. `started(proc)` is told the process once it runs. Returns (exit code, wall
    seconds, peak RSS in MB)."""
    env = dict(os.environ, **console.child_env())
    start = time.perf_counter()
    with open(log, "wb") as logf:
        proc = subprocess.Popen([sys.executable, *args], stdout=logf, stderr=subprocess.STDOUT, env=env)
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


class LocalExecutor:
    """Each task a child process of this one, waited on by a thread of its own."""

    def __init__(self) -> None:
        self._done: queue.Queue[Outcome | BaseException] = queue.Queue()
        self._procs: dict[str, subprocess.Popen] = {}
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def submit(self, task: Task) -> None:
        thread = threading.Thread(target=self._run, args=(task,), daemon=True)
        self._threads.append(thread)
        thread.start()

    def _run(self, task: Task) -> None:
        def started(proc: subprocess.Popen) -> None:
            with self._lock:
                self._procs[task.unit] = proc

        began = time.time()
        try:
            code, wall, rss = run_child(task.args, task.log, started)
            self._done.put(Outcome(task.unit, code, wall, rss, began, time.time()))
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


EXECUTORS = {"local": LocalExecutor}
