"""What `weightops run` shows: one line per step, a short summary with the report's path, other
libraries' warnings in the step logs (restated once by us where they matter), and a failed
step's reason, escaped. Run through the real entry point, as users run it."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from weightops.jobs.screen import reason

INT8_STEPS = """
[[steps]]
name = "int8"
op = "bnb"
model = "@base"
output = "int8"
bits = 8

[[steps]]
name = "check-int8"
op = "verify"
reference = "@base"
candidate = "@int8"
max-tokens = 16
max-kld = 1.0
min-top1 = 0.0
"""


def _job(d: Path, inputs: dict[str, str], steps: str) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    head = '[job]\nname = "screen test"\noutput = "out"\n[inputs]\n'
    head += "".join(f"{k} = {json.dumps(v)}\n" for k, v in inputs.items())
    (d / "job.toml").write_text(head + steps)
    return d / "job.toml"


def _weightops(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "weightops", *map(str, args)], capture_output=True, text=True, check=False
    )


@pytest.fixture(scope="module")
def int8_run(tmp_path_factory, tiny_llama) -> tuple[Path, subprocess.CompletedProcess]:
    pytest.importorskip("bitsandbytes")
    job = _job(tmp_path_factory.mktemp("screen"), {"base": str(tiny_llama)}, INT8_STEPS)
    return job.parent, _weightops("run", job)


def test_run_shows_one_line_per_step_then_a_summary(int8_run):
    d, r = int8_run
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""  # stdout is left to --json
    lines = r.stderr.splitlines()
    steps = [line for line in lines if re.match(r"\[\d/2\] ", line)]
    assert len(steps) == 2 and lines[:2] == steps, r.stderr
    assert re.match(r"\[1/2\] ok +int8 +bnb +[\d.]+s +int8 +[\d.]+ kB$", steps[0]), steps[0]
    assert re.match(
        r"\[2/2\] ok +check-int8 +verify +[\d.]+s +KLD [\d.e-]+ \(max 1\), top-1 [\d.]+% \(min 0\.0%\)$", steps[1]
    ), steps[1]
    assert lines[2].startswith("PASSED  screen test: 2 steps, all ok, in ")
    report = d / "out" / "release-report.md"
    assert f"  report     {report}" in lines and report.is_file()
    assert len(lines) <= 10, r.stderr  # one screen, not the report's tables
    for noise in ("MatMul8bitLt", "Traceback", "Writing model shards", "it/s", "sha256`", "mean KLD  "):
        assert noise not in r.stderr, noise
    # bitsandbytes' per-matmul warning: in the step's log once, in our words once on screen
    log = (d / "out" / ".weightops-job" / "check-int8.log").read_text()
    assert log.count("MatMul8bitLt: inputs will be cast from") == 1, log
    notes = [line for line in lines if line.startswith("  note ")]
    assert len(notes) == 1 and "check-int8: bitsandbytes int8 layers compute in float16" in notes[0], r.stderr


def test_resume_says_skipped_and_stays_quiet(int8_run):
    d, _ = int8_run
    r = _weightops("run", d / "job.toml", "--resume")
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    assert re.match(r"\[1/2\] skipped +int8 +bnb +- +int8 ", lines[0]), lines[0]
    assert lines[2].startswith("PASSED  screen test: 2 steps, 2 skipped (complete), in "), lines[2]
    assert "replaced output" not in r.stderr and len(lines) <= 10, r.stderr  # the report rewrite is bookkeeping


def test_standalone_verify_shows_a_library_warning_once(int8_run, tiny_llama):
    d, _ = int8_run
    r = _weightops("verify", tiny_llama, d / "out" / "int8", "--max-tokens", "16", "--max-kld", "1", "--min-top1", "0")
    assert r.returncode == 0, r.stderr
    assert "MatMul8bitLt" not in r.stderr
    assert r.stderr.count("note: bitsandbytes int8 layers compute in float16") == 1, r.stderr


def test_failed_step_shows_its_reason_escaped(tmp_path):
    hostile = tmp_path / "in\x1b]0;pwned\x07put"  # sets the terminal's title if echoed raw (click strips CSI only)
    hostile.mkdir()
    job = _job(
        tmp_path,
        {"model": hostile.name},
        '[[steps]]\nname = "q8"\nop = "gguf"\nmodel = "@model"\noutput = "m.gguf"\ntype = "q8_0"\n',
    )
    r = _weightops("run", job)
    assert r.returncode == 1, r.stderr
    assert "\x1b" not in r.stderr and "\x07" not in r.stderr and "Traceback" not in r.stderr
    step = r.stderr.splitlines()[0]
    assert re.match(r"\[1/1\] FAILED +q8 +gguf +[\d.]+s +exit 1: .*in\\x1b]0;pwned\\x07put: no checkpoint", step), step
    assert "FAILED  screen test: step 'q8' (gguf) failed, step 1 of 1, after " in r.stderr
    assert f"step log   {tmp_path / 'out' / '.weightops-job' / 'q8.log'}" in r.stderr
    assert "error: step 'q8' (gguf) failed with exit code 1: " in r.stderr
    assert json.loads((tmp_path / "out" / "release-report.json").read_text())["steps"][0]["status"] == "failed"


@pytest.mark.parametrize(
    "log,code,expected",
    [
        ("wrote x\nwarning (torch): UserWarning: y\nerror: bad \x1b[31mname\nwarning: ours\n", 1, "bad \\x1b[31mname"),
        ('Traceback (most recent call last):\n  File "x.py", line 1\nValueError: boom\n', 1, "ValueError: boom"),
        ("warning (bitsandbytes): noise\n", -9, "killed by SIGKILL"),
        ("", 1, "it wrote nothing to its log"),
    ],
)
def test_reason_is_the_last_meaningful_line(log, code, expected):
    assert reason(log, code) == expected


def test_many_warnings_of_a_step_are_cut_to_its_first_and_last(tmp_path, tiny_llama):
    """A q4_k_m of rows of 64 falls back for most tensors (one warning each, as llama-quantize
    prints them, then the count): the summary shows the first two, how many more, and the count."""
    job = _job(
        tmp_path,
        {"model": str(tiny_llama)},
        '[[steps]]\nname = "k"\nop = "gguf"\nmodel = "@model"\noutput = "m.gguf"\ntype = "q4_k_m"\n',
    )
    r = _weightops("run", job)
    assert r.returncode == 0, r.stderr
    log = (tmp_path / "out" / ".weightops-job" / "k.log").read_text()
    own = [line for line in log.splitlines() if line.startswith("warning: ")]
    shown = [line for line in r.stderr.splitlines() if line.startswith("  warning    k: ")]
    assert len(own) > 5 and len(shown) == 4
    assert shown[0].endswith(own[0].removeprefix("warning: ")) and shown[1].endswith(own[1].removeprefix("warning: "))
    assert shown[2].endswith(f"... {len(own) - 3} more in its log")
    assert shown[3].endswith("required fallback quantization") and own[-1].endswith("required fallback quantization")
    assert f"({len(own)} warnings, see the summary)" in r.stderr.splitlines()[0]
