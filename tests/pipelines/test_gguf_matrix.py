"""Release matrices: `weightops gguf MODEL OUTDIR --type A --type B ...` reads the source once,
computes an encoding several outputs share once, and writes each file byte for byte as its
single-type run does (those are llama-quantize's files: test_gguf_mixes.py). A run killed
mid-tensor is continued by --resume from the tensors its journal vouches for, to the same
bytes; a temporary or journal changed since is not trusted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from gguf import GGUFReader

from weightops import tiny
from weightops.io import outputs
from weightops.io.gguf_partial import JOURNAL
from weightops.jobs import run_job
from weightops.pipelines.gguf import GGUFVariant, export_gguf, export_gguf_matrix, matrix_file_name
from weightops.quant import ggml_types
from weightops.stream import TensorRef

REPO = Path(__file__).resolve().parents[2]
TYPES = ["q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0"]
VICTIM = "blk.4.ffn_down.weight"  # the tensor the killed run dies inside

# Runs `weightops ARGS...` with slabs of 64 rows (so a tensor is written in several pieces, each
# larger than the file buffer: they reach the file as written) and SIGKILLs itself after the
# first piece of VICTIM: the temporaries hold a half-written tensor the journal does not list.
KILLER = r"""
import os, signal, sys
import weightops.pipelines.gguf as g
g.CHUNK_ELEMENTS = 64 * 512
real, victim = g.write_tensor, sys.argv[1]
def write_tensor(files, name, shape, qtype, pieces):
    if name == victim:
        def cut(pieces):
            yield next(iter(pieces))
            os.kill(os.getpid(), signal.SIGKILL)
        pieces = cut(pieces)
    return real(files, name, shape, qtype, pieces)
g.write_tensor = write_tensor
from weightops.cli import run
sys.argv = ["weightops", *sys.argv[2:]]
run()
"""


def killed_run(*args) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", KILLER, VICTIM, *map(str, args)],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr


@pytest.fixture(scope="module")
def model(tmp_path_factory, spm_tokenizer) -> Path:
    """Rows of 256 (K blocks used), 4 query heads per key/value head, 8 layers (the "more bits"
    layers of the _M mixes are some and not others)."""
    directory = tmp_path_factory.mktemp("llama-256")
    return tiny.tiny_llama(directory / "model", spm_tokenizer, hidden=256, intermediate=512, layers=8, kv_heads=1)


@pytest.fixture(scope="module")
def singles(model, tmp_path_factory) -> dict[str, bytes]:
    """Each type's file from its own single-type run."""
    directory = tmp_path_factory.mktemp("singles")
    return {t: export_gguf(model, directory / f"{t}.gguf", type=t).output.read_bytes() for t in TYPES}


@pytest.fixture(scope="module")
def matrix(model, tmp_path_factory) -> tuple[Path, list]:
    """One uninterrupted matrix run: (its directory, its reports)."""
    out = tmp_path_factory.mktemp("matrix") / "release"
    return out, export_gguf_matrix(model, out, TYPES)


def file_types(path: Path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}


def test_every_output_is_its_single_run(model, singles, matrix):
    out, reports = matrix
    assert [r.output for r in reports] == [out / f"model-{t.upper()}.gguf" for t in TYPES]
    assert sorted(p.name for p in outputs.content(out)) == sorted(r.output.name for r in reports)
    for t, report in zip(TYPES, reports, strict=True):
        assert report.output.read_bytes() == singles[t], t
        assert report.tensor_types == file_types(report.output)


