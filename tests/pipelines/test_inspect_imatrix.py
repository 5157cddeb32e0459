"""`weightops inspect IMATRIX [--model MODEL]`: an importance matrix's summary and its coverage of
a model, the model's weight names taken from the GGUF file weightops writes for it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from weightops.io.gguf_header import read_header
from weightops.io.imatrix import Entry, Imatrix, write_imatrix


@pytest.fixture(scope="module")
def llama_gguf(tmp_path_factory, tiny_llama):
    from weightops.pipelines.gguf import export_gguf

    return export_gguf(tiny_llama, tmp_path_factory.mktemp("inspect_imatrix") / "f32.gguf", type="f32").output


def _covering(gguf, tmp_path, fmt="gguf"):
    """An imatrix for the model's blk.* matrices, less one; one with 100 tokens, one of the
    wrong size, plus an entry the model does not have."""
    names = [t for t in read_header(gguf).tensors if t.name.startswith("blk.") and len(t.shape) == 2]
    entries = {t.name: Entry(np.ones((1, t.shape[-1]), np.float32), np.array([2048], np.float32)) for t in names}
    missing, few, wrong = names[0].name, names[1].name, names[2].name
    del entries[missing]
    entries[few].counts = np.array([100], np.float32)
    entries[wrong] = Entry(np.ones((1, 3), np.float32), np.array([2048], np.float32))
    entries["blk.9.attn_q.weight"] = Entry(np.ones((1, 64), np.float32), np.array([2048], np.float32))
    path = write_imatrix(Imatrix(entries, ["wiki.txt"], 4, 512), tmp_path / f"imatrix.{fmt}", fmt)
    return path, missing, few, wrong, len(names)


def test_summary(cli, tmp_path, llama_gguf):
    path, *_ = _covering(llama_gguf, tmp_path)
    r = cli("inspect", path, "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert (doc["format"], doc["chunk_count"], doc["chunk_size"]) == ("imatrix-gguf", 4, 512)
    assert doc["datasets"] == ["wiki.txt"]
    assert (doc["count_min"], doc["count_median"], doc["count_max"], doc["counted"]) == (100, 2048, 2048, "tokens")
    dat, *_ = _covering(llama_gguf, tmp_path, "dat")
    doc = json.loads(cli("inspect", dat, "--json").stdout)
    assert (doc["format"], doc["counted"], doc["count_max"]) == ("imatrix-dat", "calls", 4)  # ceil(2048 / 512)


@pytest.mark.parametrize("model", ["gguf", "hf"])
def test_coverage(cli, tmp_path, llama_gguf, tiny_llama, model):
    path, missing, few, wrong, hooked = _covering(llama_gguf, tmp_path)
    r = cli("inspect", path, "--model", llama_gguf if model == "gguf" else tiny_llama, "--json")
    assert r.exit_code == 0, r.output
    cov = json.loads(r.stdout)["coverage"]
    assert cov["hooked"] == hooked
    assert cov["missing"] == [missing]
    assert cov["few_tokens"] == [few]
    assert cov["size_mismatch"] == [{"tensor": wrong, "imatrix": 3, "model": 64}]
    assert cov["not_in_model"] == ["blk.9.attn_q.weight"]
    text = cli("inspect", path, "--model", llama_gguf).stdout
    assert f"no entry      1: {missing}" in text and f"size mismatch {wrong}: imatrix 3, model 64" in text


def test_model_file_is_not_an_imatrix(cli, llama_gguf, tiny_llama):
    r = cli("inspect", llama_gguf, "--model", tiny_llama)
    assert r.exit_code == 1 and "not an importance matrix" in r.stderr and str(llama_gguf) in r.stderr
