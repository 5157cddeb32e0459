"""`weightops/__init__.py` is the public API: every name resolves to the pipeline that defines it,
and importing the package (what every CLI start does) loads none of torch, transformers or gguf."""

from __future__ import annotations

import subprocess
import sys

import pytest

import weightops


@pytest.mark.parametrize("name", weightops.__all__)
def test_every_public_name_resolves(name):
    value = getattr(weightops, name)
    assert getattr(value, "__name__", name) == name


def test_unknown_names_are_attribute_errors():
    with pytest.raises(AttributeError, match="no attribute 'export_ggfu'"):
        weightops.export_ggfu  # noqa: B018


def test_import_is_light():
    code = "import sys, weightops, weightops.cli; print(sorted({'torch', 'transformers', 'gguf'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