def test_source_read_once_and_shared_encodings_computed_once(model, singles, monkeypatch, tmp_path):
    """Every source tensor is loaded once; the block kernels run once per distinct (tensor,
    type) pair the files hold (read from the files), not once per file."""
    loads: Counter[str] = Counter()
    kernel_calls: Counter[str] = Counter()
    load, encode = TensorRef.load, ggml_types.GGMLType.encode

    def counting_load(self):
        loads[self.name] += 1
        return load(self)

    def counting_encode(self, x, device, *args, **kwargs):
        kernel_calls[self.name] += 1
        return encode(self, x, device, *args, **kwargs)

    monkeypatch.setattr(TensorRef, "load", counting_load)
    monkeypatch.setattr(ggml_types.GGMLType, "encode", counting_encode)
    reports = export_gguf_matrix(model, tmp_path / "m", TYPES)

    from weightops.io.checkpoint import open_checkpoint

    source = {r.name for r in open_checkpoint(model).tensors}
    assert {n: c for n, c in loads.items() if n in source} == dict.fromkeys(source, 1)
    held = [file_types(r.output) for r in reports]
    distinct = {(name, qtype) for types in held for name, qtype in types.items()}
    assert sum(kernel_calls.values()) == len(distinct) == sum(r.encoded for r in reports)
    assert sum(r.shared for r in reports) == sum(len(t) for t in held) - len(distinct) > 0
    # output.weight is Q6_K in q6_k, q5_k_m and q4_k_m: made for the first, shared by the others
    assert [t["output.weight"] for t in held] == ["Q8_0", "Q6_K", "Q6_K", "Q6_K", "Q6_K"]
    # ... and every Q6_K tensor of q5_k_m / q4_k_m ("more bits" layers) is one of q6_k's
    assert kernel_calls["q6_k"] == sum(q == "Q6_K" for q in held[1].values())
    for t, r in zip(TYPES, reports, strict=True):
        assert r.output.read_bytes() == singles[t] and r.resumed == 0


def test_variants_with_their_own_options_and_paths(model, tmp_path):
    """The list form (one path per type) with per-output options: --via f16 rounds the weights
    first, so its Q6_K output tensor is another encoding than the plain run's; F32 norms are
    still shared."""
    variants = [GGUFVariant("q4_k_m", via="f16"), GGUFVariant("q5_k_m", output_tensor_type="q8_0"), "q6_k"]
    paths = [tmp_path / "a.gguf", tmp_path / "b.gguf", tmp_path / "c.gguf"]
    reports = export_gguf_matrix(model, paths, variants)
    export_gguf(model, tmp_path / "a1.gguf", type="q4_k_m", via="f16")
    export_gguf(model, tmp_path / "b1.gguf", type="q5_k_m", output_tensor_type="q8_0")
    export_gguf(model, tmp_path / "c1.gguf", type="q6_k")
    for path, single in zip(paths, ("a1", "b1", "c1"), strict=True):
        assert path.read_bytes() == (tmp_path / f"{single}.gguf").read_bytes()
    # shared: what an earlier output holds as the same encoding (tensor, type, and the --via
    # rounding, which F32 tensors never get), read from the files
    seen: set[tuple] = set()
    for report, via in zip(reports, ("f16", None, None), strict=True):
        keys = {(n, q, None if q == "F32" else via) for n, q in file_types(report.output).items()}
        assert report.shared == len(keys & seen) and report.encoded == len(keys - seen)
        seen |= keys
    assert reports[1].shared == sum(q == "F32" for q in reports[1].tensor_types.values())  # --via: only the norms


def journal(temp: Path) -> list[dict]:
    """The journal lines a temporary holds (after its planned end)."""
    data = temp.read_bytes()
    at = data.rindex(JOURNAL)
    return [json.loads(line) for line in data[at:].split(b"\n")[1:-1]]


