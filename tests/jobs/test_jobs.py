"""Release jobs: validation, dry run, end-to-end report, resume after a kill, failing gate."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from weightops import jobs
from weightops.errors import MismatchError, WeightopsError
from weightops.jobs.executors import run_child

PROMPTS = "The quick brown fox jumps over the lazy dog.\n\n我们发布了中文模型的权重。\n"


def _job(tmp_path: Path, steps: str, inputs: dict[str, Path]) -> Path:
    (tmp_path / "prompts.txt").write_text(PROMPTS, encoding="utf-8")
    lines = ["[job]", 'name = "test"', 'output = "out"', "[inputs]"]
    lines += [f'{k} = "{v}"' for k, v in inputs.items()]
    path = tmp_path / "job.toml"
    path.write_text("\n".join(lines) + "\n" + steps)
    return path


DELTA_STEPS = """
[[steps]]
name = "delta"
op = "make-delta"
base = "@base"
target = "@target"
output = "delta"
dtype = "float32"

[[steps]]
name = "merged"
op = "apply-delta"
base = "@base"
delta = "@delta"
output = "merged"

[[steps]]
name = "q8"
op = "gguf"
model = "@merged"
output = "merged-q8_0.gguf"
type = "q8_0"
"""

GATE = """
[[steps]]
name = "gate"
op = "verify"
reference = "@target"
candidate = "@merged"
prompts = "prompts.txt"
max-kld = 0.0
min-top1 = 1.0
"""


@pytest.fixture(scope="module")
def target(tmp_path_factory, tiny_llama) -> Path:
    from weightops import tiny

    return tiny.finetune(tiny_llama, tmp_path_factory.mktemp("target") / "m")


@pytest.mark.parametrize(
    "bad,message",
    [
        (
            '[[steps]]\nname = "d"\nop = "make-delta"\nbase = "@base"\ntarget = "@target"\noutput = "d"\n'
            'max-shard-sise = "1GB"\n',
            "unknown option 'max-shard-sise' for make-delta (did you mean 'max_shard_size'?)",
        ),
        ('[[steps]]\nname = "d"\nop = "make-detla"\n', "unknown op 'make-detla' (did you mean 'make-delta'?)"),
        (
            '[[steps]]\nname = "d"\nop = "make-delta"\nbase = "@bsae"\ntarget = "@target"\noutput = "d"\n',
            "refers to '@bsae', which is neither an input nor an earlier step (did you mean 'base'?)",
        ),
        (
            '[[steps]]\nname = "d"\nop = "make-delta"\nbase = "@base"\ntarget = "@target"\noutput = "/tmp/x"\n',
            "must be a relative path inside the job's output directory",
        ),
        ('[jbo]\nname = "x"\n', "unknown table 'jbo' (did you mean 'job'?)"),
        ('[[steps]]\nname = "d"\nop = "apply-delta"\nbase = "@base"\noutput = "d"\n', "apply-delta needs `delta`"),
    ],
)
def test_typos_are_errors(cli, tmp_path, tiny_llama, target, bad, message):
    job = _job(tmp_path, bad, {"base": tiny_llama, "target": target})
    r = cli("run", job, "--dry-run")
    assert r.exit_code == 1 and message in r.stderr, r.stderr


def test_dry_run_writes_nothing(cli, tmp_path, tiny_llama, target):
    job = _job(tmp_path, DELTA_STEPS + GATE, {"base": tiny_llama, "target": target})
    before = sorted(p.name for p in tmp_path.iterdir())
    r = cli("run", job, "--dry-run")
    assert r.exit_code == 0, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    for name in ("delta", "merged", "q8", "gate", "weightops make-delta", "--dtype float32", "--type q8_0"):
        assert name in r.stdout
    plan = json.loads(cli("run", job, "--dry-run", "--json").stdout)
    params = sum(v.numel() for v in load_file(tiny_llama / "model.safetensors").values())
    sizes = {s["name"]: s["expected_bytes"] for s in plan["steps"]}
    assert sizes["delta"] == params * 4 and sizes["merged"] == params * 4  # float32 delta, dtype auto
    assert sizes["q8"] == int(params * 34 / 32) and sizes["gate"] is None


def _runner(job: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "weightops", "run", str(job), *extra],
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def test_job_report_and_resume_after_kill(tmp_path, tiny_llama, target):
    (tmp_path / "clean").mkdir()
    clean = _job(tmp_path / "clean", DELTA_STEPS + GATE, {"base": tiny_llama, "target": target})
    report = jobs.run_job(clean)
    out = tmp_path / "clean" / "out"
    assert report["passed"] and [s["status"] for s in report["steps"]] == ["ok"] * 4
    md = (out / "release-report.md").read_text()
    assert "| merged | apply-delta | ok |" in md and "## Verification" in md and "PASSED" in md
    doc = json.loads((out / "release-report.json").read_text())
    assert doc["verifications"][0]["kld_max"] == 0 and doc["verifications"][0]["top1_agreement"] == 1
    assert all(s["peak_rss_mb"] > 50 and s["wall_s"] > 0 for s in doc["steps"])
    assert {(s["node"], s["executor"], s["attempts"]) for s in doc["steps"]} == {(socket.gethostname(), "local", 1)}
    assert [s["device"] for s in doc["steps"][:2]] == ["cpu", "cpu"]  # make/apply-delta have no --device
    merged_manifest = json.loads((out / "merged" / "weightops-manifest.json").read_text())
    assert doc["artefacts"]["merged"] == merged_manifest["files"]

    # a second run, killed while its second step runs, then resumed
    (tmp_path / "killed").mkdir()
    job = _job(tmp_path / "killed", DELTA_STEPS + GATE, {"base": tiny_llama, "target": target})
    state = tmp_path / "killed" / "out" / jobs.STATE_DIR
    proc = _runner(job)
    deadline = time.time() + 120
    while not (state / "merged.log").exists():
        assert proc.poll() is None and time.time() < deadline, "runner ended before step 2"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (state / "merged.done.json").exists()
    resumed = jobs.run_job(job, resume=True)
    statuses = {s["name"]: s["status"] for s in resumed["steps"]}
    assert statuses == {"delta": "skipped (complete)", "merged": "ok", "q8": "ok", "gate": "ok"}
    killed_out = tmp_path / "killed" / "out"
    assert not list(killed_out.glob(".*.weightops-tmp-*"))
    for step in ("delta", "merged", "q8"):  # same final bytes as the uninterrupted run
        assert resumed["artefacts"][step] == report["artefacts"][step]

    again = jobs.run_job(job, resume=True)
    assert all(s["status"] == "skipped (complete)" for s in again["steps"])
    # an input that changed makes the steps that read it (and what follows from them) run again
    (tmp_path / "killed" / "prompts.txt").write_text(PROMPTS + "\nOne more prompt.\n", encoding="utf-8")
    changed = jobs.run_job(job, resume=True)
    assert {s["name"]: s["status"] for s in changed["steps"]}["gate"] == "ok"
    assert {s["name"]: s["status"] for s in changed["steps"]}["merged"] == "skipped (complete)"


def test_failing_gate_stops_with_exit_3_and_says_why(cli, tmp_path, tiny_llama):
    bad = tmp_path / "bad"
    import shutil

    shutil.copytree(tiny_llama, bad)
    tensors = load_file(bad / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.weight"
    tensors[name] = (tensors[name].float() * 3).to(tensors[name].dtype)
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    steps = (
        GATE.replace("@merged", "@bad")
        + """
