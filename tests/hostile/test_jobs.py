"""Hostile job files and tampered resumes: `weightops run` refuses before anything runs, and
`--resume` decides on the bytes on disk now, never on a manifest or marker alone."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from weightops import jobs
from weightops.pipelines.manifest import create_manifest
from weightops.verify import hash_cache, manifest


def _tree(root: Path) -> dict[str, tuple]:
    """Everything under root: kind, bytes and mtime of each entry (what 'nothing changed' means)."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        body = p.read_bytes() if p.is_file() and not p.is_symlink() else os.readlink(p) if p.is_symlink() else None
        out[str(p.relative_to(root))] = (st.st_mode, body, st.st_mtime_ns)
    return out


@pytest.fixture
def jobdir(tmp_path) -> Path:
    """tmp/a/b/: a job directory with an input model and prompts, two levels down so that a
    name like ../../x would land inside tmp (and be seen)."""
    d = tmp_path / "a" / "b"
    (d / "base").mkdir(parents=True)
    (d / "base" / "model.safetensors").write_bytes(b"not really weights, never read")
    (d / "prompts.txt").write_text("hello\n")
    return d


def _write_job(d: Path, steps: str, head: str = 'output = "out"') -> Path:
    job = d / "job.toml"
    job.write_text(f'[job]\nname = "hostile"\n{head}\n[inputs]\nbase = "base"\n{steps}')
    return job


def _gguf(name: str, output: str, model: str = "@base") -> str:
    return f'[[steps]]\nname = {json.dumps(name)}\nop = "gguf"\nmodel = "{model}"\noutput = {json.dumps(output)}\n'


BAD_JOBS = {
    "output is .": (
        _gguf("g", "."),
        'output = "out"',
        "step 1 ('g'): output '.'",
        "is the job's output directory itself",
    ),
    "output and job output are .": (
        _gguf("g", "."),
        'output = "."',
        "step 1 ('g'): output '.'",
        "[job]: output '.' is the job file's own directory",
    ),
    "output is the job output": (
        _gguf("g", "../out"),
        'output = "out"',
        "step 1 ('g')",
        "is the job's output directory itself",
    ),
    "output is ..": (
        _gguf("g", ".."),
        'output = "out"',
        "step 1 ('g'): output '..'",
        "must be a relative path inside the job's output directory",
    ),
    "output is absolute": (
        _gguf("g", "{tmp}/elsewhere.gguf"),
        'output = "out"',
        "step 1 ('g')",
        "must be a relative path inside the job's output directory",
    ),
    "output is an input": (_gguf("g", "base"), 'output = "."', "step 1 ('g'): output 'base'", "overlaps input 'base'"),
    "output inside an input": (_gguf("g", "base/x.gguf"), 'output = "."', "step 1 ('g')", "overlaps input 'base'"),
    "output is the job file": (_gguf("g", "job.toml"), 'output = "."', "step 1 ('g')", "overlaps the job file"),
    "output is a reference": (_gguf("g", "@base"), 'output = "out"', "step 1 ('g'): output '@base'", "not a reference"),
    "output is an earlier output": (
        _gguf("g", "m.gguf") + _gguf("h", "m.gguf"),
        'output = "out"',
        "step 2 ('h'): output 'm.gguf'",
        "overlaps the output of step 'g'",
    ),
    "output inside an earlier output": (
        _gguf("g", "m") + _gguf("h", "m/inner.gguf"),
        'output = "out"',
        "step 2 ('h')",
        "overlaps the output of step 'g'",
    ),
    "output is the state directory": (
        _gguf("g", ".weightops-job"),
        'output = "out"',
        "step 1 ('g')",
        "overlaps .weightops-job, which the runner writes",
    ),
    "job output inside an input": (
        _gguf("g", "g.gguf"),
        'output = "base/release"',
        "[job]",
        "lies inside input 'base'",
    ),
    "job output holds the job file": (_gguf("g", "g.gguf"), 'output = ".."', "[job]", "contains the job file"),
    "name ../../x": (_gguf("../../x", "x.gguf"), 'output = "out"', "step 1 ('../../x')", "is not a plain file name"),
    "name /abs": (_gguf("/abs", "x.gguf"), 'output = "out"', "step 1 ('/abs')", "is not a plain file name"),
    "name a/b": (_gguf("a/b", "x.gguf"), 'output = "out"', "step 1 ('a/b')", "is not a plain file name"),
    "name empty": (_gguf("", "x.gguf"), 'output = "out"', "step 1 ('')", "is not a plain file name"),
    "name .": (_gguf(".", "x.gguf"), 'output = "out"', "step 1 ('.')", "is not a plain file name"),
    "name ..": (_gguf("..", "x.gguf"), 'output = "out"', "step 1 ('..')", "is not a plain file name"),
    "name with a newline and ANSI": (
        _gguf("ok\n\x1b[31mforged", "x.gguf"),
        'output = "out"',
        "step 1 ('ok\\n\\x1b[31mforged')",
        "is not a plain file name",
    ),
    "duplicate names": (
        _gguf("g", "g1.gguf") + _gguf("g", "g2.gguf"),
        'output = "out"',
        "step 2 ('g')",
        "name 'g' is already used",
    ),
    "names differing in case": (
        _gguf("g", "g1.gguf") + _gguf("G", "g2.gguf"),
        'output = "out"',
        "step 2 ('G')",
        "only in case",
    ),
    "name of an input": (_gguf("base", "g1.gguf"), 'output = "out"', "step 1 ('base')", "name 'base' is already used"),
}


