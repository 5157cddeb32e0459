"""Hostile inputs for the readers (issue 14, items 9-13 and part of 16): every bad file is
built here from bytes; each case checks the exit code, that the message names the file (and
tensor), and that nothing was published."""

from __future__ import annotations

import json
import os
import shutil
import struct
import tracemalloc
from pathlib import Path

import gguf  # noqa: F401  (imported up front, so memory traced in the GGUF tests is the reader's own)
import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

import weightops.cli.core  # noqa: F401  (likewise: the inspect command's modules)
from weightops.errors import WeightopsError
from weightops.io.checkpoint import open_checkpoint

# --- helpers -------------------------------------------------------------------------------


def st_bytes(header: dict | list | str | bytes, data: bytes) -> bytes:
    """A safetensors file: 8-byte little-endian header length, header, data."""
    if isinstance(header, (dict, list)):
        header = json.dumps(header)
    if isinstance(header, str):
        header = header.encode()
    return struct.pack("<Q", len(header)) + header + data


def f32(shape: list, offsets: list, dtype: str = "F32") -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets}


def failed(r, *needles: str | Path) -> str:
    text = r.output if r.stderr is None else r.stderr
    assert r.exit_code == 1, (r.exit_code, r.output, r.exception)
    assert "Traceback" not in r.output
    for n in needles:
        assert str(n) in text, (str(n), text)
    return text


def nothing_published(out: Path) -> None:
    """No output and no temporary sibling of it."""
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir() if out.name in p.name] == []


