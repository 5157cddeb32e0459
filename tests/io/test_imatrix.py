"""Importance-matrix files against llama.cpp's own code: libggml's GGUF writer driven as
llama-imatrix's save_imatrix drives it, llama-imatrix's --in-file combine path
(`llama_imatrix_combine`) and llama-quantize itself (`llama_quantize`), which must read our
files and quantize every tensor to the bytes libggml gives with `weights_for`'s weights."""

from __future__ import annotations

import ctypes
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from weightops import tiny
from weightops.errors import WeightopsError
from weightops.io.gguf_header import read_header
from weightops.io.imatrix import Entry, Imatrix, combine, read_imatrix, weights_for, write_imatrix

# ---------------------------------------------------------------------------------------------- helpers


def _data(seed: int = 0, names=("blk.0.attn_q.weight", "blk.0.ffn_down_exps.weight", "output.weight")) -> Imatrix:
    """A small imatrix: a dense entry, a 3-expert entry with an expert that saw no token, a
    one-column entry."""
    rng = np.random.default_rng(seed)
    shapes = {names[0]: (1, 64), names[1]: (3, 32), names[2]: (1, 1)}
    counts = {names[0]: [1024], names[1]: [10, 0, 7], names[2]: [3]}
    entries = {
        n: Entry((rng.random(shapes[n], dtype=np.float32) * 50).astype(np.float32), np.array(counts[n], np.float32))
        for n in names
    }
    return Imatrix(entries, ["wiki.train.raw", "more.txt"], 5, 512)


def _same(a: Imatrix, b: Imatrix) -> None:
    assert sorted(a.entries) == sorted(b.entries)
    for n, e in a.entries.items():
        np.testing.assert_array_equal(e.sums, b.entries[n].sums, err_msg=n)
        np.testing.assert_array_equal(e.counts, b.entries[n].counts, err_msg=n)
    assert (a.datasets, a.chunk_count, a.chunk_size, a.legacy) == (b.datasets, b.chunk_count, b.chunk_size, b.legacy)