[[steps]]
name = "after"
op = "gguf"
model = "@bad"
output = "never.gguf"
"""
    )
    job = _job(tmp_path, steps, {"target": tiny_llama, "bad": bad})
    r = cli("run", job)
    assert r.exit_code == 3, r.stderr
    assert "step 'gate' (verify) failed with exit code 3" in r.stderr
    doc = json.loads((tmp_path / "out" / "release-report.json").read_text())
    assert doc["passed"] is False and [s["name"] for s in doc["steps"]] == ["gate"]
    assert doc["steps"][0]["status"] == "failed" and "verification failed" in doc["steps"][0]["why"]
    assert doc["verifications"][0]["passed"] is False
    assert "failed" in (tmp_path / "out" / "release-report.md").read_text()
    assert not (tmp_path / "out" / "never.gguf").exists()
    with pytest.raises(MismatchError):
        jobs.run_job(job)


def test_missing_input_is_an_error(tmp_path, tiny_llama):
    job = _job(tmp_path, DELTA_STEPS, {"base": tiny_llama, "target": tmp_path / "nope"})
    with pytest.raises(WeightopsError, match="nope"):
        jobs.run_job(job)


def test_step_peak_rss_is_the_childs_own(tmp_path, tiny_llama):
    """wait4's ru_maxrss counts the memory the child was forked from: a small step run by a
    big job runner looked as big as the runner."""
    ballast = b"\x01" * (400 << 20)  # resident in this (parent) process
    code, _, rss = run_child(["-m", "weightops", "-q", "inspect", str(tiny_llama)], tmp_path / "inspect.log")
    assert code == 0 and 5 < rss < 200, rss
    del ballast


def test_gpu_step_is_refused_locally_without_a_gpu(tmp_path, tiny_llama):
    """gpu = true means --device cuda; where torch sees no GPU the job stops before any step."""
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    job = _job(
        tmp_path,
        DELTA_STEPS + GATE.replace('op = "verify"', 'op = "verify"\ngpu = true'),
        {"base": tiny_llama, "target": tiny_llama},
    )
    with pytest.raises(WeightopsError, match=r"step 'gate' asks for a GPU \(gpu = true\), but torch sees no CUDA"):
        jobs.run_job(job)
    assert not list((tmp_path / "out" / jobs.STATE_DIR).glob("*.log"))
