"""Other libraries' warnings (through `warnings` or `logging`) are shown once each, on one line;
a known one in our words on a terminal, in its own words with its source line in a step log."""

import os
import subprocess
import sys

from weightops import console

SPRAY = """
import logging, warnings
from weightops import console
console.install()
for _ in range(50):  # as bitsandbytes does on every int8 matmul, and torch on every tensor
    logging.getLogger("bitsandbytes.autograd").warning(
        "MatMul8bitLt: inputs will be cast from %s to float16 during quantization", "torch.bfloat16")
    warnings.warn("a per-tensor complaint\\x1b[2J", UserWarning)
    warnings.simplefilter("default")  # libraries reset filters, which resets `warnings`' own once-registry
"""


def _spray(**env: str) -> list[str]:
    r = subprocess.run(
        [sys.executable, "-c", SPRAY], capture_output=True, text=True, env={**os.environ, **env}, check=False
    )
    assert r.returncode == 0, r.stderr
    return r.stderr.splitlines()


def test_a_terminal_gets_each_warning_once_and_known_ones_in_our_words():
    assert _spray() == [
        (
            "note: bitsandbytes int8 layers compute in float16 (their bfloat16 inputs are cast), as they will when "
            "served; the measured KLD includes it"
        ),
        "warning (<string>): UserWarning: a per-tensor complaint\\x1b[2J",
    ]


def test_a_step_log_gets_each_warning_once_in_its_own_words_with_its_source():
    lines = _spray(WEIGHTOPS_WARNINGS="log")
    assert len(lines) == 2, lines
    assert lines[0].startswith(
        "warning (bitsandbytes): MatMul8bitLt: inputs will be cast from torch.bfloat16 to float16 during quantization ["
    ) and lines[0].endswith("]")
    assert lines[1].startswith("warning (<string>): UserWarning: a per-tensor complaint\\x1b[2J [<string>:")


def test_notes_in_a_log_once_each():
    log = "x\n" + "warning (bitsandbytes): MatMul8bitLt: inputs will be cast from torch.float32 to float16\n" * 3
    assert console.notes_in(log) == [
        (
            "bitsandbytes int8 layers compute in float16 (their float32 inputs are cast), as they will when served; "
            "the measured KLD includes it"
        )
    ]
    assert console.notes_in("nothing known here") == []
