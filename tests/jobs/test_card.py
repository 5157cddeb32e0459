"""The job's model card (README.md): its numbers are the report's, its front matter is YAML the
Hub reads, it is the same bytes for the same job and rewritten on --resume."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from gguf import GGUFReader

from weightops import jobs
from weightops.errors import WeightopsError
from weightops.io.outputs import foreign

PROMPTS = "The quick brown fox jumps over the lazy dog.\n\n我们发布了中文模型的权重。\n"
APACHE = "                                 Apache License\n                           Version 2.0, January 2004\n"

Q8 = """
[[steps]]
name = "q8"
op = "gguf"
model = "@source"
output = "tiny-q8_0.gguf"
type = "q8_0"
"""

CHECK = """
[[steps]]
name = "check-q8"
op = "verify"
reference = "@source"
candidate = "@q8"
prompts = "prompts.txt"
max-tokens = 32
max-kld = 0.5
min-top1 = 0.5
"""

BNB = """
[[steps]]
name = "int8"
op = "bnb"
model = "@source"
output = "tiny-int8"
bits = 8
"""


def _job(where: Path, source: Path, head: str = "", steps: str = Q8 + CHECK + BNB) -> Path:
    where.mkdir(parents=True, exist_ok=True)
    (where / "prompts.txt").write_text(PROMPTS, encoding="utf-8")
    job = where / "job.toml"
    job.write_text(f'[job]\nname = "tiny release"\noutput = "out"\n{head}\n[inputs]\nsource = "{source}"\n{steps}')
    return job


@pytest.fixture(scope="module")
def source(tmp_path_factory, tiny_llama) -> Path:
    """The tiny LLaMA with a LICENSE file and a Hub name in its config, as a downloaded model has."""
    src = tmp_path_factory.mktemp("source") / "tiny-llama"
    shutil.copytree(tiny_llama, src)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "_name_or_path": "example-org/tiny-llama"}, indent=2))
    (src / "LICENSE").write_text(APACHE)
    return src


@pytest.fixture(scope="module")
def first(tmp_path_factory, source) -> tuple[Path, dict]:
    job = _job(tmp_path_factory.mktemp("first"), source)
    return job, jobs.run_job(job)


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def _rows(text: str) -> dict[str, list[str]]:
    """The Files table: file -> its cells."""
    table = text.split("## Files")[1].split("\n\n")[1]
    rows = [[c.strip() for c in line.strip("|").split(" | ")] for line in table.splitlines()[2:]]
    return {r[0].strip("`"): r for r in rows}


def _size_bytes(cell: str) -> float:
    number, unit = cell.split()
    return float(number) * {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9}[unit]


def test_card_numbers_are_the_reports(first):
    job, report = first
    out = job.parent / "out"
    text = (out / "README.md").read_text()
    rows = _rows(text)
    files = {
        **{n: m for n, m in report["artefacts"]["q8"].items()},
        **{f"tiny-int8/{n}": m for n, m in report["artefacts"]["int8"].items() if n.endswith(".safetensors")},
    }
    assert set(rows) == set(files)
    for name, meta in files.items():
        row = rows[name]
        assert row[7] == f"`{meta['sha256']}`"
        assert row[7].strip("`") == hashlib.sha256((out / name).read_bytes()).hexdigest()
        assert _size_bytes(row[2]) == pytest.approx(meta["size"], rel=0.01)
    check = report["verifications"][0]
    q8 = rows["tiny-q8_0.gguf"]
    assert float(q8[4]) == pytest.approx(check["kld_mean"], rel=1e-3)
    assert float(q8[5].rstrip("%")) == pytest.approx(100 * check["top1_agreement"], abs=0.01)
    assert float(q8[6]) == pytest.approx(check["ppl_ratio"], abs=1e-4)
    assert rows["tiny-int8/model.safetensors"][4] == "-"  # no check ran on it

    # type and bits per weight from the GGUF file itself, read by gguf-py
    reader = GGUFReader(out / "tiny-q8_0.gguf")
    assert q8[1] == "Q8_0" and int(reader.fields["general.file_type"].contents()) == 7  # MOSTLY_Q8_0
    bpw = 8 * sum(int(t.n_bytes) for t in reader.tensors) / sum(int(t.n_elements) for t in reader.tensors)
    assert float(q8[3]) == pytest.approx(bpw, abs=0.005)
    assert rows["tiny-int8/model.safetensors"][1] == "bitsandbytes int8"


def test_front_matter_and_hub_card(first):
    from huggingface_hub import ModelCard

    job, _ = first
    text = (job.parent / "out" / "README.md").read_text()
    meta = _front_matter(text)
    assert meta == {
        "base_model": "example-org/tiny-llama",
        "base_model_relation": "quantized",
        "library_name": "transformers",  # bnb safetensors beside the GGUF
        "license": "apache-2.0",  # from the LICENSE file
        "tags": sorted(meta["tags"]),
    }
    assert {"gguf", "bitsandbytes", "8-bit", "quantized", "weightops"} <= set(meta["tags"])
    card = ModelCard.load(job.parent / "out" / "README.md")
    assert card.data.base_model == "example-org/tiny-llama" and card.data.license == "apache-2.0"
    assert "0c1e57098" in card.text and "llama-cpp-python 0.3.36" in card.text
    assert not foreign(job.parent / "out" / "README.md")  # marked as weightops' own


def test_same_bytes_elsewhere_and_on_resume(first, tmp_path, source):
    job, _ = first
    text = (job.parent / "out" / "README.md").read_bytes()
    other = _job(tmp_path / "elsewhere", source)
    jobs.run_job(other)
    card = tmp_path / "elsewhere" / "out" / "README.md"
    assert card.read_bytes() == text
    assert str(tmp_path) not in card.read_text()  # no absolute path
    card.unlink()
    resumed = jobs.run_job(other, resume=True)
    assert {s["status"] for s in resumed["steps"]} == {"skipped (complete)"}
    assert card.read_bytes() == text


def test_foreign_readme_stops_the_job_first(tmp_path, tiny_llama):
    job = _job(tmp_path, tiny_llama)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "README.md").write_text("mine\n")
    with pytest.raises(WeightopsError, match="model card"):
        jobs.run_job(job)
    assert (tmp_path / "out" / "README.md").read_text() == "mine\n"
    assert not (tmp_path / "out" / ".weightops-job").exists()


def test_card_license_from_source_card(tmp_path, tiny_llama):
    """The source's own card front matter names the licence (a custom one, with its name and link)."""
    from weightops.jobs import card

    src = tmp_path / "src"
    shutil.copytree(tiny_llama, src)
    (src / "README.md").write_text("---\nlicense: other\nlicense_name: tiny\nlicense_link: LICENSE\n---\n# x\n")
    job = jobs.load_job(_job(tmp_path, src))
    found = card._source(job, ["q8"])
    assert found.license == {"license": "other", "license_name": "tiny", "license_link": "LICENSE"}
    assert re.search(r"other, from src/README.md", found.license_note)


