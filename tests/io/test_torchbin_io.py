"""PyTorch .bin reading (never unpickling code) and the streaming torch.save writer."""

import collections
import json
import os
import pickle

import pytest
import torch

from weightops.dtypes import name_of
from weightops.errors import WeightopsError
from weightops.io.checkpoint import open_checkpoint
from weightops.io.torchbin import read_torch_bin, write_torch_bin
from weightops.stream import TensorRef


def _refs(sd):
    return [TensorRef(k, tuple(v.shape), name_of(v.dtype), "memory", loader=lambda v=v: v) for k, v in sd.items()]


def test_writer_equals_torch_save(tmp_path):
    g = torch.Generator().manual_seed(0)
    sd = collections.OrderedDict(
        [
            ("a", torch.randn(3, 4, generator=g).bfloat16()),
            ("b", torch.arange(5)),
            ("c", torch.randn(2, 2, 2, generator=g)),
            ("s", torch.tensor(3.0)),
            ("h", torch.randn(7, generator=g).half()),
            ("e", torch.zeros(0, 4)),
        ]
    )
    with open(tmp_path / "ref.bin", "wb") as f:  # a stream, so the archive name is the default one
        torch.save(sd, f)
    write_torch_bin(_refs(sd), tmp_path / "ours.bin")
    assert (tmp_path / "ours.bin").read_bytes() == (tmp_path / "ref.bin").read_bytes()


def test_views_are_written_as_their_own_data(tmp_path):
    base = torch.arange(10.0)
    write_torch_bin(_refs({"v": base[2:5], "t": base.reshape(2, 5).t()}), tmp_path / "x.bin")
    back = {r.name: r.load() for r in read_torch_bin(tmp_path / "x.bin")}
    assert torch.equal(back["v"], base[2:5]) and torch.equal(back["t"], base.reshape(2, 5).t())


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_code_running_pickle_is_refused_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    evil = _Evil()
    evil.marker = marker
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.zeros(2), "payload": evil}, path)
    with pytest.raises(WeightopsError, match=r"pytorch_model\.bin: refusing to unpickle"):
        open_checkpoint(path)
    assert not marker.exists()


def test_legacy_pickle_of_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = _Evil()
    evil.marker = marker
    path = tmp_path / "model.bin"
    path.write_bytes(pickle.dumps({"w": evil}))  # a bare pickle, not a torch zip archive
    with pytest.raises(WeightopsError, match="model.bin"):
        open_checkpoint(path)
    assert not marker.exists()


def test_sharded_bin_round_trip(tmp_path, tiny_llama, load_all):
    original = load_all(tiny_llama)
    names = sorted(original)
    out = tmp_path / "bin"
    out.mkdir()
    half = len(names) // 2
    parts = {"pytorch_model-00001-of-00002.bin": names[:half], "pytorch_model-00002-of-00002.bin": names[half:]}
    for fname, keys in parts.items():
        write_torch_bin(_refs({k: original[k] for k in keys}), out / fname)
    (out / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": {k: f for f, ks in parts.items() for k in ks}})
    )
    ckpt = open_checkpoint(out)
    assert ckpt.format == "hf-bin"
    loaded = {r.name: r.load() for r in ckpt.tensors}
    assert loaded.keys() == original.keys()
    assert all(torch.equal(loaded[k], original[k]) for k in original)