def test_killed_mid_tensor_resumes_to_the_same_bytes(model, matrix, tmp_path):
    out, uninterrupted = matrix
    target = tmp_path / "release"
    killed_run("gguf", model, target, *[a for t in TYPES for a in ("--type", t)])
    (temp,) = [p for p in tmp_path.iterdir() if p.name.startswith(".release.weightops-tmp-")]
    files = {t: temp / matrix_file_name(model, t) for t in TYPES}
    written = {t: [e["tensor"] for e in journal(f)] for t, f in files.items()}
    for t in TYPES:
        assert VICTIM not in written[t] and "blk.3.ffn_down.weight" in written[t]
    # the first encoding of VICTIM (Q8_0, for q8_0 alone) was cut after its first slab
    victim = next(x for x in GGUFReader(files["q8_0"]).tensors if x.name == VICTIM)
    assert 0 < len(victim.data.tobytes().rstrip(b"\0")) < victim.n_bytes / 2

    # tamper: a tensor's bytes in one file, a journal line's hash in another (plus garbage)
    q8, q6 = files["q8_0"], files["q6_k"]
    embd = next(x for x in GGUFReader(q8).tensors if x.name == "token_embd.weight")
    with open(q8, "r+b") as f:
        f.seek(embd.data_offset + 5)
        byte = f.read(1)
        f.seek(embd.data_offset + 5)
        f.write(bytes([byte[0] ^ 0xFF]))
    text = q6.read_bytes()
    entry = next(e for e in journal(q6) if e["tensor"] == "blk.0.attn_q.weight")
    q6.write_bytes(text.replace(entry["sha256"].encode(), b"0" * 64) + b"not json\n")

    reports = export_gguf_matrix(model, target, TYPES, resume=True)
    assert not temp.exists()
    for t, r, first in zip(TYPES, reports, uninterrupted, strict=True):
        assert r.output.read_bytes() == first.output.read_bytes(), t
        assert r.resumed == len(written[t]) - (t in ("q8_0", "q6_k")), t
        assert r.resumed + r.encoded + r.shared == len(r.tensor_types)


def test_resume_refuses_a_temporary_of_another_plan(model, matrix, tmp_path):
    """A temporary whose source changed since (a weight file's mtime) is not continued: removed,
    and the run starts afresh."""
    import shutil

    out, uninterrupted = matrix
    source = Path(shutil.copytree(model, tmp_path / "model"))
    target = tmp_path / "release"
    killed_run("gguf", source, target, "--type", "q4_k_m", "--type", "q8_0")
    weights = source / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    reports = export_gguf_matrix(source, target, ["q4_k_m", "q8_0"], resume=True)
    assert [r.resumed for r in reports] == [0, 0]
    assert [p.name for p in tmp_path.iterdir() if "weightops-tmp" in p.name] == []
    for r in reports:
        assert r.output.read_bytes() == (out / r.output.name).read_bytes()


def test_cli_matrix_and_refusals(cli, model, matrix, tmp_path):
    out, uninterrupted = matrix
    r = cli("gguf", model, tmp_path / "rel", "--type", "q8_0", "--type", "Q4_K_M")
    assert r.exit_code == 0, r.output
    assert "model-Q8_0.gguf" in r.stdout and "model-Q4_K_M.gguf" in r.stdout and "encodings" in r.stdout
    for name in ("model-Q8_0.gguf", "model-Q4_K_M.gguf"):
        assert (tmp_path / "rel" / name).read_bytes() == (out / name).read_bytes()
    r = cli("gguf", model, tmp_path / "x.gguf", "--type", "q8_0", "--type", "q4_0")
    assert r.exit_code == 2 and "names a .gguf file" in r.stderr
    r = cli("gguf", model, tmp_path / "dup", "--type", "q8_0", "--type", "q8_0")
    assert r.exit_code == 1 and "given twice" in r.stderr
    r = cli("gguf", model, f"{tmp_path / 'one'}{os.sep}", "--type", "q6_k")  # a trailing slash: a directory
    assert r.exit_code == 0, r.output
    assert (tmp_path / "one" / "model-Q6_K.gguf").read_bytes() == (out / "model-Q6_K.gguf").read_bytes()