def test_failed_job_leaves_no_card(tmp_path, tiny_llama):
    """No `license` key when no source names one; [job] base_model wins; a GGUF-only job is
    gguf. Then a step fails on --resume: the card of the earlier run goes."""
    job = _job(tmp_path, tiny_llama, head='base_model = "example-org/other"', steps=Q8)
    jobs.run_job(job)
    card = tmp_path / "out" / "README.md"
    meta = _front_matter(card.read_text())
    assert "license" not in meta and "license: not stated by the source" in card.read_text()
    assert meta["base_model"] == "example-org/other" and meta["library_name"] == "gguf"
    broken = '\n[[steps]]\nname = "bad"\nop = "gguf"\nmodel = "prompts.txt"\noutput = "bad.gguf"\ntype = "q8_0"\n'
    job.write_text(job.read_text() + broken)
    with pytest.raises(WeightopsError, match="step 'bad'"):
        jobs.run_job(job, resume=True)
    assert not card.exists() and (tmp_path / "out" / "release-report.json").is_file()


def test_imatrix_and_its_text(tmp_path):
    """A GGUF step's importance matrix: made by an imatrix step (its text named and hashed), or
    given as a file (the datasets its header names, as llama-imatrix writes them)."""
    from gguf import GGUFWriter

    from weightops.jobs import Job, Step, card

    given = tmp_path / "given.imatrix.gguf"
    w = GGUFWriter(given, arch="")
    w.add_type("imatrix")
    w.add_array("imatrix.datasets", ["/data/calibration-v3.txt"])
    w.add_uint32("imatrix.chunk_count", 12)
    w.add_uint32("imatrix.chunk_size", 512)
    w.add_tensor("blk.0.attn_q.weight.in_sum2", np.ones((1, 4), dtype="float32"))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    text, made = tmp_path / "wiki.txt", tmp_path / "out" / "made.imatrix.gguf"
    text.write_text("calibration text\n")
    made.parent.mkdir()
    made.write_bytes(given.read_bytes())
    steps = [
        Step("im", "imatrix", {"text": "wiki.txt"}, output=made, paths={"text": text}),
        Step("q4", "gguf", {"imatrix": "@im"}),
        Step("q3", "gguf", {"imatrix": "@given"}),
    ]
    job = Job(tmp_path / "job.toml", "j", tmp_path / "out", {"given": given}, steps)
    lines = card._imatrix_lines(job, lambda p: hashlib.sha256(p.read_bytes()).hexdigest())
    sha = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (given, text, made)}
    assert lines == [
        f"- step `q4` quantized with the importance matrix `made.imatrix.gguf` (sha256 `{sha[made]}`), "
        f"computed by step `im` from `wiki.txt` (sha256 `{sha[text]}`)",
        f"- step `q3` quantized with the importance matrix `given.imatrix.gguf` (sha256 `{sha[given]}`), "
        "computed from `calibration-v3.txt` (12 chunks of 512 tokens)",
    ]


@pytest.mark.parametrize("value", ["3", "[]", '[""]', '["a/b", 4]'])
def test_base_model_must_be_hub_ids(tmp_path, tiny_llama, value):
    job = _job(tmp_path, tiny_llama, head=f"base_model = {value}", steps=Q8)
    with pytest.raises(WeightopsError, match="base_model must be a Hub model id"):
        jobs.load_job(job)
    assert jobs.load_job(_job(tmp_path, tiny_llama, head='base_model = ["a/b", "c/d"]', steps=Q8)).base_model == (
        "a/b",
        "c/d",
    )