def _ggml_save(path: Path, data: Imatrix) -> None:
    """llama-imatrix's save_imatrix, call for call, on libggml's own GGUF writer."""
    llama_cpp = pytest.importorskip("llama_cpp")
    lib = ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so"))

    class InitParams(ctypes.Structure):
        _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]

    p, s, u32 = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_uint32
    for fn, res, args in (
        ("ggml_init", p, [InitParams]),
        ("ggml_tensor_overhead", ctypes.c_size_t, []),
        ("ggml_new_tensor_2d", p, [p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]),
        ("ggml_set_name", p, [p, s]),
        ("ggml_get_data", p, [p]),
        ("gguf_init_empty", p, []),
        ("gguf_set_val_str", None, [p, s, s]),
        ("gguf_set_arr_str", None, [p, s, ctypes.POINTER(s), ctypes.c_size_t]),
        ("gguf_set_val_u32", None, [p, s, u32]),
        ("gguf_add_tensor", None, [p, p]),
        ("gguf_write_to_file", ctypes.c_bool, [p, s, ctypes.c_bool]),
        ("gguf_free", None, [p]),
        ("ggml_free", None, [p]),
    ):
        getattr(lib, fn).restype, getattr(lib, fn).argtypes = res, args
    size = sum(2 * lib.ggml_tensor_overhead() + 4 * (e.sums.size + e.counts.size) + 64 for e in data.entries.values())
    ctx = lib.ggml_init(InitParams(size, None, False))
    gguf = lib.gguf_init_empty()
    lib.gguf_set_val_str(gguf, b"general.type", b"imatrix")
    names = (s * max(1, len(data.datasets)))(*[d.encode() for d in data.datasets])
    lib.gguf_set_arr_str(gguf, b"imatrix.datasets", names, len(data.datasets))
    lib.gguf_set_val_u32(gguf, b"imatrix.chunk_count", data.chunk_count)
    lib.gguf_set_val_u32(gguf, b"imatrix.chunk_size", data.chunk_size)
    for name in sorted(data.entries):
        e = data.entries[name]
        n_mat = e.counts.size
        for suffix, values, ne0 in ((".in_sum2", e.sums, e.sums.size // n_mat), (".counts", e.counts, 1)):
            t = lib.ggml_new_tensor_2d(ctx, 0, ne0, n_mat)  # GGML_TYPE_F32
            lib.ggml_set_name(t, (name + suffix).encode())
            v = np.ascontiguousarray(values, np.float32)
            ctypes.memmove(lib.ggml_get_data(t), v.ctypes.data, v.nbytes)
            lib.gguf_add_tensor(gguf, t)
    assert lib.gguf_write_to_file(gguf, str(path).encode(), False)
    lib.gguf_free(gguf)
    lib.ggml_free(ctx)


def _dat_by_struct(
    path: Path, sums: dict[str, tuple[np.ndarray, list[int]]], chunk_size: int, chunks: int, dataset: str
):
    """save_imatrix_legacy written out with struct: per entry ncall = ceil(max count / chunk
    size), values (sum/count)*ncall (1*ncall for an expert with no token), then the trailer."""
    out = struct.pack("<i", len(sums))
    for name in sorted(sums):
        values, counts = sums[name]
        ncall = (max(counts) + chunk_size - 1) // chunk_size
        per = values.size // len(counts)
        stored = []
        for i, v in enumerate(values.reshape(-1).tolist()):
            c = counts[i // per]
            value, count = (np.float32(1), np.float32(1)) if c == 0 else (np.float32(v), np.float32(c))
            stored.append(np.float32(np.float32(value / count) * np.float32(ncall)))
        out += struct.pack("<i", len(name)) + name.encode() + struct.pack("<ii", ncall, len(stored))
        out += np.array(stored, "<f4").tobytes()
    out += struct.pack("<ii", chunks, len(dataset)) + dataset.encode()
    path.write_bytes(out)


# ---------------------------------------------------------------------------------------------- files


def test_gguf_is_byte_identical_to_llama_imatrix_save(tmp_path):
    for data in (_data(), Imatrix(_data(1).entries, [], 0, 256)):
        ours, theirs = tmp_path / f"ours{data.chunk_size}.gguf", tmp_path / f"c{data.chunk_size}.gguf"
        write_imatrix(data, ours)
        _ggml_save(theirs, data)
        assert ours.read_bytes() == theirs.read_bytes()
        _same(read_imatrix(theirs), data)


def _py_gguf(path: Path, data: Imatrix) -> Path:
    """save_imatrix's keys and tensors through another writer, gguf-py's GGUFWriter (which adds
    general.architecture and keeps unit dimensions)."""
    from gguf import GGUFWriter

    w = GGUFWriter(path, "llama")
    w.add_string("general.type", "imatrix")
    w.add_array("imatrix.datasets", data.datasets)
    w.add_uint32("imatrix.chunk_count", data.chunk_count)
    w.add_uint32("imatrix.chunk_size", data.chunk_size)
    for name in sorted(data.entries):
        e = data.entries[name]
        w.add_tensor(name + ".in_sum2", e.sums)
        w.add_tensor(name + ".counts", e.counts.reshape(-1, 1))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_reads_gguf_written_by_gguf_py(tmp_path):
    data = _data(2)
    _same(read_imatrix(_py_gguf(tmp_path / "py.gguf", data)), data)


def test_dat_round_trip_and_struct_written(tmp_path):
    data = _data(3)
    raw = {n: (e.sums, [int(c) for c in e.counts]) for n, e in data.entries.items()}
    theirs = tmp_path / "struct.dat"
    _dat_by_struct(theirs, raw, 512, data.chunk_count, data.datasets[-1])
    ours = tmp_path / "ours.dat"
    write_imatrix(data, ours, "dat")
    assert ours.read_bytes() == theirs.read_bytes()
    back = read_imatrix(theirs)
    assert back.legacy and back.chunk_count == 5 and back.datasets == ["more.txt"]
    assert back.entries["blk.0.ffn_down_exps.weight"].counts.tolist() == [1]  # ceil(10 / 512)
    again = tmp_path / "again.dat"
    write_imatrix(back, again, "dat")
    assert again.read_bytes() == theirs.read_bytes()
    # a legacy file without the optional trailer (llama.cpp reads it)
    bare = tmp_path / "bare.dat"
    bare.write_bytes(theirs.read_bytes()[: -(8 + len("more.txt"))])
    assert read_imatrix(bare).chunk_count == 0 and read_imatrix(bare).datasets == []


def test_round_trips(tmp_path):
    data = _data(4)
    write_imatrix(data, tmp_path / "a.gguf")
    _same(read_imatrix(tmp_path / "a.gguf"), data)
    write_imatrix(read_imatrix(tmp_path / "a.gguf"), tmp_path / "b.gguf")
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()


def test_write_never_replaces_a_foreign_file(tmp_path):
    theirs = tmp_path / "imatrix.gguf"
    theirs.write_bytes(b"not ours")
    with pytest.raises(WeightopsError, match="did not write"):
        write_imatrix(_data(), theirs)
    assert theirs.read_bytes() == b"not ours"
    ours = tmp_path / "ours.gguf"
    write_imatrix(_data(), ours)
    with pytest.raises(WeightopsError, match="--force"):
        write_imatrix(_data(5), ours)
    write_imatrix(_data(5), ours, force=True)
    _same(read_imatrix(ours), _data(5))


# ---------------------------------------------------------------------------------------------- combine


def test_combine_is_llama_imatrix_in_file(tmp_path, llama_imatrix_combine):
    a, b = _data(6), _data(7)
    # b's expert entry has one count (an old file): broadcast over a's experts, as llama.cpp does
    b_moe = b.entries["blk.0.ffn_down_exps.weight"]
    b.entries["blk.0.ffn_down_exps.weight"] = Entry(b_moe.sums.reshape(1, -1), np.array([40], np.float32))
    b.entries["blk.1.attn_k.weight"] = Entry(np.full((1, 8), 2.5, np.float32), np.array([2000], np.float32))
    legacy = tmp_path / "c.dat"
    _dat_by_struct(legacy, {"blk.0.attn_q.weight": (np.arange(64, dtype=np.float32), [700])}, 256, 3, "old.txt")
    files = [tmp_path / "b.gguf", tmp_path / "a.gguf", legacy]
    write_imatrix(b, files[0])
    write_imatrix(a, files[1])
    items = [read_imatrix(f) for f in files]
    for fmt in ("gguf", "dat"):
        for ctx in (512, 100):
            theirs = tmp_path / f"llama-{ctx}.{fmt}"
            llama_imatrix_combine(theirs, fmt, ctx, *files)
            ours = write_imatrix(combine(items, chunk_size=ctx), tmp_path / f"ours-{ctx}.{fmt}", fmt)
            assert ours.read_bytes() == theirs.read_bytes(), (fmt, ctx)


def test_combine_refuses_what_llama_imatrix_refuses(tmp_path, llama_imatrix_combine):
    a, b = _data(8), _data(9)
    b.entries["blk.0.attn_q.weight"] = Entry(np.ones((1, 32), np.float32), np.array([5], np.float32))
    write_imatrix(a, tmp_path / "a.gguf")
    write_imatrix(b, tmp_path / "b.gguf")
    assert llama_imatrix_combine(
        tmp_path / "x.gguf", "gguf", 512, tmp_path / "a.gguf", tmp_path / "b.gguf", check=False
    ).returncode
    with pytest.raises(WeightopsError, match=r"'blk\.0\.attn_q\.weight': 32 sums do not match 64"):
        combine([read_imatrix(tmp_path / "a.gguf"), read_imatrix(tmp_path / "b.gguf")])
    # 3 expert counts after 1 broadcast; 1 after 3 does not fit
    c = _data(8)
    c.entries["blk.0.ffn_down_exps.weight"].counts = np.array([9], np.float32)
    c.entries["blk.0.ffn_down_exps.weight"].sums = c.entries["blk.0.ffn_down_exps.weight"].sums.reshape(1, -1)
    write_imatrix(c, tmp_path / "c.gguf")
    assert llama_imatrix_combine(
        tmp_path / "y.gguf", "gguf", 512, tmp_path / "a.gguf", tmp_path / "c.gguf", check=False
    ).returncode
    with pytest.raises(WeightopsError, match="1 expert counts do not match 3"):
        combine([read_imatrix(tmp_path / "a.gguf"), read_imatrix(tmp_path / "c.gguf")])


# ---------------------------------------------------------------------------------------------- llama-quantize


@pytest.fixture(scope="module")
def f32_gguf(tmp_path_factory, spm_tokenizer) -> Path:
    """A one-layer LLaMA with 256-wide rows (so the K types apply), as an F32 GGUF."""
    from weightops.pipelines.gguf import export_gguf

    root = tmp_path_factory.mktemp("imatrix_model")
    model = tiny.tiny_llama(root / "hf", spm_tokenizer, layers=1, hidden=256, intermediate=256, dtype=torch.float32)
    return export_gguf(model, root / "f32.gguf", type="f32").output


def _imatrix_for(gguf: Path, seed: int = 0) -> Imatrix:
    """Entries for every blk.* matrix of `gguf` (what llama-imatrix hooks); the first one saw
    no token (weights 1.0)."""
    rng = np.random.default_rng(seed)
    entries = {}
    for i, t in enumerate(t for t in read_header(gguf).tensors if t.name.startswith("blk.") and len(t.shape) == 2):
        sums = (rng.random((1, t.shape[-1]), dtype=np.float32) ** 3 * 900).astype(np.float32)
        entries[t.name] = Entry(sums, np.array([0 if i == 0 else 1000 + 37 * i], np.float32))
    return Imatrix(entries, ["calibration.txt"], 2, 512)


@pytest.mark.parametrize("fmt", ["gguf", "dat"])
def test_llama_quantize_uses_our_file(tmp_path, f32_gguf, fmt, llama_quantize, libggml):
    data = _imatrix_for(f32_gguf)
    imatrix = write_imatrix(data, tmp_path / f"imatrix.{fmt}", fmt)
    read = read_imatrix(imatrix)
    # the .dat format leaves out an entry that saw no token; GGUF keeps it (weights 1.0)
    unseen = next(iter(data.entries))
    assert set(read.entries) == set(data.entries) - ({unseen} if fmt == "dat" else set())
    out = tmp_path / "q4_k_m.gguf"
    run = llama_quantize("--imatrix", imatrix, f32_gguf, out, "Q4_K_M", "1", env={"LLAMA_TRACE": "1"})
    log = run.stdout + run.stderr
    assert f"loaded {len(read.entries)} importance matrix entries from {imatrix} computed on 2 chunks" in log
    assert all(f"for '{name}'" in log for name in read.entries)  # LLAMA_TRACE: one line per entry loaded
    missing = {
        line.split("did not find weights for ")[1].strip()
        for line in log.splitlines()
        if "did not find weights" in line
    }
    assert missing == {"token_embd.weight", "output.weight"} | ({unseen} if fmt == "dat" else set())

    # every tensor: the bytes libggml gives for its F32 values with weights_for's weights
    f32 = read_header(f32_gguf)
    source = {t.name: t for t in f32.tensors}
    header = read_header(out)
    weighted = 0
    for t in header.tensors:
        if t.ggml_type.name == "F32":
            continue
        src = source[t.name]
        values = np.frombuffer(f32.map, np.float32, src.nbytes // 4, src.offset).reshape(src.shape)
        w = weights_for(read, t.name, src.shape[-1])
        weighted += w is not None
        expected = libggml(values, t.ggml_type.name.lower(), w)
        assert np.frombuffer(header.map, np.uint8, t.nbytes, t.offset).tobytes() == expected.tobytes(), t.name
    assert weighted == len(read.entries)
    meta = header.metadata
    assert meta["quantize.imatrix.file"] == str(imatrix)
    assert meta["quantize.imatrix.dataset"] == "calibration.txt"
    assert meta["quantize.imatrix.entries_count"] == len(read.entries)
    assert meta["quantize.imatrix.chunks_count"] == 2


def test_weights_for_sizes_as_llama_quantize(tmp_path, f32_gguf, llama_quantize):
    data = _imatrix_for(f32_gguf)
    name = next(iter(data.entries))
    data.entries["token_embd.weight"] = Entry(np.ones((1, 7), np.float32), np.array([3], np.float32))
    ok = write_imatrix(data, tmp_path / "embd.gguf")
    llama_quantize("--imatrix", ok, f32_gguf, tmp_path / "ok.gguf", "Q4_K_M", "1")  # tolerated for token_embd
    assert weights_for(read_imatrix(ok), "token_embd.weight", 256) is None
    data.entries[name] = Entry(np.ones((1, 128), np.float32), np.array([3], np.float32))
    bad = write_imatrix(data, tmp_path / "bad.gguf")
    run = llama_quantize("--imatrix", bad, f32_gguf, tmp_path / "bad-out.gguf", "Q4_K_M", "1", check=False)
    assert run.returncode and "imatrix size 128 is different from tensor size 256" in run.stdout + run.stderr
    with pytest.raises(WeightopsError, match=rf"'{name}': 128 weights, but the tensor has 256"):
        weights_for(read_imatrix(bad), name, 256)
    assert weights_for(read_imatrix(bad), "blk.9.attn_q.weight", 256) is None


# ---------------------------------------------------------------------------------------------- hostile files


def _gguf_with(tmp_path: Path, edit) -> Path:
    path = tmp_path / "hostile.gguf"
    _ggml_save(path, _data(10))
    blob = bytearray(path.read_bytes())
    path.write_bytes(bytes(edit(blob)))
    return path


def _replace(old: bytes, new: bytes):
    def edit(blob: bytearray) -> bytes:
        assert blob.count(old) == 1 and len(old) == len(new)
        return bytes(blob).replace(old, new)

    return edit


def _nan_sums(blob: bytearray) -> bytes:
    """output.weight's one sum (the file ends with its sums and its counts, each padded to 32)."""
    blob[-64:-60] = np.float32(np.nan).tobytes()
    return bytes(blob)


HOSTILE_GGUF = {
    # name: (edit, our message, does llama-quantize refuse it too)
    "truncated": (lambda b: bytes(b[:-40]), "truncated", True),
    "wrong general.type": (_replace(b"\x07" + bytes(7) + b"imatrix", b"\x07" + bytes(7) + b"adapter"), None, False),
    "missing metadata": (_replace(b"imatrix.chunk_size", b"imatrix.chunk_sizX"), "no imatrix.chunk_size", True),
    "sums without counts": (_replace(b"output.weight.counts", b"output.weight.countX"), "has sums but no counts", True),
    "chunk count not u32": (
        _replace(b"chunk_count\x04\x00\x00\x00", b"chunk_count\x05\x00\x00\x00"),
        "must be a uint32",
        True,
    ),
    "non-finite sums": (_nan_sums, "non-finite", True),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_GGUF))
def test_hostile_gguf_refused(tmp_path, case, f32_gguf, llama_quantize):
    edit, message, llama_refuses = HOSTILE_GGUF[case]
    path = _gguf_with(tmp_path, edit)
    with pytest.raises(WeightopsError) as e:
        read_imatrix(path)
    assert str(path) in str(e.value) and (message or "general.type") in str(e.value)
    if llama_refuses:
        run = llama_quantize("--imatrix", path, f32_gguf, tmp_path / "out.gguf", "Q4_K_M", "1", check=False)
        assert run.returncode != 0 and not (tmp_path / "out.gguf").exists()


def test_hostile_gguf_messages_name_the_tensor(tmp_path):
    path = _gguf_with(tmp_path, _nan_sums)
    with pytest.raises(WeightopsError, match=r"tensor 'output\.weight'.*non-finite"):
        read_imatrix(path)
    # sums that do not split into one row per expert count (llama.cpp would read them misaligned)
    data = _data(11)
    data.entries["blk.0.ffn_down_exps.weight"].counts = np.array([1, 2, 3, 4, 5], np.float32)
    bad = _py_gguf(tmp_path / "split.gguf", data)
    with pytest.raises(WeightopsError, match=r"'blk\.0\.ffn_down_exps\.weight': 96 sums do not split into 5"):
        read_imatrix(bad)


@pytest.mark.parametrize(
    "cut, message",
    [(3, "truncated"), (60, "truncated"), (-5, "truncated"), (-10, "truncated"), (20, "cannot fit")],
)
def test_hostile_dat_refused(tmp_path, cut, message):
    good = tmp_path / "good.dat"
    write_imatrix(_data(12), good, "dat")
    bad = tmp_path / "bad.dat"
    bad.write_bytes(good.read_bytes()[:cut])
    with pytest.raises(WeightopsError, match=message) as e:
        read_imatrix(bad)
    assert str(bad) in str(e.value)


def test_hostile_dat_values(tmp_path, f32_gguf, llama_quantize):
    nan = tmp_path / "nan.dat"
    _dat_by_struct(nan, {"blk.0.attn_q.weight": (np.array([1.0, np.nan] * 128, np.float32), [600])}, 512, 1, "t")
    with pytest.raises(WeightopsError, match=rf"{nan}: tensor 'blk\.0\.attn_q\.weight': values hold a non-finite"):
        read_imatrix(nan)
    run = llama_quantize("--imatrix", nan, f32_gguf, tmp_path / "out.gguf", "Q4_K_M", "1", check=False)
    assert run.returncode and "non-finite" in run.stdout + run.stderr
    garbage = tmp_path / "garbage.dat"
    garbage.write_bytes(b"\xff\xff\xff\x7fhello")
    with pytest.raises(WeightopsError, match="neither GGUF nor legacy"):
        read_imatrix(garbage)


@pytest.mark.parametrize(
    "entry, message",
    [
        (Entry(np.array([[1.0, np.inf]], np.float32), np.array([2], np.float32)), "non-finite"),
        (Entry(np.ones((2, 4), np.float32), np.array([2], np.float32)), "expected"),
        (Entry(np.ones((1, 4), np.float32), np.array([2.5], np.float32)), "whole numbers"),
        (Entry(-np.ones((1, 4), np.float32), np.array([2], np.float32)), "negative"),
    ],
)
def test_bad_data_writes_nothing(tmp_path, entry, message):
    data = _data(13)
    data.entries["blk.0.attn_v.weight"] = entry
    for fmt in ("gguf", "dat"):
        with pytest.raises(WeightopsError, match=rf"tensor 'blk\.0\.attn_v\.weight'.*{message}"):
            write_imatrix(data, tmp_path / f"x.{fmt}", fmt)
    assert list(tmp_path.iterdir()) == []
