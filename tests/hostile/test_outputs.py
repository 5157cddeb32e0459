"""weightops never deletes or overwrites what it did not write (issue 14, items 1-8).

Every bad situation is built from scratch here: user files where an output goes, inputs
inside outputs, outputs that appear mid-run, signals, stale temporaries, umasks.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from weightops import jobs
from weightops.errors import WeightopsError
from weightops.io import outputs
from weightops.io.checkpoint import open_checkpoint, save_hf
from weightops.io.outputs import MARKER, XATTR, Output
from weightops.progress import human_size
from weightops.stream import TensorRef

REPO = Path(__file__).resolve().parents[2]


def _tree(path: Path) -> dict[str, bytes]:
    """Every file under `path` with its bytes (to prove nothing changed)."""
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _temps(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".weightops-tmp-" in p.name or ".weightops-old-" in p.name)


def _user_dir(path: Path) -> dict[str, bytes]:
    path.mkdir(parents=True)
    (path / "notes.txt").write_text("my notes")
    (path / "sub").mkdir()
    (path / "sub" / "data.bin").write_bytes(b"\x00" * 100)
    return _tree(path)


# --- item 6: --force replaces only what weightops wrote, and says what it removes -----------------


def test_force_never_replaces_a_directory_weightops_did_not_write(cli, tmp_path, tiny_llama):
    out = tmp_path / "out"
    before = _user_dir(out)
    for extra in ((), ("--force",)):
        r = cli("convert", tiny_llama, out, "--to", "tencentpretrain", *extra)
        assert r.exit_code == 1, r.output
        assert "did not write" in r.stderr and "notes.txt" in r.stderr and "sub/data.bin" in r.stderr
        assert "move it away yourself" in r.stderr
    assert _tree(out) == before and _temps(tmp_path) == []


def test_force_replaces_our_output_and_says_what_it_removed(cli, tmp_path, tiny_llama):
    out = tmp_path / "out"
    assert cli("convert", tiny_llama, out, "--to", "tencentpretrain").exit_code == 0
    marker = json.loads((out / MARKER).read_text())
    assert sorted(marker["files"]) == sorted(p.name for p in outputs.content(out))
    r = cli("convert", tiny_llama, out, "--to", "tencentpretrain")
    assert r.exit_code == 1 and "pass --force" in r.stderr
    r = cli("convert", tiny_llama, out, "--to", "tencentpretrain", "--force")
    assert r.exit_code == 0, r.stderr
    n = len(marker["files"]) + 1  # and the marker
    assert f"replaced output {out}; removed the previous one ({n} files, " in r.stderr
    assert _temps(tmp_path) == []


def test_force_refuses_our_output_once_it_holds_user_files(cli, tmp_path, tiny_llama):
    out = tmp_path / "out"
    assert cli("convert", tiny_llama, out, "--to", "tencentpretrain").exit_code == 0
    (out / "README.md").write_text("release notes I wrote")
    (out / "extra").mkdir()
    (out / "extra" / "eval.json").write_text("{}")
    before = _tree(out)
    r = cli("convert", tiny_llama, out, "--to", "tencentpretrain", "--force")
    assert r.exit_code == 1
    assert "written by weightops, but now also holds 2 file(s)" in r.stderr
    assert "README.md" in r.stderr and "extra/eval.json" in r.stderr
    assert _tree(out) == before


def test_file_output_needs_our_xattr(cli, tmp_path, tiny_llama):
    out = tmp_path / "model.gguf"
    out.write_bytes(b"my own file")
    for extra in ((), ("--force",)):
        r = cli("gguf", tiny_llama, out, *extra)
        assert r.exit_code == 1 and "file weightops did not write" in r.stderr and XATTR in r.stderr
    assert out.read_bytes() == b"my own file"
    out.unlink()
    assert cli("gguf", tiny_llama, out).exit_code == 0
    assert os.getxattr(out, XATTR)
    size = out.stat().st_size
    r = cli("gguf", tiny_llama, out, "--type", "q8_0", "--force")
    assert r.exit_code == 0, r.stderr
    assert f"replaced output {out}; removed the previous one (1 file, " in r.stderr and out.stat().st_size < size


def test_symlink_and_current_directory_are_never_outputs(cli, tmp_path, tiny_llama, monkeypatch):
    target = tmp_path / "precious.gguf"
    target.write_bytes(b"x")
    (tmp_path / "link.gguf").symlink_to(target)
    r = cli("gguf", tiny_llama, tmp_path / "link.gguf", "--force")
    assert r.exit_code == 1 and "symbolic link" in r.stderr and target.read_bytes() == b"x"
    here = tmp_path / "empty-cwd"
    here.mkdir()
    monkeypatch.chdir(here)
    r = cli("convert", tiny_llama, ".", "--to", "tencentpretrain", "--force")
    assert r.exit_code == 1 and "current directory" in r.stderr and list(here.iterdir()) == []


# --- item 2: verify --json ------------------------------------------------------------------------


def test_verify_json_never_replaces_a_directory_or_an_input(cli, tmp_path, tiny_llama):
    args = ("verify", tiny_llama, tiny_llama, "--structure-only")
    reports = tmp_path / "reports"
    before = _user_dir(reports)
    for target in (reports, f"{reports}{os.sep}"):
        for extra in ((), ("--force",)):
            r = cli(*args, "--json", target, *extra)
            assert r.exit_code == 1 and "directory" in r.stderr and "a file is written here" in r.stderr, r.output
    assert _tree(reports) == before
    r = cli(*args, "--json", f"{tmp_path / 'new'}{os.sep}")  # a trailing slash names a directory
    assert r.exit_code == 1 and "names a directory" in r.stderr and not (tmp_path / "new").exists()
    config = (tiny_llama / "config.json").read_bytes()
    r = cli(*args, "--json", tiny_llama / "config.json", "--force")
    assert r.exit_code == 1 and "inside the input" in r.stderr
    assert (tiny_llama / "config.json").read_bytes() == config
    assert list(tiny_llama.glob(".*weightops-*")) == []
    report = tmp_path / "r.json"
    assert cli(*args, "--json", report).exit_code == 0 and json.loads(report.read_text())["passed"]
    r = cli(*args, "--json", report)
    assert r.exit_code == 1 and "pass --force" in r.stderr
    assert cli(*args, "--json", report, "--force").exit_code == 0


# --- item 3: demo -----------------------------------------------------------------------------------


def test_demo_never_deletes_user_files(cli, tmp_path, monkeypatch):
    """`demo . --force` in a directory of user files, and `demo DIR --force` on one, refuse;
    the demo's own earlier WORKDIR is replaced (models and job stubbed: the real demo takes
    minutes and runs in tests/core)."""
    from weightops.jobs import demo

    def fake_models(models: Path) -> None:
        models.mkdir(parents=True)
        (models / "m.bin").write_bytes(b"weights")

    def fake_job(job_file: Path, **_) -> dict:
        release = outputs.make_dir(job_file.parent / "release")
        with Output(release / "release-report.json", kind="file", force=True).writing() as tmp:
            tmp.write_text("{}")
        return {"job": "demo", "passed": True, "steps": [], "verifications": [], "artefacts": {}}

    monkeypatch.setattr(demo, "build_models", fake_models)
    monkeypatch.setattr(demo.jobs, "run_job", fake_job)
    home = tmp_path / "home"
    before = _user_dir(home)
    monkeypatch.chdir(home)
    for args in ((".", "--force"), (home, "--force"), (".",)):
        r = cli("demo", *args)
        assert r.exit_code == 1 and "current directory" in r.stderr, r.output
    assert _tree(home) == before
    other = tmp_path / "other"
    before_other = _user_dir(other)
    r = cli("demo", other, "--force")
    assert r.exit_code == 1 and "did not write" in r.stderr and "notes.txt" in r.stderr
    assert _tree(other) == before_other
    work = tmp_path / "work"
    assert cli("demo", work).exit_code == 0
    assert cli("demo", work).exit_code == 1  # exists: needs --force
    r = cli("demo", work, "--force")
    # models/m.bin, release.toml, release/release-report.json and the two markers
    assert r.exit_code == 0 and f"replaced WORKDIR {work}; removed the previous one (5 files" in r.stderr
    (work / "models" / "mine.txt").write_text("x")
    r = cli("demo", work, "--force")
    assert r.exit_code == 1 and "models/mine.txt" in r.stderr and (work / "models" / "mine.txt").exists()


# --- item 4: an output that appears or changes while the command runs -------------------------------


def _stream_that_runs(tiny_llama: Path, action) -> list[TensorRef]:
    """The tiny model's tensors; reading the third one runs `action` (something happening
    concurrently, mid-write)."""
    refs = list(open_checkpoint(tiny_llama).tensors)
    victim = refs[2]

    def load():
        action()
        return victim.load()

    refs[2] = TensorRef(victim.name, victim.shape, victim.dtype_name, victim.source, loader=load)
    return refs


def test_directory_appearing_during_the_run_is_left_alone(tmp_path, tiny_llama):
    out = tmp_path / "out"
    refs = _stream_that_runs(tiny_llama, lambda: _user_dir(out))
    with pytest.raises(WeightopsError, match="appeared while this command was running; it was left alone"):
        save_hf(refs, out)
    assert _tree(out) == {"notes.txt": b"my notes", "sub/data.bin": b"\x00" * 100}
    assert _temps(tmp_path) == []


def test_empty_directory_filled_during_the_run_is_left_alone(tmp_path, tiny_llama):
    out = tmp_path / "out"
    out.mkdir()  # empty at the start: planned for replacement, without --force
    refs = _stream_that_runs(tiny_llama, lambda: (out / "new.txt").write_text("arrived"))
    with pytest.raises(WeightopsError, match=r"received files weightops did not write \(new.txt\) while"):
        save_hf(refs, out)
    assert _tree(out) == {"new.txt": b"arrived"} and _temps(tmp_path) == []


def test_our_output_receiving_user_files_during_the_run_is_left_alone(tmp_path, tiny_llama):
    out = tmp_path / "out"
    save_hf(open_checkpoint(tiny_llama).tensors, out)
    refs = _stream_that_runs(tiny_llama, lambda: (out / "notes.txt").write_text("mine"))
    with pytest.raises(WeightopsError, match=r"received files weightops did not write \(notes.txt\)"):
        save_hf(refs, out, force=True)
    assert (out / "notes.txt").read_text() == "mine" and (out / "model.safetensors").is_file()
    assert _temps(tmp_path) == []


def test_file_appearing_during_the_run_is_left_alone(tmp_path):
    out = tmp_path / "report.json"
    with pytest.raises(WeightopsError, match="appeared"):
        with Output(out, kind="file").writing() as tmp:
            tmp.write_text("ours")
            out.write_text("theirs")
    assert out.read_text() == "theirs" and _temps(tmp_path) == []


# --- item 5: inputs passed by option ------------------------------------------------------------


def test_inputs_given_by_option_are_never_inside_the_output(cli, tmp_path, tiny_llama, spm_tokenizer):
    out = tmp_path / "out"
    assert cli("convert", tiny_llama, out, "--to", "tencentpretrain").exit_code == 0
    before = _tree(out)
    (tmp_path / "tokens.txt").write_text("hello\n")
    cases = [
        (("expand-vocab", tiny_llama, out, "--merge-spm", out / "tokenizer.model"), "lies inside the output"),
        (("expand-vocab", tiny_llama, tmp_path / "x", "--new-tokenizer", tmp_path), "is inside the input"),
        (("convert", out, out, "--to", "hf"), "is the input"),
        (("convert", tiny_llama, out, "--to", "tencentpretrain", "--tokenizer", out), "is the input"),
        (
            ("convert", tiny_llama, out, "--to", "tencentpretrain", "--tp-config", out / "tencentpretrain_config.json"),
            "lies inside the output",
        ),
    ]
    for args, message in cases:
        r = cli(*args, "--force")
        assert r.exit_code == 1 and message in r.stderr, (args, r.output)
    assert _tree(out) == before
    inner = tmp_path / "model-out"
    inner.mkdir()
    (inner / "tokens.txt").write_text("hello\n")
    r = cli("expand-vocab", tiny_llama, inner, "--add-tokens", inner / "tokens.txt", "--force")
    assert r.exit_code == 1 and "lies inside the output" in r.stderr and (inner / "tokens.txt").exists()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello\n")
    r = cli("verify", tiny_llama, tiny_llama, "--structure-only", "--prompts", prompts, "--json", prompts, "--force")
    assert r.exit_code == 1 and "is the input" in r.stderr and prompts.read_text() == "hello\n"
    tok = tmp_path / "tok"
    tok.mkdir()
    r = cli("gguf", tiny_llama, tok / "m.gguf", "--tokenizer", tok)
    assert r.exit_code == 1 and "inside the input" in r.stderr and list(tok.iterdir()) == []


# --- item 7: signals and stale temporaries --------------------------------------------------------

# `python -m weightops`, held just before publishing until FLAG exists: the signal lands while
# the written temporary sibling is in place (the run is otherwise unchanged).
_HELD = """
import os, sys, time
from pathlib import Path
from weightops.io import output_set, outputs
def holding(publish):
    def held(self, *args):
        print("READY", flush=True)
        while not Path(os.environ["FLAG"]).exists():
            time.sleep(0.01)
        publish(self, *args)
    return held
