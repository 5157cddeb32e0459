"""The GGML type table: its facts agree with gguf-py and llama.cpp, its names round-trip,
every record's kernels work, and no other module keeps its own list of types."""

from __future__ import annotations

import ast
import ctypes
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType, quants

from weightops.errors import WeightopsError
from weightops.quant import ggml_types, policy
from weightops.verify import gate

RECORDS = {t.name: t for t in ggml_types.GGML_TYPES}
FILE_TYPES = {f.name: f for f in ggml_types.FILE_TYPES}
CPU = torch.device("cpu")


def test_names_are_unique_and_ggml_spelling():
    assert len(RECORDS) == len(ggml_types.GGML_TYPES) and len(FILE_TYPES) == len(ggml_types.FILE_TYPES)
    assert len({t.ggml for t in ggml_types.GGML_TYPES}) == len(RECORDS)
    for name, t in RECORDS.items():
        assert name == t.ggml.name.lower()


@pytest.mark.parametrize("name", list(RECORDS))
def test_sizes_are_gguf_py_s(name):
    t = RECORDS[name]
    assert (t.block_size, t.type_size) == GGML_QUANT_SIZES[t.ggml]
    assert t.bytes_per_weight == GGML_QUANT_SIZES[t.ggml][1] / GGML_QUANT_SIZES[t.ggml][0]
    assert (t.float_dtype is None) == (t.block_size > 1)  # a float type is a cast: one value per "block"


@pytest.mark.parametrize("name", list(RECORDS))
def test_type_names_round_trip(name):
    t = RECORDS[name]
    assert ggml_types.parse(name) is t and ggml_types.parse(name.upper()) is t and ggml_types.find(t.ggml.name) is t
    assert ggml_types.get(t.ggml) is t
    assert policy.parse_overrides([f"blk.*={name.upper()}"]) == [("blk.*", t.ggml)]


@pytest.mark.parametrize("name", list(FILE_TYPES))
def test_file_type_names_round_trip(name):
    f = FILE_TYPES[name]
    assert ggml_types.parse_file_type(name.upper()) is f and ggml_types.find_file_type(name) is f
    assert policy.file_type(name) == f.file_type
    assert f.tensor_type in RECORDS and RECORDS[f.tensor_type].is_block == (f.quantizer or name == "q8_0")


def test_unknown_names_list_the_known_ones():
    for parse, names in (
        (ggml_types.parse, ggml_types.NAMES),
        (ggml_types.parse_file_type, ggml_types.FILE_TYPE_NAMES),
    ):
        with pytest.raises(WeightopsError, match="unknown GGUF type 'q9_9'; choose one of " + ", ".join(names)):
            parse("q9_9")
    assert ggml_types.find("iq4_nl") is None and ggml_types.find_file_type("iq4_xs") is None
    with pytest.raises(WeightopsError, match="IQ4_NL is not one weightops writes"):
        ggml_types.get(GGMLQuantizationType.IQ4_NL)


def test_cli_choices_are_the_file_types(cli):
    from weightops.cli import main

    gguf = main.get_command(None, "gguf")  # type: ignore[arg-type]
    choices = next(p.type.choices for p in gguf.params if p.name == "qtype")
    assert tuple(choices) == ggml_types.FILE_TYPE_NAMES
    r = cli("gguf", "--help")
    assert r.exit_code == 0
    quantizer = "/".join(n for n, f in FILE_TYPES.items() if f.quantizer)
    converter = "/".join(n for n, f in FILE_TYPES.items() if not f.quantizer)
    assert f"* {converter}: every other weight" in r.stdout and f"* {quantizer}:" in r.stdout
    span = f"{quantizer.split('/')[0]} ... {quantizer.split('/')[-1]}"
    assert f"With a llama-quantize --type ({span}): every 2-D weight" in " ".join(r.stdout.split())


@pytest.mark.parametrize("name", list(FILE_TYPES))
def test_file_type_ids_are_llama_cpp_s(name):
    llama_cpp = pytest.importorskip("llama_cpp")
    f = FILE_TYPES[name]
    assert isinstance(f.file_type, LlamaFileType)
    assert int(f.file_type) == getattr(llama_cpp, f"LLAMA_FTYPE_{f.file_type.name}")


