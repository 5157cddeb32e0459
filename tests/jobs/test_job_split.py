"""Jobs and GGUF split sets: the job's `split_max_size`, the Hub-limit default with its note, a
split step's output used by later steps through the name it was given, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from weightops import jobs
from weightops.errors import WeightopsError
from weightops.io import gguf_split

STEPS = """
[[steps]]
name = "q8"
op = "gguf"
model = "@base"
output = "m-q8_0.gguf"
type = "q8_0"

[[steps]]
name = "gate"
op = "verify"
reference = "@base"
candidate = "@q8"
prompts = "prompts.txt"
max-kld = 0.1
"""


def _job(tmp_path: Path, base: Path, head: str = "") -> Path:
    (tmp_path / "prompts.txt").write_text("The quick brown fox jumps over the lazy dog.\n", encoding="utf-8")
    path = tmp_path / "job.toml"
    path.write_text(f'[job]\nname = "t"\noutput = "out"\n{head}\n[inputs]\nbase = "{base}"\n{STEPS}')
    return path


def _sets(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.endswith(".gguf"))


def test_hub_limit_default_splits_with_a_note_and_resumes(tmp_path, tiny_llama, monkeypatch):
    monkeypatch.setattr(gguf_split, "HUB_SPLIT_SIZE", "60K")  # the tiny model stands for a 200 GB one
    job = _job(tmp_path, tiny_llama)
    report = jobs.run_job(job)
    out = tmp_path / "out"
    assert report["passed"] and _sets(out) == [f"m-q8_0-{i:05d}-of-00003.gguf" for i in (1, 2, 3)]
    assert sorted(report["artefacts"]["q8"]) == _sets(out)
    (q8,) = [s for s in report["steps"] if s["name"] == "q8"]
    assert "split into 3 files" in q8["note"] and "200 GB per-file limit" in q8["note"]
    assert (out / "m-q8_0-00001-of-00003.gguf.weightops-manifest.json").is_file()
    again = jobs.run_job(job, resume=True)
    assert [s["status"] for s in again["steps"]] == ["skipped (complete)"] * 2


def test_job_split_max_size_replaces_an_earlier_set(tmp_path, tiny_llama, monkeypatch):
    monkeypatch.setattr(gguf_split, "HUB_SPLIT_SIZE", "60K")
    job = _job(tmp_path, tiny_llama)
    jobs.run_job(job)
    job.write_text(job.read_text().replace('output = "out"\n', 'output = "out"\nsplit_max_size = "100K"\n'))
    report = jobs.run_job(job, resume=True)
    out = tmp_path / "out"
    assert _sets(out) == ["m-q8_0-00001-of-00002.gguf", "m-q8_0-00002-of-00002.gguf"]
    (q8,) = [s for s in report["steps"] if s["name"] == "q8"]
    assert q8["status"] == "ok" and "note" not in q8  # the job chose the size
    doc = json.loads((out / "release-report.json").read_text())
    assert doc["passed"] and sorted(doc["artefacts"]["q8"]) == _sets(out)


def test_a_bad_split_max_size_is_a_job_problem(tmp_path, tiny_llama):
    job = _job(tmp_path, tiny_llama, 'split_max_size = "50GB"')
    with pytest.raises(WeightopsError, match=r"\[job\]: split_max_size: --split-max-size '50GB'"):
        jobs.load_job(job)
