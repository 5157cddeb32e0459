"""`--dtype` choices come from `weightops.dtypes`: every command offers the same ones, they map
to the same torch dtypes, and no other module keeps its own list."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from weightops import dtypes
from weightops.cli import all_commands
from weightops.errors import WeightopsError


def _choices(command: str, param: str) -> tuple[str, ...]:
    cmd = all_commands()[command]
    return tuple(next(p.type.choices for p in cmd.params if p.name == param))


@pytest.mark.parametrize("command", ["apply-delta", "make-delta", "convert", "verify"])
def test_every_dtype_option_offers_the_table(command):
    assert _choices(command, "dtype") == dtypes.DTYPE_CHOICES == ("auto", "float32", "float16", "bfloat16")


def test_bnb_compute_dtype_offers_the_float_choices():
    assert _choices("bnb", "compute_dtype") == tuple(dtypes.FLOAT_CHOICES)


def test_from_choice():
    assert dtypes.from_choice("auto") is None and dtypes.from_choice(None) is None
    assert [dtypes.from_choice(c) for c in dtypes.FLOAT_CHOICES] == [torch.float32, torch.float16, torch.bfloat16]
    assert [dtypes.itemsize(n) for n in dtypes.FLOAT_CHOICES.values()] == [4, 2, 2]
    with pytest.raises(WeightopsError, match="--dtype 'float8': choose one of auto, float32, float16, bfloat16"):
        dtypes.from_choice("float8")


def test_verify_compute_dtype_reads_the_table():
    from weightops.verify.logits import compute_dtype

    cpu = torch.device("cpu")
    assert compute_dtype(cpu, "auto") == torch.float32 and compute_dtype(cpu, "bfloat16") == torch.bfloat16
    with pytest.raises(WeightopsError, match="--dtype 'half'"):
        compute_dtype(cpu, "half")


def test_no_other_module_lists_dtype_choices():
    """One choice as a literal (a default) is fine; two or more are a list of choices."""
    root = Path(dtypes.__file__).parent
    choices = set(dtypes.FLOAT_CHOICES)
    offenders = {}
    for path in sorted(root.rglob("*.py")):
        if path.name == "dtypes.py" and path.parent == root:
            continue
        found = {
            n.value for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Constant) and n.value in choices
        }
        if len(found) > 1:
            offenders[str(path.relative_to(root))] = sorted(found)
    assert not offenders, f"--dtype choices listed outside weightops/dtypes.py: {offenders}"