outputs.Output._publish = holding(outputs.Output._publish)
output_set.OutputSet._publish = holding(output_set.OutputSet._publish)  # GGUF outputs (file or split set)
sys.argv[0] = "weightops"
from weightops.cli import run
run()
"""


def _held(tmp_path: Path, *args) -> subprocess.Popen:
    env = dict(os.environ, FLAG=str(tmp_path / "go"), PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, "-c", _HELD, *map(str, args)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "READY", proc.stderr.read()
    return proc


def _weightops(*args, umask: int | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "weightops", *map(str, args)],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        preexec_fn=None if umask is None else (lambda: os.umask(umask)),
    )


def test_sigterm_removes_the_temporary_and_publishes_nothing(tmp_path, tiny_llama):
    out = tmp_path / "m.gguf"
    proc = _held(tmp_path, "gguf", tiny_llama, out)
    (temp,) = _temps(tmp_path)
    assert temp.startswith(".m.gguf.weightops-tmp-") and (tmp_path / temp).stat().st_size > 0
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == "terminated; no output was published"
    assert "Traceback" not in err and not out.exists() and _temps(tmp_path) == []


def test_sigkill_leaves_a_temporary_the_next_run_removes(tmp_path, tiny_llama):
    out = tmp_path / "m.gguf"
    proc = _held(tmp_path, "gguf", tiny_llama, out)
    proc.kill()
    proc.communicate(timeout=60)
    (temp,) = _temps(tmp_path)
    size = (tmp_path / temp).stat().st_size
    trash = tmp_path / ".m.gguf.weightops-old-abc123"  # a replaced output a killed run had not deleted yet
    trash.mkdir()
    (trash / "m.gguf").write_bytes(b"\x01" * 10)
    r = _weightops("gguf", tiny_llama, out)
    assert r.returncode == 0, r.stderr
    assert (
        f"removing a temporary left by an interrupted run: {tmp_path / temp} (1 file, {human_size(size)})" in r.stderr
    )
    assert f"removing a temporary left by an interrupted run: {trash} (1 file, 10 B)" in r.stderr
    assert _temps(tmp_path) == [] and out.is_file()


def test_a_live_temporary_is_not_swept_and_the_later_publisher_wins_alone(tmp_path, tiny_llama):
    """Two runs on one OUTPUT: the second leaves the first one's (locked) temporary alone and
    publishes; the first then finds OUTPUT appeared and publishes nothing."""
    out = tmp_path / "m.gguf"
    first = _held(tmp_path, "gguf", tiny_llama, out, "--type", "q8_0")
    (temp,) = _temps(tmp_path)
    r = _weightops("gguf", tiny_llama, out)
    assert r.returncode == 0 and "interrupted run" not in r.stderr
    assert (tmp_path / temp).exists()
    published = out.read_bytes()
    (tmp_path / "go").touch()
    _, err = first.communicate(timeout=120)
    assert first.returncode == 1 and "appeared" in err and "nothing was published" in err
    assert out.read_bytes() == published and _temps(tmp_path) == []


# --- item 8: modes follow the umask ---------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_published_outputs_follow_the_umask(tmp_path, tiny_llama, umask):
    gguf, tp = tmp_path / "m.gguf", tmp_path / "tp"
    assert _weightops("gguf", tiny_llama, gguf, umask=umask).returncode == 0
    assert _weightops("convert", tiny_llama, tp, "--to", "tencentpretrain", umask=umask).returncode == 0
    assert gguf.stat().st_mode & 0o777 == 0o666 & ~umask
    assert tp.stat().st_mode & 0o777 == 0o777 & ~umask
    assert {p.stat().st_mode & 0o777 for p in tp.iterdir()} == {0o666 & ~umask}


# --- item 1 (deletion): the job runner removes only what weightops wrote ---------------------------


def _gguf_job(tmp_path: Path, model: Path, output: str) -> Path:
    job = tmp_path / "job.toml"
    job.write_text(
        f'[job]\nname = "t"\noutput = "out"\n[inputs]\nmodel = "{model}"\n'
        f'[[steps]]\nname = "q"\nop = "gguf"\nmodel = "@model"\noutput = "{output}"\n'
    )
    return job


@pytest.mark.parametrize("kind", ["file", "dir"])
def test_runner_stops_instead_of_deleting_a_step_output_it_did_not_write(tmp_path, tiny_llama, kind):
    (tmp_path / "out").mkdir()
    target = tmp_path / "out" / "m.gguf"
    if kind == "file":
        target.write_bytes(b"someone else's file")
        before = _tree(target)
    else:
        before = _user_dir(target)
    with pytest.raises(WeightopsError, match=r"step 'q': output .*m.gguf .*did not write.*move it away"):
        jobs.run_job(_gguf_job(tmp_path, tiny_llama, "m.gguf"))
    assert _tree(target) == before
    assert not (tmp_path / "out" / jobs.STATE_DIR / "q.log").exists()  # the step never ran


def test_runner_replaces_its_own_outputs_and_its_directory_stays_ours(tmp_path, tiny_llama):
    job = _gguf_job(tmp_path, tiny_llama, "m.gguf")
    assert jobs.run_job(job)["passed"]
    assert jobs.run_job(job)["passed"]  # reports, logs, markers, the artefact and its manifest: all ours
    out = tmp_path / "out"
    assert outputs.foreign(out) == []
    (out / "mine.txt").write_text("x")
    assert outputs.foreign(out) == [out / "mine.txt"]


# --- the marker is never content ------------------------------------------------------------------


def test_marker_is_not_content(cli, tmp_path, tiny_llama):
    tp, hf = tmp_path / "tp", tmp_path / "hf"
    assert cli("convert", tiny_llama, tp, "--to", "tencentpretrain").exit_code == 0
    assert cli("convert", tp, hf, "--to", "hf").exit_code == 0
    assert cli("manifest", "create", hf).exit_code == 0
    manifest = json.loads((hf / "weightops-manifest.json").read_text())
    assert MARKER not in manifest["files"] and manifest["files"]
    listed = json.loads((hf / MARKER).read_text())["files"]
    assert sorted(listed) == sorted(p.name for p in outputs.content(hf))  # the manifest registered too
    files = json.loads(cli("inspect", hf, "--json").stdout)["files"]
    assert files and not any(MARKER in f for f in files)
    r = cli("convert", tp, hf, "--to", "hf", "--force")  # still ours as a whole, manifest included
    assert r.exit_code == 0, r.stderr
    user = tmp_path / "user"
    user.mkdir()
    (user / "weightops-manifest.json").write_text("my own notes")
    (user / "model.safetensors").write_bytes((hf / "model.safetensors").read_bytes())
    r = cli("manifest", "create", user)
    assert r.exit_code == 1 and "did not write" in r.stderr
    assert (user / "weightops-manifest.json").read_text() == "my own notes"
