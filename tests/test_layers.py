"""The package's layers, read from its imports: cli -> jobs -> commands -> pipelines -> ops · quant
· verify -> io -> stream · arch (design.md "Layout"). A module may import its own layer and those
below, never one above; and ops/ (stream -> stream) never imports io/ (file formats)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "weightops"

# top-level package or module -> rank (higher may import lower)
RANKS = {
    "errors": 0,
    "dtypes": 0,
    "progress": 0,
    "console": 0,
    "stream": 0,
    "arch": 0,
    "devices": 0,
    "heap": 0,
    "io": 1,
    "ops": 2,
    "quant": 2,
    "verify": 2,
    "calibrate": 2,
    "pipelines": 3,
    "tiny": 3,  # tiny builds checkpoints for tests and the demo
    "commands": 4,  # each command's parameters, declared once for the CLI and job files
    "jobs": 5,
    "examples": 5,
    "cli": 6,
    "__main__": 6,
}

# Upward imports not yet removed, each with what removes it. An entry that no longer holds fails
# `test_known_upward_imports_still_exist`, so the list only shrinks.
KNOWN_UPWARD = {
    ("weightops.arch.llama", "weightops.io.gguf_tokenizer"): "GGUF tokenizer quirks (CodeLlama infill, "
    "SmolLM's add_bos) belong with the GGUF tokenizer "
    "in io/; the arch registry should only name them",
    ("weightops.arch.llama", "weightops.io.special_vocab"): "as above",
}


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p != PACKAGE / "__init__.py")


def _name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every weightops module this file imports, function-level imports included."""
    here = _name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            if module == "weightops":  # `from .. import jobs`: the names are the modules
                found |= {f"{module}.{a.name}" for a in node.names}
            elif module.startswith("weightops."):
                found.add(module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("weightops")}
    return found


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "weightops"


def test_every_module_has_a_layer():
    assert {_layer(_name(p)) for p in _modules()} <= RANKS.keys()


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_nothing_imports_upward(path):
    layer = _layer(_name(path))
    upward = sorted(
        m
        for m in _imports(path)
        if _layer(m) in RANKS and RANKS[_layer(m)] > RANKS[layer] and (_name(path), m) not in KNOWN_UPWARD
    )
    assert not upward, f"{_name(path)} ({layer}, layer {RANKS[layer]}) imports a higher layer: {upward}"


@pytest.mark.parametrize("path", sorted((PACKAGE / "jobs").rglob("*.py")), ids=lambda p: p.name)
def test_jobs_never_import_the_cli(path):
    """Job steps are validated and parsed against `weightops.commands`, which the CLI is built
    from; no exemption in KNOWN_UPWARD can let a job module reach into the CLI."""
    assert not [m for m in _imports(path) if _layer(m) == "cli"], f"{_name(path)} imports the CLI"


def test_known_upward_imports_still_exist():
    for module, target in KNOWN_UPWARD:
        path = PACKAGE.parent / (module.replace(".", "/") + ".py")
        path = path if path.is_file() else path.with_suffix("") / "__init__.py"
        assert target in _imports(path), f"{module} no longer imports {target}: remove it from KNOWN_UPWARD"


@pytest.mark.parametrize("path", sorted((PACKAGE / "ops").rglob("*.py")), ids=lambda p: p.name)
def test_ops_never_import_io(path):
    assert not [m for m in _imports(path) if _layer(m) == "io"], f"{_name(path)} imports io/"


def test_the_import_parser_sees_relative_and_nested_imports():
    """The checks above are only as good as `_imports`: it must resolve `..`, `from . import x`
    and imports inside functions."""
    assert "weightops.stream" in _imports(PACKAGE / "ops" / "delta.py")
    assert "weightops.cli" in _imports(PACKAGE / "cli" / "gguf.py")  # from . import main
    assert "weightops.jobs" in _imports(PACKAGE / "cli" / "jobs.py")  # from .. import jobs
    assert "weightops.io.remap" in _imports(PACKAGE / "verify" / "logits.py")  # imported inside a function


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_every_import_names_a_module_of_this_package(path):
    """A stale name (a module that moved) must fail here, not be served by another copy of the
    package an editable install points at."""

    def exists(module: str) -> bool:
        base = PACKAGE.parent / module.replace(".", "/")
        return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()

    assert not sorted(m for m in _imports(path) if not exists(m))
