"""`weightops gguf --split-max-size / --split-max-tensors`: split sets of a tiny LLaMA.

Oracles: llama.cpp's own gguf-py `GGUFWriter` (the writer convert_hf_to_gguf.py splits with, from
the pinned source tree) given the same tensors and metadata; llama.cpp loading the set (through
its first file, and through `llama_model_load_from_splits`) with the logits of the single file.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from weightops.io.gguf_split import SET_XATTR
from weightops.io.outputs import XATTR

REPO = Path(__file__).resolve().parents[2]
IDS = [1, 15, 27, 203, 88, 301, 42, 7, 399, 120]

# gguf-py's GGUFWriter rewriting our single file as a split set: every key (in file order, with
# its type) and every tensor's stored bytes, in file order.
REFERENCE = r"""
import sys
from pathlib import Path
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/gguf-py"]
import numpy as np
import gguf
assert Path(gguf.__file__).is_relative_to(sys.argv[1]), gguf.__file__
from convert_hf_to_gguf import split_str_to_n_bytes

src, out, max_tensors, max_size = sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
r = gguf.GGUFReader(src)
arch = r.fields["general.architecture"].contents()
w = gguf.GGUFWriter(out, arch, split_max_tensors=max_tensors, split_max_size=split_str_to_n_bytes(max_size))
for key, field in r.fields.items():
    if key.startswith("GGUF.") or key == "general.architecture":
        continue
    vtype = field.types[0]
    sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
    w.add_key_value(key, field.contents(), vtype, sub)
for t in r.tensors:
    w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
w.write_header_to_file()
w.write_kv_data_to_file()
w.write_tensors_to_file()
w.close()
"""


def _gguf(cli, model: Path, out: Path, *args: str) -> list[Path]:
    r = cli("gguf", model, out, *args)
    assert r.exit_code == 0, r.output
    return sorted(p for p in out.parent.iterdir() if p.suffix == ".gguf")


def _reference(llama_cpp_source: Path, single: Path, out: Path, max_tensors: int, max_size: str) -> list[Path]:
    out.parent.mkdir(parents=True)
    done = subprocess.run(
        [sys.executable, "-c", REFERENCE, str(llama_cpp_source), str(single), str(out), str(max_tensors), max_size],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return sorted(out.parent.iterdir())


@pytest.fixture(scope="module")
def single(tmp_path_factory, tiny_llama) -> Path:
    out = tmp_path_factory.mktemp("single") / "m.gguf"
    from click.testing import CliRunner

    from weightops.cli import main

    r = CliRunner().invoke(main, ["gguf", str(tiny_llama), str(out), "--type", "f16"])
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="module")
def split_set(tmp_path_factory, tiny_llama) -> list[Path]:
    """The tiny LLaMA's 21 tensors in files of at most 5: 5, 5, 5, 5, 1."""
    from click.testing import CliRunner

    from weightops.cli import main

    out = tmp_path_factory.mktemp("set") / "m.gguf"
    r = CliRunner().invoke(main, ["gguf", str(tiny_llama), str(out), "--type", "f16", "--split-max-tensors", "5"])
    assert r.exit_code == 0, r.output
    return sorted(out.parent.iterdir())


@pytest.mark.parametrize(
    "type_, option, value, max_tensors, max_size",
    [
        ("f16", "--split-max-tensors", "5", 5, "0"),
        ("f16", "--split-max-size", "60K", 0, "60K"),
        ("q4_k_m", "--split-max-size", "25000", 0, "25000"),
        ("q8_0", "--split-max-tensors", "1", 1, "0"),
    ],
)
def test_split_set_is_gguf_writers_layout(
    type_, option, value, max_tensors, max_size, cli, tiny_llama, llama_cpp_source, tmp_path
):
    """Byte for byte the files GGUFWriter (convert_hf_to_gguf.py --split-max-*) writes from the same
    tensors and metadata: names, which tensors each file holds, split keys and their order,
    per-file offsets and padding."""
    (whole,) = _gguf(cli, tiny_llama, tmp_path / "one" / "m.gguf", "--type", type_)
    ours = _gguf(cli, tiny_llama, tmp_path / "ours" / "m.gguf", "--type", type_, option, value)
    theirs = _reference(llama_cpp_source, whole, tmp_path / "theirs" / "m.gguf", max_tensors, max_size)
    assert len(ours) > 1
    assert [p.name for p in ours] == [p.name for p in theirs]
    for a, b in zip(ours, theirs, strict=True):
        assert a.read_bytes() == b.read_bytes(), a.name


