"""`weightops run --executor ray` against the local executor on the demo job (`weightops demo`'s
release matrix: tiny models, every operator, verification in llama.cpp), on a Ray cluster of
one head with 2 CPUs (2 workers at most) that the script starts on this machine and stops.

    python benchmarks/bench_ray.py [--workdir DIR] [--order local-first|ray-first]

Both runs execute the same units one after another (`--jobs 1`, the default). Per unit
it reports what each executor adds to the unit's own work: the time from
submitting the step to its result, minus the wall time of the step's process (measured where
it ran). For Ray that is scheduling, a worker (started or reused), shipping the arguments and
the result; for the local executor it is starting the child. The one-off cost of joining the
cluster and checking the paths on every node is reported apart. Artefacts of the two runs must
be identical (their sha256 manifests are compared). Needs `pip install 'weightops[ray]'`.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Ray reads its token settings when imported: a token of this run's own, nothing in ~/.ray
AUTH = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_USAGE_STATS_ENABLED": "0"}
os.environ.update(AUTH)

from weightops import jobs  # noqa: E402
from weightops.jobs import demo, executors, ray_executor  # noqa: E402

HEAD = """
import sys, ray
ray.init(num_cpus=2, num_gpus=0, object_store_memory=100 * 2**20, include_dashboard=False,
         _temp_dir=sys.argv[1], logging_level="ERROR")
print(ray.get_runtime_context().gcs_address, flush=True)
sys.stdin.read()
ray.shutdown()
"""

timings: list[tuple[str, float, float]] = []  # (executor, submit -> result, step wall)
checks: list[tuple[str, float]] = []


def _timed(cls: type, name: str) -> None:
    """Record, for every unit an executor of `cls` runs, the time from submit to its outcome
    (the job runs one unit at a time, so the wait is that unit's alone)."""
    submit, wait, check = cls.submit, cls.wait, cls.check
    submitted: dict[str, float] = {}

    def timed_submit(self, task):
        submitted[task.unit] = time.perf_counter()
        submit(self, task)

    def timed_wait(self):
        outcome = wait(self)
        timings.append((name, time.perf_counter() - submitted.pop(outcome.unit), outcome.wall_s))
        return outcome

    def timed_check(self, job, units):
        start = time.perf_counter()
        check(self, job, units)
        checks.append((name, time.perf_counter() - start))

    cls.submit, cls.wait, cls.check = timed_submit, timed_wait, timed_check


def _run(where: Path, models: Path, name: str, address: str | None) -> tuple[dict, float]:
    where.mkdir()
    (where / "models").symlink_to(models)
    (where / "release.toml").write_text(demo.template())
    start = time.perf_counter()
    report = jobs.run_job(where / "release.toml", executor=name, ray_address=address)
    return report, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--order", choices=["local-first", "ray-first"], default="local-first")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-ray-", dir=args.workdir))
    temp = tempfile.mkdtemp(prefix="wo-ray-", dir="/tmp")  # Ray's socket paths must stay short
    _timed(executors.LocalExecutor, "local")
    _timed(ray_executor.RayExecutor, "ray")
    repo = str(Path(__file__).resolve().parents[1])  # the workers import this weightops
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p))
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen([sys.executable, "-c", HEAD, temp], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    try:
        assert head.stdout is not None
        address = head.stdout.readline().decode().strip()
        models = work / "models"
        demo.build_models(models)
        runs = {}
        for name in ["local", "ray"] if args.order == "local-first" else ["ray", "local"]:
            runs[name] = _run(work / name, models, name, address if name == "ray" else None)
    finally:
        if head.stdin:
            head.stdin.close()
        head.wait(timeout=120)
        shutil.rmtree(temp, ignore_errors=True)
    (local, local_wall), (ray, ray_wall) = runs["local"], runs["ray"]
    same = local["artefacts"] == ray["artefacts"]
    steps = len(local["steps"])
    print(f"demo job, {steps} steps, {len(local['artefacts'])} artefacts; outputs identical: {same}")
    print("| executor | job wall (s) | steps' own wall (s) | added per step: median / max (s) | check (s) |")
    print("|---|---|---|---|---|")
    for name, wall in (("local", local_wall), ("ray", ray_wall)):
        added = [total - own for ex, total, own in timings if ex == name]
        own = sum(own for ex, _, own in timings if ex == name)
        check = sum(t for ex, t in checks if ex == name)
        print(f"| {name} | {wall:.1f} | {own:.1f} | {statistics.median(added):.3f} / {max(added):.3f} | {check:.2f} |")
    nodes = {s.get("node") for s in ray["steps"]}
    print(f"ray steps ran on {sorted(nodes)}, devices {sorted({s.get('device') for s in ray['steps']})}")
    shutil.rmtree(work)
    if not same:
        sys.exit("the two executors' artefacts differ")


if __name__ == "__main__":
    main()
