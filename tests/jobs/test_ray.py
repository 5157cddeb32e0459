"""`weightops run --executor ray` on a Ray cluster the tests start themselves: a head on
127.0.0.1 with 2 CPUs and no GPU, in a process of its own that is shut down at the end.
The oracle for every artefact is the local executor's run of the same job. The checks that
need no cluster (the per-node path check, the job file's keys) run without Ray installed."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from weightops import jobs
from weightops.errors import WeightopsError

# Ray's token authentication with a token of these tests' own (nothing written to ~/.ray). Ray
# reads it when it is imported, so it is set first, for this process and the cluster's.
AUTH = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_USAGE_STATS_ENABLED": "0"}
os.environ.update(AUTH)

STEPS = """
[[steps]]
name = "q8"
op = "gguf"
model = "@source"
output = "tiny-q8_0.gguf"
type = "q8_0"

[[steps]]
name = "int8"
op = "bnb"
model = "@source"
output = "tiny-int8"
bits = 8

[[steps]]
name = "check-q8"
op = "verify"
reference = "@source"
candidate = "@q8"
max-tokens = 16
max-kld = 0.5
min-top1 = 0.3
"""

# Started by the cluster process: prints the head's address, serves until its stdin closes.
HEAD = """
import sys, ray
ray.init(num_cpus=2, num_gpus=0, object_store_memory=100 * 2**20, include_dashboard=False,
         _node_ip_address="127.0.0.1", _temp_dir=sys.argv[1], logging_level="ERROR")
print(ray.get_runtime_context().gcs_address, flush=True)
sys.stdin.read()
ray.shutdown()
"""

# On the cluster's PYTHONPATH: a step publishing the file named in HOLD/target stops itself
# just before publishing (its temporary complete, the output not there yet), once, after
# writing "WORKER_PID CHILD_PID" to HOLD/pids, so the test can kill its worker there.
SITECUSTOMIZE = """
import os