def test_split_keys_and_names(split_set):
    from gguf import GGUFReader

    assert [p.name for p in split_set] == [f"m-{i:05d}-of-00005.gguf" for i in range(1, 6)]
    counts = []
    for i, p in enumerate(split_set):
        r = GGUFReader(p)
        keys = [k for k in r.fields if not k.startswith("GGUF.")]
        split = {k: r.fields[k].contents() for k in keys if k.startswith("split.")}
        assert split == {"split.no": i, "split.count": 5, "split.tensors.count": 21}
        assert keys[-3:] == ["split.no", "split.count", "split.tensors.count"]
        assert (len(keys) > 3) == (i == 0)  # the other files carry only the split keys
        counts.append(len(r.tensors))
    assert counts == [5, 5, 5, 5, 1]
    assert len({os.getxattr(p, SET_XATTR) for p in split_set}) == 1 and all(os.getxattr(p, XATTR) for p in split_set)


def _from_splits_logits(paths: list[Path], ids: list[int]) -> np.ndarray:
    """The last position's logits of a model loaded with llama_model_load_from_splits (ctypes)."""
    import llama_cpp as lc

    lc.llama_backend_init()
    params = lc.llama_model_default_params()
    params.n_gpu_layers = 0
    arr = (ctypes.c_char_p * len(paths))(*[str(p).encode() for p in paths])
    model = lc.llama_model_load_from_splits(arr, len(paths), params)
    assert model, "llama_model_load_from_splits failed"
    cparams = lc.llama_context_default_params()
    cparams.n_ctx, cparams.n_batch, cparams.n_threads, cparams.n_threads_batch = 64, 64, 2, 2
    cparams.type_k = cparams.type_v = 0  # F32 KV cache, as llama_cpp_run
    cparams.flash_attn_type = 0  # disabled
    ctx = lc.llama_init_from_model(model, cparams)
    try:
        tokens = (lc.llama_token * len(ids))(*ids)
        assert lc.llama_decode(ctx, lc.llama_batch_get_one(tokens, len(ids))) == 0
        n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(model))
        return np.ctypeslib.as_array(lc.llama_get_logits_ith(ctx, -1), shape=(n_vocab,)).copy()
    finally:
        lc.llama_free(ctx)
        lc.llama_model_free(model)


def test_llama_cpp_loads_the_set_with_the_single_files_logits(split_set, single, llama_cpp_run):
    whole, llm = llama_cpp_run(single, IDS)
    llm.close()
    got, llm = llama_cpp_run(split_set[0], IDS)  # llama.cpp finds the other files by name
    llm.close()
    np.testing.assert_array_equal(got, whole)
    by_list = _from_splits_logits(split_set, IDS)
    np.testing.assert_array_equal(by_list, _from_splits_logits([single], IDS))  # the same route, one file
    np.testing.assert_allclose(by_list, whole[-1], atol=1e-4)