def copy_model(src: Path, dst: Path, **config_changes) -> Path:
    shutil.copytree(src, dst)
    if config_changes:
        cfg = json.loads((dst / "config.json").read_text())
        cfg.update(config_changes)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def good_safetensors(path: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tensors = {"a": torch.randn(3, 4, generator=g), "b": torch.arange(5)}
    save_file(tensors, path)
    return tensors


# --- item 10: safetensors headers, with the library as the oracle ---------------------------

DUPLICATE = (
    '{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}'
)
MALFORMED = {  # case -> (file bytes, a tensor/key the message must name, what it must say)
    "negative offset": (st_bytes({"a": f32([1], [-4, 0])}, bytes(4)), "'a'", "non-negative"),
    "overlapping windows": (st_bytes({"a": f32([2], [0, 8]), "b": f32([2], [4, 12])}, bytes(12)), "'b'", "overlap"),
    "gap between windows": (st_bytes({"a": f32([1], [0, 4]), "b": f32([1], [8, 12])}, bytes(12)), "'b'", "gap"),
    "window not numel x itemsize": (st_bytes({"a": f32([3], [0, 8])}, bytes(8)), "'a'", "needs 12"),
    "duplicate names": (st_bytes(DUPLICATE, bytes(8)), "'a'", "twice"),
    "end before begin": (st_bytes({"a": f32([1], [0, 4]), "b": f32([0], [4, 2])}, bytes(4)), "'b'", "before it begins"),
    "header a list": (st_bytes([1, 2], b""), "header", "not an object"),
    "tensor info not an object": (st_bytes({"a": 5}, b""), "'a'", "not an object"),
    "unknown dtype": (st_bytes({"a": f32([1], [0, 4], "F33")}, bytes(4)), "'a'", "F33"),
    "shape of strings": (st_bytes({"a": f32(["1"], [0, 4])}, bytes(4)), "'a'", "shape"),
    "shape of floats": (st_bytes({"a": f32([1.0], [0, 4])}, bytes(4)), "'a'", "shape"),
    "three offsets": (st_bytes({"a": f32([1], [0, 4, 4])}, bytes(4)), "'a'", "data_offsets"),
    "metadata not strings": (
        st_bytes({"__metadata__": {"x": 1}, "a": f32([1], [0, 4])}, bytes(4)),
        "__metadata__",
        "strings",
    ),
    "NaN in header": (st_bytes('{"a":{"dtype":"F32","shape":[NaN],"data_offsets":[0,4]}}', bytes(4)), "header", "NaN"),
    "header not UTF-8": (
        st_bytes(b'{"\xff":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', bytes(4)),
        "header",
        "utf-8",
    ),
    "bytes after the data": (st_bytes({"a": f32([1], [0, 4])}, bytes(8)), "last tensor", "4 bytes after"),
    "truncated data": (st_bytes({"a": f32([2], [0, 8])}, bytes(4)), "a", "truncated"),
    "header length past the end": (struct.pack("<Q", 1000) + b"{}", "header length", "exceeds"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_safetensors_refused_like_the_library(cli, tmp_path, case):
    raw, name, says = MALFORMED[case]
    model = tmp_path / "m"
    model.mkdir()
    path = model / "model.safetensors"
    path.write_bytes(raw)
    with pytest.raises(SafetensorError):  # the oracle: the safetensors library rejects the same bytes
        safe_open(str(path), "pt")
    text = failed(cli("inspect", model), path, name, says)
    assert text.startswith("error: ")
    failed(cli("manifest", "create", model), path, name)
    assert not (model / "weightops-manifest.json").exists()
    out = tmp_path / "out.gguf"
    failed(cli("gguf", model, out), path)
    nothing_published(out)


def test_save_file_output_is_accepted_by_both(cli, tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    tensors = good_safetensors(model / "model.safetensors")
    with safe_open(str(model / "model.safetensors"), "pt") as f:
        assert sorted(f.keys()) == ["a", "b"]
    refs = {r.name: r.load() for r in open_checkpoint(model).tensors}
    assert all(torch.equal(refs[k], v) for k, v in tensors.items())
    r = cli("inspect", model, "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["tensor_count"] == 2


def test_identical_duplicate_key_is_refused_though_the_library_keeps_one(tmp_path):
    """The one deliberate difference: the library lets the last of two equal keys win."""
    path = tmp_path / "dup.safetensors"
    path.write_bytes(st_bytes(DUPLICATE.replace("[4,8]", "[0,4]"), bytes(4)))
    with safe_open(str(path), "pt") as f:
        assert list(f.keys()) == ["a"]
    with pytest.raises(WeightopsError, match="'a' twice"):
        open_checkpoint(path)


# --- item 16: complex tensors and config values of the wrong JSON type ---------------------


def test_complex_tensor_is_refused_not_cast(cli, tmp_path, tiny_llama):
    model = tmp_path / "c"
    model.mkdir()
    torch.save({"model.embed_tokens.weight": torch.zeros(4, 2, dtype=torch.complex64)}, model / "pytorch_model.bin")
    (model / "config.json").write_text((tiny_llama / "config.json").read_text())
    failed(cli("inspect", model), model / "pytorch_model.bin", "'model.embed_tokens.weight'", "complex64")
    out = tmp_path / "out"
    failed(cli("apply-delta", tiny_llama, model, out), model / "pytorch_model.bin", "complex64")
    nothing_published(out)
    (tmp_path / "c64").mkdir()
    (tmp_path / "c64" / "model.safetensors").write_bytes(st_bytes({"z": f32([1], [0, 8], "C64")}, bytes(8)))
    failed(cli("inspect", tmp_path / "c64"), "'z'", "C64")


@pytest.mark.parametrize(
    "key,value",
    [
        ("vocab_size", "400"),
        ("hidden_size", 64.0),
        ("num_attention_heads", 0),
        ("num_hidden_layers", True),
        ("rms_norm_eps", "1e-6"),
        ("tie_word_embeddings", "false"),
        ("model_type", 5),
    ],
)
def test_config_value_of_wrong_type_is_refused(cli, tmp_path, tiny_llama, key, value):
    model = copy_model(tiny_llama, tmp_path / "m", **{key: value})
    failed(cli("inspect", model), model / "config.json", key)
    out = tmp_path / "out.gguf"
    failed(cli("gguf", model, out), model / "config.json", key)
    nothing_published(out)


def test_config_that_is_not_an_object_is_refused(cli, tmp_path, tiny_llama):
    model = copy_model(tiny_llama, tmp_path / "m")
    (model / "config.json").write_text("[1, 2]")
    failed(cli("inspect", model), model / "config.json", "not a JSON object")


# --- item 13: a config that contradicts the tensors ---------------------------------------

CONTRADICTIONS = {  # tiny_llama: hidden 64, 4 heads x 16, 2 key/value heads, 2 layers, intermediate 128
    "heads": ({"num_attention_heads": 8, "head_dim": 16}, "q_proj"),
    "head_dim": ({"head_dim": 8}, "q_proj"),
    "kv heads": ({"num_key_value_heads": 4}, "k_proj"),
    "fewer layers": ({"num_hidden_layers": 1}, "gives 1 layers, but the tensors have 2"),
    "hidden size": ({"hidden_size": 32, "head_dim": 16}, "from hidden_size 32"),
    "intermediate size": ({"intermediate_size": 96}, "gate_proj"),
}


@pytest.mark.parametrize("case", sorted(CONTRADICTIONS))
def test_config_contradicting_tensors_is_refused_by_every_command(cli, tmp_path, tiny_llama, case):
    changes, says = CONTRADICTIONS[case]
    model = copy_model(tiny_llama, tmp_path / "m", **changes)
    config = model / "config.json"
    out = tmp_path / "out.gguf"
    failed(cli("gguf", model, out), config, says, "contradicts the tensors")
    nothing_published(out)
    out = tmp_path / "tp"
    failed(cli("convert", model, out, "--to", "tencentpretrain"), config, says)
    nothing_published(out)
    out = tmp_path / "bnb"
    failed(cli("bnb", model, out, "--bits", "8", "--device", "cpu"), config, says)
    nothing_published(out)


def test_bloom_config_contradiction_is_refused(cli, tmp_path, tiny_bloom):
    model = copy_model(tiny_bloom, tmp_path / "b", n_head=5)
    out = tmp_path / "out.gguf"
    failed(cli("gguf", model, out), model / "config.json", "not a multiple of n_head 5")
    nothing_published(out)


# --- item 9: index entries and symlinks that leave the model directory ---------------------


def _sharded(tmp_path: Path, index_name: str, entry: str) -> Path:
    model = tmp_path / "m"
    model.mkdir()
    (model / index_name).write_text(json.dumps({"metadata": {}, "weight_map": {"a": entry, "b": entry}}))
    return model


@pytest.mark.parametrize(
    "index_name,suffix",
    [
        ("model.safetensors.index.json", ".safetensors"),
        ("pytorch_model.bin.index.json", ".bin"),
        ("tencentpretrain_model.bin.index.json", ".bin"),
    ],
)
@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_index_entries_outside_the_directory_are_refused(cli, tmp_path, index_name, suffix, how):
    outside = tmp_path / f"outside{suffix}"
    if suffix == ".safetensors":
        good_safetensors(outside)
    else:
        torch.save({"a": torch.zeros(2), "b": torch.ones(2)}, outside)
    entry = {"dotdot": f"../outside{suffix}", "absolute": str(outside), "symlink": f"part-1{suffix}"}[how]
    model = _sharded(tmp_path, index_name, entry)
    if how == "symlink":
        (model / entry).symlink_to(outside)
    says = "outside" if how == "symlink" else {"dotdot": "'..'", "absolute": "absolute path"}[how]
    failed(cli("inspect", model), model / index_name, "entry 'a'", says)
    failed(cli("manifest", "create", model), says)
    assert not (model / "weightops-manifest.json").exists()


def test_symlinked_aux_file_out_of_the_directory_is_refused(cli, tmp_path, tiny_llama):
    model = copy_model(tiny_llama, tmp_path / "m")
    secret = tmp_path / "secret.json"
    secret.write_text('{"not": "a tokenizer"}')
    (model / "tokenizer.json").unlink()
    (model / "tokenizer.json").symlink_to(secret)
    failed(cli("inspect", model), model / "tokenizer.json", str(secret))
    out = tmp_path / "out"
    failed(cli("apply-delta", tiny_llama, model, out), "tokenizer.json", "outside")
    nothing_published(out)


def test_manifest_refuses_symlink_out_of_the_directory(cli, tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    good_safetensors(model / "model.safetensors")
    host = tmp_path / "hostname"
    host.write_text("secret-host\n")
    (model / "hostname").symlink_to(host)
    failed(cli("manifest", "create", model), model / "hostname", str(host), "outside")
    assert not (model / "weightops-manifest.json").exists()
    (model / "hostname").unlink()
    assert cli("manifest", "create", model).exit_code == 0
    manifest = (model / "weightops-manifest.json").read_bytes()
    (model / "hostname").symlink_to(host)  # a link that appears later is refused by check too
    failed(cli("manifest", "check", model), model / "hostname", str(host), "outside")
    assert (model / "weightops-manifest.json").read_bytes() == manifest
    (model / "nested").mkdir()
    (model / "nested" / "up").symlink_to(tmp_path, target_is_directory=True)
    (model / "hostname").unlink()
    failed(cli("manifest", "create", model), model / "nested" / "up", "outside")


def test_links_inside_the_directory_and_the_hub_cache_are_read(cli, tmp_path):
    """Links that stay inside are fine, and so is the Hugging Face hub cache layout, where
    snapshots/REV/FILE links to ../../blobs/HASH of the same repository folder."""
    repo = tmp_path / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    good_safetensors(repo / "blobs" / "f00d")
    (snapshot / "model.safetensors").symlink_to(Path("..") / ".." / "blobs" / "f00d")
    r = cli("inspect", snapshot, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["tensor_count"] == 2
    assert cli("manifest", "create", snapshot).exit_code == 0

    model = tmp_path / "plain"
    model.mkdir()
    good_safetensors(model / "weights.bin.real")
    os.symlink("weights.bin.real", model / "model.safetensors")
    assert cli("inspect", model).exit_code == 0
    assert cli("manifest", "create", model).exit_code == 0


# --- item 12: no tensors is not a model -----------------------------------------------------


def test_empty_weight_map_is_refused(cli, tmp_path, tiny_llama):
    model = _sharded(tmp_path, "model.safetensors.index.json", "x")
    (model / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {}}))
    (model / "config.json").write_text((tiny_llama / "config.json").read_text())
    index = model / "model.safetensors.index.json"
    failed(cli("inspect", model), index, "weight_map is empty")
    for args in (("apply-delta", tiny_llama, model), ("bnb", model)):
        out = tmp_path / "out"
        extra = ("--bits", "8") if args[0] == "bnb" else ()
        failed(cli(*args, out, *extra), index, "empty")
        nothing_published(out)


def test_checkpoint_of_zero_tensors_is_refused(cli, tmp_path, tiny_llama):
    model = tmp_path / "m"
    model.mkdir()
    (model / "model.safetensors").write_bytes(st_bytes({"__metadata__": {"format": "pt"}}, b""))
    (model / "config.json").write_text((tiny_llama / "config.json").read_text())
    with safe_open(str(model / "model.safetensors"), "pt") as f:  # valid to the library: an empty file
        assert list(f.keys()) == []
    failed(cli("inspect", model), model, "holds no tensors")
    out = tmp_path / "out"
    failed(cli("bnb", model, out, "--bits", "8"), "holds no tensors")
    nothing_published(out)


# --- item 11: GGUF headers bounded by the file size ----------------------------------------


def gguf_str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def gguf_bytes(
    kvs: list[bytes],
    tensors: list[tuple[str, list[int], int, int]],
    data: bytes = b"",
    n_kv: int | None = None,
    n_tensors: int | None = None,
) -> bytes:
    """Magic, version 3, counts, key/values (already encoded), tensor infos, padding to 32, data."""
    out = b"GGUF" + struct.pack(
        "<IQQ", 3, len(tensors) if n_tensors is None else n_tensors, len(kvs) if n_kv is None else n_kv
    )
    out += b"".join(kvs)
    for name, dims, ggml_type, offset in tensors:
        out += gguf_str(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        out += struct.pack("<IQ", ggml_type, offset)
    out += bytes(-len(out) % 32)
    return out + data


def kv_string(key: str, value: str) -> bytes:
    return gguf_str(key) + struct.pack("<I", 8) + gguf_str(value)


def kv_tokens(count: int, items: bytes = b"") -> bytes:
    return gguf_str("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, count) + items


EMB = ("token_embd.weight", [8, 4], 0, 0)  # F32, 4 rows of 8: 128 bytes
EMB_DATA = bytes(128)
BAD_GGUF = {
    "2^40 token strings in 100 bytes": (gguf_bytes([kv_tokens(2**40)], [EMB], EMB_DATA), "2^40"),
    "2^60 keys": (gguf_bytes([], [EMB], EMB_DATA, n_kv=2**60), "keys"),
    "2^50 tensor infos": (gguf_bytes([], [], b"", n_tensors=2**50), "tensor infos"),
    "string longer than the file": (
        gguf_bytes([kv_string("general.name", "x")[:-9] + struct.pack("<Q", 2**62)], []),
        "general.name",
    ),
    "duplicate key": (
        gguf_bytes([kv_string("general.name", "a"), kv_string("general.name", "b")], [EMB], EMB_DATA),
        "'general.name' appears twice",
    ),
    "unknown GGML type": (gguf_bytes([], [("token_embd.weight", [8, 4], 999, 0)], EMB_DATA), "'token_embd.weight'"),
    "data past the end": (gguf_bytes([], [EMB], EMB_DATA[:64]), "'token_embd.weight'"),
    "misplaced data offset": (
        gguf_bytes([], [("token_embd.weight", [8, 4], 0, 32)], EMB_DATA + bytes(32)),
        "'token_embd.weight'",
    ),
    "five dimensions": (gguf_bytes([], [("token_embd.weight", [2, 2, 2, 2, 2], 0, 0)], EMB_DATA), "5 dimensions"),
}


@pytest.mark.parametrize("case", sorted(BAD_GGUF))
def test_damaged_gguf_is_refused_within_its_size(cli, tmp_path, case):
    raw, says = BAD_GGUF[case]
    path = tmp_path / "bad.gguf"
    path.write_bytes(raw)
    says = says.replace("2^40", str(2**40))
    tracemalloc.start()
    try:
        failed(cli("inspect", path), path, says)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20 << 20, peak  # counts are checked before anything is allocated for them
    failed(cli("manifest", "create", path), path)
    assert not path.with_name(path.name + ".weightops-manifest.json").exists()


def test_many_token_strings_are_not_materialised(cli, tmp_path):
    """500k tokens (4.6 MB): GGUFReader would make a million numpy views (~800 MB); the
    reader keeps 8 bytes of offset per token and decodes only what is asked for."""
    count = 500_000
    items = b"".join(gguf_str(f"t{i % 10}") for i in range(count))
    path = tmp_path / "many.gguf"
    path.write_bytes(gguf_bytes([kv_string("general.architecture", "llama"), kv_tokens(count, items)], [EMB], EMB_DATA))
    tracemalloc.start()
    try:
        ckpt = open_checkpoint(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 40 << 20, peak
    tokens = ckpt.config["tokenizer.ggml.tokens"]
    assert len(tokens) == count and tokens[0] == "t0" and tokens[-1] == f"t{(count - 1) % 10}"
    r = cli("inspect", path, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["vocab"]["tokenizer"] == count
