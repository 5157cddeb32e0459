"""safetensors reader/writer and the HF directory layout."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from weightops.dtypes import name_of
from weightops.errors import WeightopsError
from weightops.io.checkpoint import open_checkpoint, save_hf
from weightops.io.hf import HFWeights
from weightops.io.index import parse_size, plan_shards
from weightops.io.outputs import MARKER
from weightops.io.safetensors import PlannedFile, read_safetensors, write_safetensors
from weightops.stream import TensorRef


def _refs(tensors: dict) -> list[TensorRef]:
    return [TensorRef(k, tuple(v.shape), name_of(v.dtype), "memory", loader=lambda v=v: v) for k, v in tensors.items()]


def test_writer_is_byte_identical_to_save_file(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "b.w": torch.randn(3, 5, generator=g).half(),
        "a.w": torch.randn(4, generator=g),
        "z": torch.randn(2, 2, generator=g).bfloat16(),
        "ids": torch.arange(7),
        "mask": torch.tensor([True, False]),
        "i8": torch.tensor([-3, 4], dtype=torch.int8),
        "empty": torch.zeros(0, 3),
        "scalar": torch.tensor(2.5),
    }
    save_file(tensors, tmp_path / "ref.safetensors", metadata={"format": "pt"})
    write_safetensors(_refs(tensors), tmp_path / "ours.safetensors", metadata={"format": "pt"})
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


@pytest.mark.parametrize("kernel_copy", [True, False])
def test_unchanged_tensors_are_copied_file_to_file(tmp_path, monkeypatch, kernel_copy):
    """A stream copy mixes kernel-copied tensors with computed ones and keeps the library's
    bytes; where copy_file_range fails, the tensors are loaded instead."""
    import os

    g = torch.Generator().manual_seed(1)
    tensors = {
        "a": torch.randn(300, 7, generator=g).bfloat16(),
        "b": torch.randn(5, generator=g),
        "c": torch.arange(11),
        "d": torch.randn(2, 3, generator=g).half(),
    }
    save_file(tensors, tmp_path / "src.safetensors")
    copies, loads = [], []
    real = os.copy_file_range

    def copy(*args):
        copies.append(args)
        if not kernel_copy:
            raise OSError(18, "Invalid cross-device link")
        return real(*args)

    monkeypatch.setattr(os, "copy_file_range", copy)
    refs = read_safetensors(tmp_path / "src.safetensors")
    refs = [r.derive(lambda t: t * 2) if r.name == "b" else r for r in refs]
    refs = [r.derive(lambda t: (loads.append(1), t)[1]) if r.name == "c" else r for r in refs]
    write_safetensors(refs, tmp_path / "out.safetensors")
    expected = dict(tensors, b=tensors["b"] * 2)
    save_file(expected, tmp_path / "ref.safetensors")
    assert (tmp_path / "out.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    assert len(copies) == 2 and loads == [1]  # a and d copied (or tried), b and c computed


def test_reader_is_lazy_and_exact(tmp_path):
    t = {"x": torch.randn(4, 4).bfloat16(), "y": torch.arange(3)}
    save_file(t, tmp_path / "m.safetensors")
    calls = []
    refs = read_safetensors(tmp_path / "m.safetensors")
    assert {r.name: (r.shape, r.dtype) for r in refs} == {"x": ((4, 4), torch.bfloat16), "y": ((3,), torch.int64)}
    for r in refs:
        calls.append(r.name)
        assert torch.equal(r.load(), t[r.name])
    assert sorted(calls) == ["x", "y"]


def test_parse_size_is_decimal():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("100KB") == 100_000
    assert parse_size("2MiB") == 2 * 2**20
    with pytest.raises(WeightopsError):
        parse_size("five gigs")


def test_plan_shards_matches_huggingface_hub_rule():
    sizes = [40, 30, 50, 200, 10, 10]
    refs = [TensorRef(f"t{i}", (s,), "U8", "m", loader=lambda: None) for i, s in enumerate(sizes)]
    plan = [[r.name for r in shard] for shard in plan_shards(refs, 100)]
    # t3 is larger than the limit: alone, emitted before the shard still being filled
    assert plan == [["t0", "t1"], ["t3"], ["t2", "t4", "t5"]]


def test_sharded_round_trip_loads_in_transformers(tmp_path, tiny_llama, load_all):
    from transformers import AutoModelForCausalLM

    src = open_checkpoint(tiny_llama)
    out = tmp_path / "sharded"
    save_hf(src.tensors, out, aux_files=src.aux_files, inputs=[tiny_llama], max_shard_size="60KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    n = len(shards)
    assert n > 2 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(r.nbytes for r in src.tensors)
    assert index["metadata"]["total_parameters"] == sum(r.numel for r in src.tensors)
    for shard in shards:  # every shard within the limit (no tensor here exceeds it)
        assert sum(v.numel() * v.element_size() for v in load_file(out / shard).values()) <= 60_000
    original, copied = load_all(tiny_llama), load_all(out)
    assert original.keys() == copied.keys()
    assert all(torch.equal(original[k], copied[k]) and original[k].dtype == copied[k].dtype for k in original)
    ids = torch.tensor([[1, 5, 9, 200]])
    a = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)(ids).logits
    b = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(ids).logits
    assert torch.equal(a, b)


def test_same_layout_as_save_pretrained(tmp_path, tiny_llama):
    """Given tensors in the model's state_dict order, our shards equal save_pretrained's."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "hf", max_shard_size="60KB")
    sd = model.state_dict()
    save_hf(_refs(sd), tmp_path / "ours", max_shard_size="60KB")
    ref_index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    our_index = json.loads((tmp_path / "ours" / "model.safetensors.index.json").read_text())
    assert our_index == ref_index
    for shard in sorted(set(ref_index["weight_map"].values())):
        assert (tmp_path / "ours" / shard).read_bytes() == (tmp_path / "hf" / shard).read_bytes()