def test_job_resume_continues_a_killed_gguf_step(model, matrix, tmp_path):
    """`weightops run --resume` passes --resume to a gguf step: the file a killed step left
    is continued (a one-file output here: the runner manifests one model per step)."""
    out, _ = matrix
    job = tmp_path / "job.toml"
    job.write_text(
        f'[job]\nname = "m"\noutput = "out"\n[inputs]\nm = "{model}"\n'
        '[[steps]]\nname = "q"\nop = "gguf"\nmodel = "@m"\noutput = "m.gguf"\ntype = "q4_k_m"\n'
    )
    outputs.make_dir(tmp_path / "out")
    killed_run("gguf", model, tmp_path / "out" / "m.gguf", "--type", "q4_k_m")
    report = run_job(job, resume=True)
    log = (tmp_path / "out" / ".weightops-job" / "q.log").read_text()
    assert "continuing a temporary left by an interrupted run" in log and "tensors kept" in log
    assert (tmp_path / "out" / "m.gguf").read_bytes() == (out / "model-Q4_K_M.gguf").read_bytes()
    assert "m.gguf" in report["artefacts"]["q"]


# Runs export_gguf_matrix(MODEL, [OUT...], [TYPE...]) (arguments: VICTIM MODEL OUT TYPE OUT TYPE ...)
# and SIGKILLs itself inside VICTIM, as KILLER does for the CLI: what a fused job unit, which is
# one export_gguf_matrix call, leaves when it is killed.
MATRIX_KILLER = (
    KILLER.split("from weightops.cli import run")[0]
    + """
from pathlib import Path
model, rest = sys.argv[2], sys.argv[3:]
g.export_gguf_matrix(model, [Path(o) for o in rest[0::2]], rest[1::2])
"""
)