def _hold(where):
    try:
        with open(os.path.join(where, "target")) as f:
            target = f.read()
    except OSError:
        return
    link, rename = os.link, os.rename

    def stop_before(dst):
        if os.fspath(dst) != target:
            return
        try:
            fd = os.open(os.path.join(where, "pids"), os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        except FileExistsError:  # the retry goes through
            return
        os.write(fd, f"{os.getppid()} {os.getpid()}".encode())
        os.close(fd)
        os.kill(os.getpid(), 19)  # SIGSTOP

    def held_link(src, dst, *a, **k):
        stop_before(dst)
        return link(src, dst, *a, **k)

    def held_rename(src, dst, *a, **k):
        stop_before(dst)
        return rename(src, dst, *a, **k)

    os.link, os.rename = held_link, held_rename


if os.environ.get("WEIGHTOPS_TEST_HOLD"):
    _hold(os.environ["WEIGHTOPS_TEST_HOLD"])
"""


def _job(where: Path, source: Path, steps: str = STEPS, head: str = "") -> Path:
    where.mkdir(parents=True, exist_ok=True)
    job = where / "job.toml"
    job.write_text(f'[job]\nname = "tiny"\noutput = "out"\n{head}\n[inputs]\nsource = "{source}"\n{steps}')
    return job


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """(address, hold directory) of a Ray head with 2 CPUs and no GPU; always shut down. The
    tests that use it skip when Ray is not installed."""
    ray = pytest.importorskip("ray")
    base = tmp_path_factory.mktemp("ray-cluster")
    hooks, hold = base / "hooks", base / "hold"
    hooks.mkdir()
    hold.mkdir()
    (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE)
    repo = str(Path(jobs.__file__).resolve().parents[2])
    path = os.pathsep.join(p for p in (str(hooks), repo, os.environ.get("PYTHONPATH", "")) if p)
    temp = tempfile.mkdtemp(prefix="wo-ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = dict(os.environ, PYTHONPATH=path, WEIGHTOPS_TEST_HOLD=str(hold), **AUTH)
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [sys.executable, "-c", HEAD, temp], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True
    )

    def stop():
        if proc.stdin:
            proc.stdin.close()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)

    try:
        assert proc.stdout is not None
        address = proc.stdout.readline().strip()
        assert address, "the Ray head did not start"
        yield address, hold
    finally:
        stop()


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, tiny_llama):
    """The oracle: the job run by the local executor."""
    job = _job(tmp_path_factory.mktemp("local"), tiny_llama)
    return job, jobs.run_job(job)


def _manifests(job: Path) -> dict[str, str]:
    out = job.parent / "out"
    return {p.relative_to(out).as_posix(): p.read_text() for p in sorted(out.rglob("*weightops-manifest.json"))}


def test_ray_run_matches_local_and_resumes_across_executors(cluster, local_run, tmp_path, tiny_llama):
    address, _ = cluster
    local_job, local = local_run
    job = _job(tmp_path, tiny_llama, head='executor = "ray"')  # [job] executor
    report = jobs.run_job(job, ray_address=address)
    assert report["passed"] and [s["status"] for s in report["steps"]] == ["ok"] * 3
    assert report["artefacts"] == local["artefacts"]
    assert _manifests(job) == _manifests(local_job) and len(_manifests(job)) == 2
    for s in report["steps"]:
        assert s["executor"] == "ray" and s["device"] == "cpu" and s["node"] and s["attempts"] == 1
        assert s["wall_s"] > 0 and s["peak_rss_mb"] > 50
    md = (tmp_path / "out" / "release-report.md").read_text()
    assert "cpu (ray) |" in md
    # the card lists devices only, so it is the local run's, byte for byte
    assert (tmp_path / "out" / "README.md").read_bytes() == (local_job.parent / "out" / "README.md").read_bytes()

    resumed = jobs.run_job(job, resume=True, executor="local")  # made on Ray, complete here
    assert [s["status"] for s in resumed["steps"]] == ["skipped (complete)"] * 3
    assert all(s["executor"] == "ray" for s in resumed["steps"])  # where it was made
    back = jobs.run_job(local_job, resume=True, executor="ray", ray_address=address)
    assert [s["status"] for s in back["steps"]] == ["skipped (complete)"] * 3


def test_killed_worker_is_retried_with_the_same_bytes(cluster, local_run, tmp_path, tiny_llama):
    address, hold = cluster
    _, local = local_run
    job = _job(tmp_path, tiny_llama)
    target = tmp_path / "out" / "tiny-q8_0.gguf"
    (hold / "target").write_text(str(target))
    killed: list[int] = []
    seen: list[bool] = []  # at the kill: a temporary of the output there, the output there

    def kill_worker():
        deadline = time.time() + 300
        while not (hold / "pids").is_file() or not (hold / "pids").read_text():
            if time.time() > deadline:
                return
            time.sleep(0.05)
        worker, child = map(int, (hold / "pids").read_text().split())
        seen.append(bool(list(tmp_path.joinpath("out").glob(".tiny-q8_0.gguf.weightops-tmp-*"))))
        seen.append(target.exists())
        os.kill(worker, signal.SIGKILL)
        killed.extend((worker, child))

    killer = threading.Thread(target=kill_worker)
    killer.start()
    try:
        report = jobs.run_job(job, executor="ray", ray_address=address)
    finally:
        killer.join()
        (hold / "target").unlink()
        (hold / "pids").unlink(missing_ok=True)
    assert killed, "the step never reached its publish"
    assert seen == [True, False]  # killed with its output written but not published
    q8 = report["steps"][0]
    assert q8["status"] == "ok" and q8["attempts"] == 2, q8
    assert report["artefacts"] == local["artefacts"]
    assert not list((tmp_path / "out").glob(".*.weightops-tmp-*"))
    deadline = time.time() + 10  # the held child died with its worker
    while Path(f"/proc/{killed[1]}").exists() and "Z" not in _state(killed[1]):
        assert time.time() < deadline, "the step's process outlived its worker"
        time.sleep(0.05)
    log = (tmp_path / "out" / jobs.STATE_DIR / f"{q8['unit']}.log").read_text()  # q8+1: int8 shares its read
    assert "attempt 2" in log


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"


def test_gpu_step_on_a_cluster_without_gpus_fails_fast(cluster, tmp_path, tiny_llama):
    address, _ = cluster
    steps = STEPS.replace('op = "verify"', 'op = "verify"\ngpu = true')
    job = _job(tmp_path, tiny_llama, steps)
    # refused before any step (a wait for a GPU would never return here)
    with pytest.raises(WeightopsError, match=r"step 'check-q8' asks for a GPU \(gpu = true\), but no node"):
        jobs.run_job(job, executor="ray", ray_address=address)
    assert not list((tmp_path / "out" / jobs.STATE_DIR).glob("*.log"))  # nothing ran
    assert "--device cuda" in " ".join(jobs.load_job(job).steps[2].argv)  # never silently on a CPU


def test_path_check_reports_what_a_node_sees_differently(tmp_path):
    """The per-node check, run here: a missing input, a file of another size, an output
    directory that is not the runner's."""
    from weightops.jobs.ray_executor import _look

    (tmp_path / "a").write_bytes(b"12345")
    token = tmp_path / "out" / jobs.STATE_DIR / "ray-path-check"
    token.parent.mkdir(parents=True)
    token.write_text("elsewhere")
    _, problems = _look([(str(tmp_path / "a"), 4), (str(tmp_path / "gone"), None)], str(token), "here")
    assert len(problems) == 3
    assert "a different file here (5 bytes, 4" in problems[0] and "gone" in problems[1]
    assert "not the same directory" in problems[2]
    _, none = _look([(str(tmp_path / "a"), 5)], str(token), "elsewhere")
    assert none == []


def test_gpu_key_is_checked_when_the_job_loads(tmp_path, tiny_llama):
    bad = STEPS.replace('op = "gguf"', 'op = "gguf"\ngpu = "yes"')
    bad = bad.replace('op = "verify"', 'op = "verify"\ngpu = true\ndevice = "cpu"')
    bad += '[[steps]]\nname = "sums"\nop = "manifest"\npath = "@q8"\ngpu = true\n'
    with pytest.raises(WeightopsError) as e:
        jobs.load_job(_job(tmp_path, tiny_llama, bad, head='executor = "slurm"'))
    text = str(e.value)
    assert "4 problems" in text and "executor must be one of" in text and "gpu is a flag" in text
    assert "device = 'cpu'" in text and "manifest runs on the CPU only" in text
