"""Job plans: gguf steps on one input fused into one unit, independent units run together
(--jobs), verify steps against one reference run it once, resume per artefact."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from weightops import jobs
from weightops.errors import MismatchError
from weightops.pipelines.gguf import export_gguf
from weightops.pipelines.verify import verify_checkpoint
from weightops.verify.manifest import MANIFEST

PROMPTS = "The quick brown fox jumps over the lazy dog.\n\n我们发布了中文模型的权重。\n"

QUANTS = """
[[steps]]
name = "q8"
op = "gguf"
model = "@source"
output = "tiny-q8_0.gguf"
type = "q8_0"

[[steps]]
name = "q4"
op = "gguf"
model = "@source"
output = "tiny-q4_0.gguf"
type = "q4_0"

[[steps]]
name = "more"
op = "gguf"
model = "@source"
output = "tiny-{type}.gguf"
type = ["q5_1", "f16"]
"""

CHECKS = """
[[steps]]
name = "check-q8"
op = "verify"
reference = "@source"
candidate = "@q8"
prompts = "prompts.txt"
max-tokens = 32
max-kld = 0.5
min-top1 = 0.5

[[steps]]
name = "check-q4"
op = "verify"
reference = "@source"
candidate = "@q4"
prompts = "prompts.txt"
max-tokens = 32
max-kld = 0.5
min-top1 = 0.3
"""

FILES = {"q8": "tiny-q8_0.gguf", "q4": "tiny-q4_0.gguf", "more.q5_1": "tiny-q5_1.gguf", "more.f16": "tiny-f16.gguf"}


def _job(where: Path, source: Path, steps: str) -> Path:
    where.mkdir(parents=True, exist_ok=True)
    (where / "prompts.txt").write_text(PROMPTS, encoding="utf-8")
    job = where / "job.toml"
    job.write_text(f'[job]\nname = "fusion"\noutput = "out"\n[inputs]\nsource = "{source}"\n{steps}')
    return job


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def separate(tmp_path_factory, tiny_llama) -> dict[str, str]:
    """The oracle: each file made by its own `weightops gguf` run (its library call)."""
    out = tmp_path_factory.mktemp("separate")
    hashes = {}
    for step, name in FILES.items():
        export_gguf(tiny_llama, out / name, type=name.removeprefix("tiny-").removesuffix(".gguf"))
        hashes[step] = _sha(out / name)
    return hashes


@pytest.fixture(scope="module")
def fused(tmp_path_factory, tiny_llama) -> tuple[Path, dict]:
    job = _job(tmp_path_factory.mktemp("fused"), tiny_llama, QUANTS + CHECKS)
    return job, jobs.run_job(job, jobs=2)


def test_dry_run_shows_one_fused_unit(cli, tmp_path, tiny_llama):
    job = _job(tmp_path, tiny_llama, QUANTS + CHECKS)
    plan = json.loads(cli("run", job, "--dry-run", "--json", "--jobs", "2").stdout)
    units = {u["name"]: u for u in plan["units"]}
    assert list(units) == ["q8+3", "check-q8", "check-q4"]
    assert units["q8+3"]["fused"] and units["q8+3"]["steps"] == ["q8", "q4", "more.q5_1", "more.f16"]
    assert units["check-q8"]["after"] == ["q8+3"] and not units["check-q8"]["fused"]
    assert all(u["memory_bytes"] > 0 for u in plan["units"]) and plan["jobs"] == 2
    text = cli("run", job, "--dry-run").stdout
    assert "q8+3 [gguf x4, fused: one read of" in text and "--type q5_1" in text
    assert not (tmp_path / "out").exists()


def test_fused_outputs_are_the_separate_runs_bytes(fused, separate):
    job, report = fused
    out = job.parent / "out"
    assert report["passed"]
    steps = {s["name"]: s for s in report["steps"]}
    for step, name in FILES.items():
        assert steps[step]["status"] == "ok" and steps[step]["unit"] == "q8+3"
        assert _sha(out / name) == separate[step], step
        assert report["artefacts"][step][name]["sha256"] == separate[step]
    unit = next(u for u in report["units"] if u["name"] == "q8+3")
    assert unit["fused"] and unit["runs"] == list(FILES) and unit["status"] == "ok"
    assert "| q8+3 |" in (out / "release-report.md").read_text()
    card = (out / "README.md").read_text()
    assert all(f"`{name}`" in card for name in FILES.values())  # the card is per artefact


def test_independent_units_run_together_and_share_the_reference(fused, tiny_llama):
    job, report = fused
    units = {u["name"]: u for u in report["units"]}
    a, b = units["check-q8"], units["check-q4"]
    # both wait for the fused unit, then start together (--jobs 2)
    assert a["started_s"] >= units["q8+3"]["ended_s"] and b["started_s"] >= units["q8+3"]["ended_s"]
    assert b["alongside"] == ["check-q8"] and b["started_s"] < a["ended_s"] and a["started_s"] < b["ended_s"]
    # one computed the reference's logits, the other waited and reused them
    how = sorted(v["reference_logits"] for v in report["verifications"])
    assert how == ["computed", "reused"]
    # the reused logits are the reference's: the same numbers as a verification on its own
    reused = next(v for v in report["verifications"] if v["reference_logits"] == "reused")
    alone = verify_checkpoint(
        tiny_llama,
        job.parent / "out" / Path(reused["candidate"]["path"]).name,
        prompts=job.parent / "prompts.txt",
        max_tokens=32,
    )
    assert reused["tokens"] == alone["tokens"]
    assert reused["kld_mean"] == pytest.approx(alone["kld_mean"], rel=1e-5, abs=1e-9)
    assert reused["top1_agreement"] == alone["top1_agreement"]


def test_memory_budget_runs_units_one_at_a_time(tmp_path, tiny_llama):
    steps = QUANTS.split("[[steps]]")[1] + "[[steps]]" + CHECKS.split("[[steps]]")[1]
    job = _job(tmp_path, tiny_llama, "[[steps]]" + steps.replace('"@q8"', '"@source"'))
    report = jobs.run_job(job, jobs=2, max_memory="1B")  # every unit alone over budget: one at a time
    first, second = report["units"]
    assert second["alongside"] == [] and second["started_s"] >= first["ended_s"]


def test_resume_after_a_failure_reruns_only_what_is_incomplete(tmp_path, tiny_llama, separate):
    gate = CHECKS.split("[[steps]]")[2].replace("max-kld = 0.5", "max-kld = 0.0").replace("0.3", "1.0")
    after = '\n[[steps]]\nname = "tp"\nop = "convert"\ninput = "@source"\noutput = "tp"\nto = "tencentpretrain"\n'
    job = _job(tmp_path, tiny_llama, QUANTS + "[[steps]]" + gate + after)
    with pytest.raises(MismatchError, match="check-q4"):
        jobs.run_job(job)
    failed = json.loads((tmp_path / "out" / "release-report.json").read_text())
    assert {s["name"]: s["status"] for s in failed["steps"]} == {**dict.fromkeys(FILES, "ok"), "check-q4": "failed"}
    assert not (tmp_path / "out" / "tp").exists()

    # the gate relaxed, one fused artefact gone: only those two steps and the one never run
    job.write_text(
        job.read_text().replace("max-kld = 0.0", "max-kld = 0.5").replace("min-top1 = 1.0", "min-top1 = 0.3")
    )
    (tmp_path / "out" / FILES["more.q5_1"]).unlink()
    resumed = jobs.run_job(job, resume=True)
    status = {s["name"]: s["status"] for s in resumed["steps"]}
    assert status == {
        "q8": "skipped (complete)",
        "q4": "skipped (complete)",
        "more.q5_1": "ok",
        "more.f16": "skipped (complete)",
        "check-q4": "ok",
        "tp": "ok",
    }
    assert _sha(tmp_path / "out" / FILES["more.q5_1"]) == separate["more.q5_1"]
    assert resumed["artefacts"]["more.q5_1"][FILES["more.q5_1"]]["sha256"] == separate["more.q5_1"]
    assert resumed["verifications"][0]["reference_logits"] == "reused"  # kept from the failed run
    assert (tmp_path / "out" / "README.md").is_file()


def test_a_type_list_needs_a_type_field_in_its_output(cli, tmp_path, tiny_llama):
    job = _job(tmp_path, tiny_llama, QUANTS.replace("tiny-{type}.gguf", "tiny.gguf"))
    r = cli("run", job, "--dry-run")
    assert r.exit_code == 1 and "output must contain {type}" in r.stderr, r.stderr
    refs = QUANTS + CHECKS.replace('"@q4"', '"@more"')
    r = cli("run", _job(tmp_path / "refs", tiny_llama, refs), "--dry-run")
    assert r.exit_code == 1 and "'@more' writes one file per type: name one, e.g. '@more.TYPE'" in r.stderr


BNB_STEPS = """
[[steps]]
name = "nf4"
op = "bnb"
model = "@source"
output = "tiny-nf4"
bits = 4
double-quant = true