def test_job_resume_continues_a_killed_fused_unit(model, matrix, tmp_path):
    """Two gguf steps on one model run as one fused unit (one read for both files); killed inside
    a tensor, `weightops run --resume` continues both files from the tensors they had, and each
    equals its uninterrupted matrix file."""
    out, _ = matrix
    job = tmp_path / "job.toml"
    job.write_text(
        f'[job]\nname = "m"\noutput = "out"\n[inputs]\nm = "{model}"\n'
        '[[steps]]\nname = "k4"\nop = "gguf"\nmodel = "@m"\noutput = "m4.gguf"\ntype = "q4_k_m"\n'
        '[[steps]]\nname = "k6"\nop = "gguf"\nmodel = "@m"\noutput = "m6.gguf"\ntype = "q6_k"\n'
    )
    release = tmp_path / "out"
    outputs.make_dir(release)
    proc = subprocess.run(
        [sys.executable, "-c", MATRIX_KILLER, VICTIM, str(model)]
        + [str(release / "m4.gguf"), "q4_k_m", str(release / "m6.gguf"), "q6_k"],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not (release / "m4.gguf").exists() and not (release / "m6.gguf").exists()
    report = run_job(job, resume=True)
    (unit,) = report["units"]
    assert unit["fused"] and unit["steps"] == ["k4", "k6"]
    log = (release / ".weightops-job" / f"{unit['name']}.log").read_text()
    assert "continuing a temporary left by an interrupted run" in log and "tensors kept" in log
    assert (release / "m4.gguf").read_bytes() == (out / "model-Q4_K_M.gguf").read_bytes()
    assert (release / "m6.gguf").read_bytes() == (out / "model-Q6_K.gguf").read_bytes()


def test_imatrix_outputs_are_their_single_runs_and_share_only_alike_weights(model, tmp_path):
    """--imatrix in a matrix: each file is its single run's (whose bytes test_gguf_imatrix.py
    holds against llama-quantize --imatrix); an encoding is shared only between outputs that
    weight the tensor alike (the same file, or no weights at all)."""
    from weightops.io.imatrix import read_imatrix
    from weightops.pipelines.imatrix import compute_imatrix

    text = tmp_path / "calibration.txt"
    text.write_text("\n".join(tiny.corpus(30, seed=5)), encoding="utf-8")
    imatrix = compute_imatrix(model, tmp_path / "m.imatrix", text=text, ctx=64, device="cpu").output
    variants = [GGUFVariant("q6_k", imatrix=imatrix), GGUFVariant("q4_k_m", imatrix=imatrix), GGUFVariant("q6_k")]
    reports = export_gguf_matrix(model, [tmp_path / f"{i}.gguf" for i in range(3)], variants)
    for i, (v, r) in enumerate(zip(variants, reports, strict=True)):
        single = export_gguf(model, tmp_path / f"single-{i}.gguf", type=v.type, imatrix=v.imatrix)
        assert r.output.read_bytes() == single.output.read_bytes(), v
    held = reports[2].tensor_types
    weighted = {n for n in read_imatrix(imatrix).entries if held.get(n, "F32") != "F32"}
    assert weighted and reports[2].encoded == len(weighted)  # the unweighted q6_k encodes these itself
    assert reports[2].shared == len(held) - len(weighted)
    assert reports[1].shared > 0  # q4_k_m's weighted Q6_K tensors are the weighted q6_k's


def split_journals(temp: Path) -> dict[str, list[str]]:
    return {p.name: [e["tensor"] for e in journal(p)] for p in sorted(temp.iterdir())}


def test_split_matrix_killed_mid_tensor_resumes_to_the_same_sets(model, tmp_path):
    """Each output a split set: a killed matrix run's temporary directory holds every set's
    files, each with its own journal; --resume continues them to the uninterrupted sets."""
    kinds, split = ["q8_0", "q4_k_m"], ("--split-max-tensors", "20")
    whole = export_gguf_matrix(model, tmp_path / "whole", kinds, split_max_tensors=20)
    for t, r in zip(kinds, whole, strict=True):
        single = export_gguf(model, tmp_path / f"{t}.gguf", type=t, split_max_tensors=20)
        assert [f.name for f in r.files] == [f"model-{t.upper()}-0000{k}-of-00004.gguf" for k in range(1, 5)]
        assert [f.read_bytes() for f in r.files] == [f.read_bytes() for f in single.files], t
    target = tmp_path / "release"
    killed_run("gguf", model, target, *[a for t in kinds for a in ("--type", t)], *split)
    (temp,) = [p for p in tmp_path.iterdir() if p.name.startswith(".release.weightops-tmp-")]
    written = split_journals(temp)
    assert sorted(written) == sorted(f.name for r in whole for f in r.files)
    assert not any(VICTIM in names for names in written.values()) and sum(map(len, written.values())) > 0
    reports = export_gguf_matrix(model, target, kinds, split_max_tensors=20, resume=True)
    for r, w in zip(reports, whole, strict=True):
        assert [f.read_bytes() for f in r.files] == [f.read_bytes() for f in w.files]
        assert r.resumed == sum(len(written[f.name]) for f in w.files) > 0


def test_split_file_killed_mid_tensor_resumes_through_the_cli(cli, model, tmp_path):
    """One output, a split set in its own slot (io.output_set): `gguf --resume` continues it."""
    whole = export_gguf(model, tmp_path / "whole" / "m.gguf", type="q4_k_m", split_max_tensors=20)
    out = tmp_path / "m.gguf"
    killed_run("gguf", model, out, "--type", "q4_k_m", "--split-max-tensors", "20")
    (temp,) = [p for p in tmp_path.iterdir() if p.name.startswith(".m.gguf.weightops-tmp-")]
    kept = sum(map(len, split_journals(temp).values()))
    r = cli("gguf", model, out, "--type", "q4_k_m", "--split-max-tensors", "20", "--resume")
    assert r.exit_code == 0, r.output
    assert f"{kept} tensors kept from the interrupted run" in r.stdout and kept > 0
    assert [p.read_bytes() for p in sorted(tmp_path.glob("m-*.gguf"))] == [f.read_bytes() for f in whole.files]