@pytest.mark.parametrize("case", list(BAD_JOBS))
def test_bad_job_is_refused_before_anything_runs(cli, tmp_path, jobdir, case):
    steps, head, where, message = BAD_JOBS[case]
    job = _write_job(jobdir, steps.replace("{tmp}", str(tmp_path)), head)
    (jobdir / "out").mkdir()
    (jobdir / "out" / "keep.txt").write_text("a file in the job output that no step names")
    before = _tree(tmp_path)
    for args in (("run", job), ("run", job, "--resume"), ("run", job, "--dry-run")):
        r = cli(*args)
        assert r.exit_code == 1, (case, r.exit_code, r.output)
        assert str(job) in r.stderr and where in r.stderr and message in r.stderr, r.stderr
        assert "Traceback" not in r.output
        assert _tree(tmp_path) == before, case  # job file, inputs, job output: all untouched
    assert not list(tmp_path.rglob("x.log")) and not list(tmp_path.rglob("*.done.json"))


def test_output_through_a_symlink_into_an_input_is_refused(cli, tmp_path, jobdir):
    """`out/link` -> the input: the path is inside the job output by name, not by where the bytes go."""
    (jobdir / "out").mkdir()
    (jobdir / "out" / "link").symlink_to(jobdir / "base")
    job = _write_job(jobdir, _gguf("g", "link"))
    before = _tree(tmp_path)
    r = cli("run", job)
    assert r.exit_code == 1 and "step 1 ('g'): output 'link'" in r.stderr
    assert "must be a relative path inside" in r.stderr
    assert _tree(tmp_path) == before


def test_every_problem_is_listed_at_once(cli, tmp_path, jobdir):
    steps = (
        _gguf("../../x", ".")
        + _gguf("g", "base")
        + _gguf("g", "g.gguf", model="@nope")
        + '[[steps]]\nname = "v"\nop = "verify"\nreference = "@base"\ncandidate = "@base"\njson = "/tmp/r.json"\n'
    )
    job = _write_job(jobdir, steps, head='output = "."')
    before = _tree(tmp_path)
    r = cli("run", job)
    assert r.exit_code == 1
    for expected in (
        "[job]: output '.' is the job file's own directory",
        "step 1 ('../../x'): name '../../x' is not a plain file name",
        "step 1 ('../../x'): output '.'",
        "step 2 ('g'): output 'base'",
        "overlaps input 'base'",
        "step 3 ('g'): name 'g' is already used",
        "step 3 ('g'): model refers to '@nope'",
        "step 4 ('v'): option 'json' is set by the runner",
    ):
        assert expected in r.stderr, (expected, r.stderr)
    assert "problems (nothing was run)" in r.stderr
    assert _tree(tmp_path) == before


# ---------------------------------------------------------------------------------------------- resume


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def release(tmp_path, tiny_llama) -> Path:
    """A job over a copy of the tiny model that carries its own weightops manifest: a GGUF
    file and a TencentPretrain directory."""
    base = tmp_path / "base"
    shutil.copytree(tiny_llama, base)
    create_manifest(base)
    steps = _gguf("g", "g.gguf") + (
        '[[steps]]\nname = "tp"\nop = "convert"\ninput = "@base"\noutput = "tp"\nto = "tencentpretrain"\n'
    )
    return _write_job(tmp_path, steps)


def _statuses(report: dict) -> dict[str, str]:
    return {s["name"]: s["status"] for s in report["steps"]}


def test_stale_manifest_in_an_input_does_not_skip_a_step(release):
    first = jobs.run_job(release)
    base = release.parent / "base"
    stale = (base / manifest.MANIFEST).read_bytes()
    tensors = load_file(base / "model.safetensors")
    name = "model.layers.0.mlp.down_proj.weight"
    tensors[name] = (tensors[name].float() * 2).to(tensors[name].dtype)
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    assert (base / manifest.MANIFEST).read_bytes() == stale  # the input still carries the old manifest

    resumed = jobs.run_job(release, resume=True)
    assert _statuses(resumed) == {"g": "ok", "tp": "ok"}
    gguf = release.parent / "out" / "g.gguf"
    assert resumed["artefacts"]["g"]["g.gguf"]["sha256"] == _sha256(gguf) != first["artefacts"]["g"]["g.gguf"]["sha256"]
    tp = release.parent / "out" / "tp" / "tencentpretrain_model.bin"
    assert resumed["artefacts"]["tp"]["tencentpretrain_model.bin"]["sha256"] == _sha256(tp)