def test_inspect_verify_manifest_take_the_set(split_set, single, cli, tmp_path):
    r = cli("inspect", split_set[0], "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["files"] == [str(p) for p in split_set] and doc["tensor_count"] == 21
    assert doc["vocab"] == json.loads(cli("inspect", single, "--json").stdout)["vocab"]
    r = cli("verify", single, split_set[0], "--device", "cpu", "--json", tmp_path / "v.json")
    assert r.exit_code == 0, r.output
    v = json.loads((tmp_path / "v.json").read_text())
    assert v["kld_max"] == 0 and v["top1_agreement"] == 1 and v["max_abs_logit_diff"] == 0

    copy = tmp_path / "copy"
    copy.mkdir()
    for p in split_set:
        shutil.copy(p, copy / p.name)
    first = copy / split_set[0].name
    assert cli("manifest", "create", first).exit_code == 0
    doc = json.loads((copy / (first.name + ".weightops-manifest.json")).read_text())
    assert sorted(doc["files"]) == [p.name for p in split_set] and len(doc["tensors"]) == 21
    assert doc["tensors"]["output.weight"]["file"] == split_set[-1].name
    assert cli("manifest", "check", first).exit_code == 0
    third = copy / split_set[2].name
    data = bytearray(third.read_bytes())
    data[-1] ^= 1
    third.write_bytes(bytes(data))
    r = cli("manifest", "check", first)
    assert r.exit_code == 3 and f"file {third.name}: sha256" in r.output
    (copy / split_set[3].name).unlink()
    r = cli("manifest", "check", first)
    assert r.exit_code == 3 and f"file {split_set[3].name}: missing" in r.output, r.output
    assert "1 of its 5 files missing" in r.output and f"file {split_set[4].name}: missing" not in r.output


def test_a_later_split_or_a_missing_file_is_refused(split_set, cli, tmp_path):
    r = cli("inspect", split_set[1])
    assert r.exit_code == 1 and f"open the first one: {split_set[0]}" in r.output
    for p in split_set:
        if p != split_set[3]:
            shutil.copy2(p, tmp_path / p.name)
    for args in (("inspect", tmp_path / split_set[0].name), ("verify", tmp_path / split_set[0].name, split_set[0])):
        r = cli(*args)
        assert r.exit_code == 1 and f"1 of its 5 files missing: {tmp_path / split_set[3].name}" in r.output


def test_a_file_of_another_run_is_refused(split_set, cli, tiny_llama, tmp_path):
    """Another run with the same layout (F32: same names, same tensors per file): its file copied
    with its attributes is refused by the set id; the structural checks catch the rest (see the
    io tests)."""
    other = _gguf(cli, tiny_llama, tmp_path / "other" / "m.gguf", "--type", "f32", "--split-max-tensors", "5")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for p in split_set:
        shutil.copy2(p, mixed / p.name)
    shutil.copy2(other[2], mixed / other[2].name)
    for args in (("inspect", mixed / other[0].name), ("manifest", "create", mixed / other[0].name)):
        r = cli(*args)
        assert r.exit_code == 1 and f"{mixed / other[2].name}: written by another weightops run" in r.output


# ---------------------------------------------------------------------------------------------- publication


def _slot(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_force_replaces_the_whole_previous_set(cli, tiny_llama, tmp_path):
    out = tmp_path / "m.gguf"
    _gguf(cli, tiny_llama, out, "--split-max-tensors", "5")
    r = cli("gguf", tiny_llama, out, "--split-max-tensors", "8")
    assert r.exit_code == 1 and "pass --force" in r.output and "m-00001-of-00005.gguf" in r.output
    r = cli("gguf", tiny_llama, out, "--split-max-tensors", "8", "--force")
    assert r.exit_code == 0, r.output
    assert "removed the previous one (5 files" in r.stderr
    assert _slot(tmp_path) == [f"m-{i:05d}-of-00003.gguf" for i in (1, 2, 3)]
    r = cli("gguf", tiny_llama, out, "--force")  # a single file replaces the set of its name
    assert r.exit_code == 0 and _slot(tmp_path) == ["m.gguf"]


def test_a_foreign_file_in_the_slot_is_never_replaced(cli, tiny_llama, tmp_path):
    out = tmp_path / "m.gguf"
    (tmp_path / "m-00002-of-00003.gguf").write_bytes(b"not ours")
    r = cli("gguf", tiny_llama, out, "--split-max-tensors", "8", "--force")
    assert r.exit_code == 1 and "m-00002-of-00003.gguf is a file weightops did not write" in r.output
    r = cli("gguf", tiny_llama, out)  # one file: the other set is not in its way, and stays
    assert r.exit_code == 0, r.output
    assert _slot(tmp_path) == ["m-00002-of-00003.gguf", "m.gguf"]


def test_an_error_mid_write_publishes_nothing_and_keeps_the_old_set(tiny_llama, tmp_path, monkeypatch):
    from weightops.errors import WeightopsError
    from weightops.pipelines import gguf as pipeline

    out = tmp_path / "m.gguf"
    pipeline.export_gguf(tiny_llama, out, split_max_tensors=5)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    encode, calls = pipeline.encode, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 12:  # in the third file
            raise OSError(28, "No space left on device")
        return encode(*args, **kwargs)

    monkeypatch.setattr(pipeline, "encode", failing)
    with pytest.raises(WeightopsError, match="No space left on device"):
        pipeline.export_gguf(tiny_llama, out, split_max_tensors=8, type="q8_0", force=True)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


KILLED = r"""
import os, signal, sys
from weightops.pipelines import gguf as pipeline
encode, calls = pipeline.encode, []
def dying(*args, **kwargs):
    calls.append(1)
    if len(calls) == 12:
        os.kill(os.getpid(), signal.SIGKILL)
    return encode(*args, **kwargs)
pipeline.encode = dying
pipeline.export_gguf(sys.argv[1], sys.argv[2], split_max_tensors=5)
"""


def test_a_killed_run_leaves_no_set_and_the_next_run_sweeps_it(tiny_llama, tmp_path):
    out = tmp_path / "m.gguf"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", KILLED, str(tiny_llama), str(out)], env=env, capture_output=True)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    (temp,) = _slot(tmp_path)  # only the temporary directory: no file of the set
    assert temp.startswith(".m.gguf.weightops-tmp-") and len(list((tmp_path / temp).iterdir())) == 5
    r = subprocess.run(
        [sys.executable, "-m", "weightops", "gguf", str(tiny_llama), str(out), "--split-max-tensors", "5"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert f"removing a temporary left by an interrupted run: {tmp_path / temp}" in r.stderr
    assert _slot(tmp_path) == [f"m-{i:05d}-of-00005.gguf" for i in range(1, 6)]


def test_a_model_under_the_limit_is_one_file_without_split_keys(cli, tiny_llama, single, tmp_path):
    """As GGUFWriter does: the file of the unsplit run, at OUTPUT."""
    assert _gguf(cli, tiny_llama, tmp_path / "m.gguf", "--type", "f16", "--split-max-size", "1G") == [
        tmp_path / "m.gguf"
    ]
    assert (tmp_path / "m.gguf").read_bytes() == single.read_bytes()