[[steps]]
name = "int8-other"
op = "bnb"
model = "@other"
output = "other-int8"
bits = 8
"""


def _dir_files(path: Path) -> dict[str, str]:
    """A directory's content (its ownership marker, which lists the job's manifest too, aside)."""
    from weightops.io.outputs import MARKER

    return {str(p.relative_to(path)): _sha(p) for p in sorted(path.rglob("*")) if p.is_file() and p.name != MARKER}


def test_bnb_steps_on_the_same_input_join_the_gguf_read(cli, tmp_path, tiny_llama, tiny_llama_tied, separate):
    pytest.importorskip("bitsandbytes")
    from weightops.pipelines.bnb import export_bnb

    steps = "[[steps]]" + "[[steps]]".join(QUANTS.split("[[steps]]")[1:3]) + BNB_STEPS
    job = _job(tmp_path, tiny_llama, steps)
    job.write_text(job.read_text().replace("[inputs]\n", f'[inputs]\nother = "{tiny_llama_tied}"\n'))
    plan = json.loads(cli("run", job, "--dry-run", "--json").stdout)
    units = {u["name"]: u for u in plan["units"]}
    assert list(units) == ["q8+2", "int8-other"]
    assert units["q8+2"]["steps"] == ["q8", "q4", "nf4"] and units["q8+2"]["op"] == "gguf+bnb"
    assert not units["int8-other"]["fused"]
    text = cli("run", job, "--dry-run").stdout
    assert "q8+2 [gguf+bnb x3, fused: one read of" in text and "weightops bnb" in text

    report = jobs.run_job(job)
    out = tmp_path / "out"
    assert {s["name"]: (s["status"], s["unit"]) for s in report["steps"]} == {
        "q8": ("ok", "q8+2"),
        "q4": ("ok", "q8+2"),
        "nf4": ("ok", "q8+2"),
        "int8-other": ("ok", "int8-other"),
    }
    for step in ("q8", "q4"):
        assert _sha(out / FILES[step]) == separate[step], step
    alone = tmp_path / "alone"
    alone.mkdir()
    export_bnb(tiny_llama, alone / "nf4", bits=4, double_quant=True)
    export_bnb(tiny_llama_tied, alone / "int8", bits=8)
    for ours, theirs in ((out / "tiny-nf4", alone / "nf4"), (out / "other-int8", alone / "int8")):
        files = _dir_files(ours)
        assert files.pop(MANIFEST) and files == _dir_files(theirs), ours.name


def test_bnb_does_not_join_a_gguf_step_that_reads_other_tensors(cli, tmp_path, tiny_llama):
    """--lora (or --tp-config) makes the gguf step read other tensors than the checkpoint's:
    bnb stays apart; a second bnb step on the same input joins the first, and that bnb-only
    unit is one read with no GGUF matrix."""
    gguf = QUANTS.split("[[steps]]")[1] + f'lora = ["{tmp_path / "adapter"}"]\n'
    second = BNB_STEPS.split("[[steps]]")[1].replace('"nf4"', '"nf4-b"').replace("tiny-nf4", "tiny-nf4-b")
    bnb_steps = "[[steps]]" + BNB_STEPS.split("[[steps]]")[1] + "[[steps]]" + second
    job = _job(tmp_path, tiny_llama, "[[steps]]" + gguf + bnb_steps)
    plan = json.loads(cli("run", job, "--dry-run", "--json").stdout)
    assert [(u["name"], u["steps"]) for u in plan["units"]] == [("q8", ["q8"]), ("nf4+1", ["nf4", "nf4-b"])]

    pytest.importorskip("bitsandbytes")
    from weightops.pipelines.bnb import export_bnb

    report = jobs.run_job(_job(tmp_path / "bnb-only", tiny_llama, bnb_steps))
    assert [(s["status"], s["unit"]) for s in report["steps"]] == [("ok", "nf4+1")] * 2
    export_bnb(tiny_llama, tmp_path / "alone", bits=4, double_quant=True)
    for name in ("tiny-nf4", "tiny-nf4-b"):
        files = _dir_files(tmp_path / "bnb-only" / "out" / name)
        assert files.pop(MANIFEST) and files == _dir_files(tmp_path / "alone"), name


def test_bnb_joins_a_gguf_step_with_its_own_tokenizer(cli, tmp_path, tiny_llama):
    """--tokenizer only feeds the GGUF metadata: the bnb step shares the gguf step's read, and
    each output is its own run's bytes (the GGUF file with that tokenizer)."""
    pytest.importorskip("bitsandbytes")
    from weightops.pipelines.bnb import export_bnb

    tokenizer = tmp_path / "tokenizer"
    tokenizer.mkdir()
    for f in tiny_llama.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            (tokenizer / f.name).write_bytes(f.read_bytes())
    gguf = QUANTS.split("[[steps]]")[1] + f'tokenizer = "{tokenizer}"\n'
    job = _job(tmp_path / "job", tiny_llama, "[[steps]]" + gguf + "[[steps]]" + BNB_STEPS.split("[[steps]]")[1])
    plan = json.loads(cli("run", job, "--dry-run", "--json").stdout)
    assert [(u["name"], u["steps"], u["op"]) for u in plan["units"]] == [("q8+1", ["q8", "nf4"], "gguf+bnb")]

    report = jobs.run_job(job)
    assert [(s["status"], s["unit"]) for s in report["steps"]] == [("ok", "q8+1")] * 2
    out = tmp_path / "job" / "out"
    export_gguf(tiny_llama, tmp_path / "alone.gguf", type="q8_0", tokenizer=tokenizer)
    assert _sha(out / FILES["q8"]) == _sha(tmp_path / "alone.gguf")
    export_bnb(tiny_llama, tmp_path / "alone", bits=4, double_quant=True)
    files = _dir_files(out / "tiny-nf4")
    assert files.pop(MANIFEST) and files == _dir_files(tmp_path / "alone")