@pytest.mark.parametrize("keep_mtime", [False, True], ids=["plain", "mtime-restored"])
def test_artefact_corrupted_in_place_reruns_its_step(release, keep_mtime):
    first = jobs.run_job(release)
    gguf = release.parent / "out" / "g.gguf"
    good = _sha256(gguf)
    st = gguf.stat()
    with open(gguf, "r+b") as f:  # same size, same inode: only the content (and ctime) says so
        f.seek(st.st_size // 2)
        byte = f.read(1)
        f.seek(st.st_size // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    if keep_mtime:
        os.utime(gguf, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert _sha256(gguf) != good and gguf.stat().st_size == st.st_size

    resumed = jobs.run_job(release, resume=True)
    assert _statuses(resumed) == {"g": "ok", "tp": "skipped (complete)"}
    assert resumed["artefacts"]["g"]["g.gguf"]["sha256"] == _sha256(gguf) == good
    doc = json.loads((release.parent / "out" / "release-report.json").read_text())
    assert doc["artefacts"]["g"]["g.gguf"]["sha256"] == good
    assert f"`g.gguf` {st.st_size} bytes `{good}`" in (release.parent / "out" / "release-report.md").read_text()
    assert resumed["artefacts"]["tp"] == first["artefacts"]["tp"]


def test_output_manifest_edited_reruns_its_step(release):
    jobs.run_job(release)
    mpath = release.parent / "out" / "tp" / manifest.MANIFEST
    doc = json.loads(mpath.read_text())
    doc["files"]["tencentpretrain_model.bin"]["sha256"] = "0" * 64
    mpath.write_text(json.dumps(doc))
    resumed = jobs.run_job(release, resume=True)
    assert _statuses(resumed) == {"g": "skipped (complete)", "tp": "ok"}
    assert json.loads(mpath.read_text())["files"]["tencentpretrain_model.bin"]["sha256"] == _sha256(
        release.parent / "out" / "tp" / "tencentpretrain_model.bin"
    )


def test_untouched_job_is_skipped_without_rehashing(release, monkeypatch):
    first = jobs.run_job(release)
    # files hashed within a timestamp tick of their last write are hashed once more on the next
    # resume (verify/hash_cache.py); wait out that tick so the second resume has nothing to read
    time.sleep(0.1)
    jobs.run_job(release, resume=True)
    hashed: list[Path] = []
    real = manifest.sha256_file

    def counting(path, bar=None):
        hashed.append(Path(path))
        return real(path, bar)

    monkeypatch.setattr(manifest, "sha256_file", counting)
    again = jobs.run_job(release, resume=True)
    assert _statuses(again) == {"g": "skipped (complete)", "tp": "skipped (complete)"}
    assert hashed == []
    assert again["artefacts"] == first["artefacts"]
    cache = json.loads((release.parent / "out" / jobs.STATE_DIR / jobs.HASH_CACHE).read_text())["files"]
    assert {
        str((release.parent / p).resolve())
        for p in ("out/g.gguf", "out/tp/tencentpretrain_model.bin", "base/config.json")
    } <= cache.keys()

    # one changed input file is the only file read again (and the steps that read it rerun)
    config = release.parent / "base" / "config.json"
    config.write_text(config.read_text() + "\n")
    changed = jobs.run_job(release, resume=True)
    assert _statuses(changed) == {"g": "ok", "tp": "ok"}
    assert config.resolve() in hashed and (release.parent / "base" / "model.safetensors").resolve() not in hashed


def test_stat_cache_rehashes_a_file_hashed_within_its_write_tick(tmp_path, monkeypatch):
    """A rewrite in the same timestamp tick, same size, leaves the stat unchanged: a digest
    taken within a tick of the last write is not reused."""
    f = tmp_path / "w.bin"
    f.write_bytes(b"A" * 4096)
    cache = hash_cache.HashCache(tmp_path / "cache.json")
    st = f.stat()
    newest = max(st.st_mtime_ns, st.st_ctime_ns)
    monkeypatch.setattr(hash_cache, "_now_ns", lambda: newest + 1)  # hashed right after the write
    assert cache.sha256(f) == _sha256(f)
    with open(f, "r+b") as fh:  # in place, same size; then the mtime put back
        fh.write(b"B")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert cache.sha256(f) == _sha256(f) == hashlib.sha256(b"B" + b"A" * 4095).hexdigest()

    calls = []
    monkeypatch.setattr(hash_cache, "_now_ns", lambda: time.time_ns() + 10**10)  # hashed long after
    cache.sha256(f)
    cache.save()
    reloaded = hash_cache.HashCache(tmp_path / "cache.json")
    monkeypatch.setattr(manifest, "sha256_file", lambda p, bar=None: calls.append(p) or "x")
    assert reloaded.sha256(f) == _sha256(f) and calls == []  # settled: reused from the saved cache
    f.write_bytes(b"C" * 4097)  # size differs: read again
    assert reloaded.sha256(f) == "x" and calls == [f]