@pytest.mark.parametrize("order", ["reverse", "random"])
def test_planned_file_takes_tensors_in_any_order(tmp_path, order):
    g = torch.Generator().manual_seed(2)
    tensors = {
        "b.w": torch.randn(3, 5, generator=g).half(),
        "a.w": torch.randn(4, generator=g),
        "z": torch.randn(2, 2, generator=g).bfloat16(),
        "ids": torch.arange(7),
        "empty": torch.zeros(0, 3),
        "i8": torch.tensor([-3, 4], dtype=torch.int8),
    }
    save_file(tensors, tmp_path / "ref.safetensors", metadata={"format": "pt"})
    refs = _refs(tensors)
    refs = refs[::-1] if order == "reverse" else [refs[i] for i in torch.randperm(len(refs), generator=g)]
    with PlannedFile(_refs(tensors), tmp_path / "ours.safetensors", metadata={"format": "pt"}) as out:
        for r in refs:
            out.put(r, r.load())
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


def test_planned_file_refuses_to_close_with_a_tensor_missing(tmp_path):
    tensors = {"a": torch.ones(3), "b": torch.zeros(2)}
    refs = _refs(tensors)
    with pytest.raises(WeightopsError, match="never written: b"), PlannedFile(refs, tmp_path / "x.safetensors") as out:
        out.put(refs[0], tensors["a"])