@pytest.mark.parametrize("name", list(RECORDS))
def test_types_are_libggml_s(name):
    """Id, spelling and sizes as llama.cpp's own libggml has them."""
    llama_cpp = pytest.importorskip("llama_cpp")
    lib = ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so"))
    lib.ggml_type_name.restype, lib.ggml_type_name.argtypes = ctypes.c_char_p, [ctypes.c_int]
    lib.ggml_blck_size.restype, lib.ggml_blck_size.argtypes = ctypes.c_int64, [ctypes.c_int]
    lib.ggml_type_size.restype, lib.ggml_type_size.argtypes = ctypes.c_size_t, [ctypes.c_int]
    t = RECORDS[name]
    assert lib.ggml_type_name(int(t.ggml)).decode() == t.c_name and t.c_name.lower() == name  # "q4_K"
    assert (lib.ggml_blck_size(int(t.ggml)), lib.ggml_type_size(int(t.ggml))) == (t.block_size, t.type_size)


@pytest.mark.parametrize("name", list(RECORDS))
def test_encode_decode_match_gguf_quants(name, request):
    """Bytes as gguf.quants writes them (itself checked against libggml; libggml itself for the
    K-quants, which gguf.quants only reads), values as gguf.quants reads them."""
    t = RECORDS[name]
    rng = np.random.default_rng(list(RECORDS).index(name))
    a = (rng.standard_normal((3, 512)) * 0.05).astype(np.float32)
    stored = t.encode(torch.from_numpy(a), CPU)
    assert stored.dtype == torch.uint8 and tuple(stored.shape) == (3, 512 // t.block_size * t.type_size)
    k_quant = t.block_size == 256
    expected = request.getfixturevalue("libggml")(a, name) if k_quant else quants.quantize(a, t.ggml)
    assert np.array_equal(stored.numpy().reshape(-1), expected.reshape(-1).view(np.uint8))
    values = t.decode(stored, a.shape)
    assert values.dtype == torch.float32 and tuple(values.shape) == a.shape
    assert np.array_equal(values.numpy(), quants.dequantize(expected, t.ggml).astype(np.float32).reshape(a.shape))
    again = t.encode(values, CPU)
    if k_quant:  # llama.cpp's K-quant scale search is not idempotent: decoded values need not give `stored` back
        libggml = request.getfixturevalue("libggml")
        assert np.array_equal(again.numpy().reshape(-1), libggml(values.numpy(), name).reshape(-1))
    else:
        assert torch.equal(again, stored)  # decoded values encode to the same bytes
    if t.kernels is None:
        with pytest.raises(WeightopsError, match="float type"):
            t.encoder  # noqa: B018
    else:
        assert callable(t.encoder) and callable(t.decoder)


@pytest.mark.parametrize("name", list(RECORDS))
def test_fallbacks(name):
    t = RECORDS[name]
    assert t.fits((2, 256)) and not t.fits(())
    if t.block_size == 1:
        assert t.fallback is None and t.fits((2, 3))
        return
    assert t.fallback in RECORDS and not t.fits((2, t.block_size + 1))
    odd = (2, t.block_size + 2)
    chosen = t.fallback_for(odd)
    assert chosen.fits(odd) and chosen in (RECORDS[t.fallback], RECORDS["f16"])


@pytest.mark.parametrize("name", list(RECORDS))
def test_verify_kinds(name):
    t = RECORDS[name]
    assert t.verify_kind in gate.KINDS
    assert gate.ggml_kind(t.ggml.name) == t.verify_kind
    assert (t.verify_kind == "float") == (t.float_dtype is not None)


def _type_facts(tree: ast.AST) -> tuple[set[str], set[str]]:
    """(GGMLQuantizationType/LlamaFileType members named as attributes, string constants that
    are exactly one of our type names) in a module."""
    members = {m.name for m in GGMLQuantizationType} | {m.name for m in LlamaFileType}
    names = set(RECORDS) | set(FILE_TYPES)
    attrs = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr in members}
    strings = {
        n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value in names
    }
    return attrs, strings


def test_no_other_module_lists_ggml_types():
    """A module may name one type (a default such as `--type f16`, llama.cpp's F32 for norms);
    two or more are a list of types, which belongs in `quant.ggml_types`. The exception is
    `quant.policy`: llama-quantize's type rules, which name types as llama.cpp's code does."""
    root = Path(ggml_types.__file__).parents[1]  # weightops/ (a namespace package: no __file__)
    table = root / "quant" / "ggml_types.py"
    offenders = {}
    for path in sorted(root.rglob("*.py")):
        if path in (table, root / "quant" / "policy.py"):
            continue
        attrs, strings = _type_facts(ast.parse(path.read_text(), str(path)))
        if len(attrs) + len(strings) > 1:
            offenders[str(path.relative_to(root))] = sorted(attrs | strings)
    assert not offenders, f"GGML type lists outside quant/ggml_types.py: {offenders}"
    attrs, strings = _type_facts(ast.parse(table.read_text()))
    assert len(attrs) >= len(RECORDS) and len(strings) >= len(RECORDS)  # the scan does see a table