def test_hf_weights_in_any_order_are_save_pretrained_bytes(tmp_path, tiny_llama):
    """Every shard open at once, tensors put in reverse order: save_pretrained's shards and index."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "hf", max_shard_size="60KB")
    refs = _refs(model.state_dict())
    (tmp_path / "ours").mkdir()
    with HFWeights(refs, tmp_path / "ours", parse_size("60KB")) as weights:
        for r in reversed(refs):
            weights.put(r, r.load())
    ref_index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert json.loads((tmp_path / "ours" / "model.safetensors.index.json").read_text()) == ref_index
    written = {*ref_index["weight_map"].values(), "model.safetensors.index.json"}
    assert sorted(p.name for p in weights.paths) == sorted(written)
    for shard in sorted(set(ref_index["weight_map"].values())):
        assert (tmp_path / "ours" / shard).read_bytes() == (tmp_path / "hf" / shard).read_bytes()


def test_single_shard_is_model_safetensors(tmp_path, tiny_bloom):
    src = open_checkpoint(tiny_bloom)
    save_hf(src.tensors, tmp_path / "o", aux_files=src.aux_files)
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == sorted(
        [MARKER, "model.safetensors", *(f.name for f in src.aux_files)]
    )


def test_truncated_shard_is_named(tmp_path, tiny_llama):
    src = open_checkpoint(tiny_llama)
    save_hf(src.tensors, tmp_path / "m", aux_files=src.aux_files, max_shard_size="60KB")
    shard = sorted((tmp_path / "m").glob("model-*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[:-100])
    with pytest.raises(WeightopsError, match=rf"{shard.name}.*truncated.*model\.layers"):
        open_checkpoint(tmp_path / "m")


def test_missing_shard_and_index_disagreements(tmp_path, tiny_llama):
    src = open_checkpoint(tiny_llama)
    out = tmp_path / "m"
    save_hf(src.tensors, out, max_shard_size="60KB")
    index_path = out / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())

    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = shards[0]
    index_path.write_text(json.dumps(index))
    with pytest.raises(WeightopsError, match=r"model\.layers\.9\.mlp\.up_proj\.weight.*does not contain it"):
        open_checkpoint(out)

    del index["weight_map"]["model.layers.9.mlp.up_proj.weight"]
    dropped = "model.layers.0.mlp.up_proj.weight"
    shard = index["weight_map"].pop(dropped)
    index_path.write_text(json.dumps(index))
    with pytest.raises(WeightopsError, match=rf"{shard}.*{dropped}.*does not list"):
        open_checkpoint(out)
    alone = index["weight_map"].pop("lm_head.weight")  # the only tensor of its shard
    index_path.write_text(json.dumps(index))
    with pytest.raises(WeightopsError, match=rf"{alone} is not named by the index"):
        open_checkpoint(out)
    index["weight_map"]["lm_head.weight"] = alone

    index["weight_map"][dropped] = shard
    index_path.write_text(json.dumps(index))
    (out / shards[2]).unlink()
    with pytest.raises(WeightopsError, match=rf"shard files that do not exist: {shards[2]}"):
        open_checkpoint(out)


def test_dtype_names_match_torch_and_safetensors():
    from safetensors.torch import _TYPES  # the library's own name -> torch dtype table

    from weightops import dtypes

    for name, torch_dtype in _TYPES.items():
        if name not in dtypes.SAFETENSORS_NAMES:
            continue  # complex and FNUZ float8: no LLM checkpoint of ours holds them
        assert dtypes.to_torch(name) == torch_dtype and name_of(torch_dtype) == name
        assert dtypes.itemsize(name) == torch_dtype.itemsize
        assert dtypes.is_float(name) == torch_dtype.is_floating_point
    assert name_of(torch.complex64) == "torch.complex64" and dtypes.to_torch("torch.complex64") == torch.complex64
    with pytest.raises(TypeError, match="dtype_name"):
        TensorRef("t", (1,), torch.float32, "m", loader=lambda: None)


def test_pass_through_copy_never_imports_torch(tmp_path, tiny_llama):
    """Opening a safetensors checkpoint and copying it needs headers and the kernel's file
    copy only; importing torch would cost more than `cp` of a 1 GB model (issue 2)."""
    import subprocess
    import sys

    code = (
        "import sys; from weightops.io.checkpoint import open_checkpoint, save_hf; c = open_checkpoint(sys.argv[1]); "
        "save_hf(c.tensors, sys.argv[2], aux_files=c.aux_files, inputs=[c.path]); "
        "print(sorted(m for m in ('torch', 'numpy', 'gguf', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tiny_llama), str(tmp_path / "copy")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
    for f in tiny_llama.glob("*.safetensors"):
        assert (tmp_path / "copy" / f.name).read_bytes() == f.read_bytes()
