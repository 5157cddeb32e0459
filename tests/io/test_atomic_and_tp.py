"""Atomic publication, output safety checks, TencentPretrain layout, GGUF reading."""

import warnings

import numpy as np
import pytest
import torch

from weightops.dtypes import name_of
from weightops.errors import WeightopsError
from weightops.io.checkpoint import open_checkpoint, save_hf
from weightops.io.outputs import MARKER, Output
from weightops.io.tencentpretrain import write_tp
from weightops.stream import TensorRef


def test_existing_output_needs_force_and_must_be_ours(tmp_path, tiny_bloom):
    src = open_checkpoint(tiny_bloom)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    for force in (False, True):  # not written by weightops: refused, --force or not
        with pytest.raises(WeightopsError, match="did not write"):
            save_hf(src.tensors, out, inputs=[tiny_bloom], force=force)
    assert (out / "keep.txt").read_text() == "x"
    (out / "keep.txt").unlink()
    save_hf(src.tensors, out, inputs=[tiny_bloom])  # an empty directory is fine
    with pytest.raises(WeightopsError, match="pass --force"):
        save_hf(src.tensors, out, inputs=[tiny_bloom])
    assert save_hf(src.tensors, out, inputs=[tiny_bloom], force=True) == [out / "model.safetensors"]
    assert (out / MARKER).is_file()


def test_output_inside_input_refused(tmp_path, tiny_bloom):
    for bad in (tiny_bloom, tiny_bloom / "sub", tiny_bloom.parent):
        with pytest.raises(WeightopsError, match="is the input|is inside the input|lies inside the output"):
            Output(bad, [tiny_bloom], kind="dir", force=True)


def test_interrupted_writer_leaves_nothing(tmp_path, tiny_llama):
    src = open_checkpoint(tiny_llama)

    def boom():
        raise RuntimeError("disk on fire")

    refs = list(src.tensors)
    refs[5] = TensorRef(refs[5].name, refs[5].shape, refs[5].dtype_name, "x", loader=boom)
    message = rf"^x: tensor '{refs[5].name}': cannot load it: RuntimeError: disk on fire"
    with pytest.raises(WeightopsError, match=message):
        save_hf(refs, tmp_path / "out", max_shard_size="60KB")
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_replaces_only_on_success(tmp_path):
    final = tmp_path / "final"
    with Output(final, kind="dir").writing() as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(KeyError):
        with Output(final, kind="dir", force=True).writing() as tmp:
            (tmp / "a").write_text("2")
            raise KeyError("stop")
    assert (final / "a").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


@pytest.mark.parametrize("shard", [None, 20_000])
def test_tencentpretrain_layout_round_trip(tmp_path, shard):
    g = torch.Generator().manual_seed(0)
    names = [
        "embedding.word.embedding.weight",
        "encoder.transformer.0.layer_norm_1.weight",
        "encoder.transformer.0.self_attn.linear_layers.0.weight",
        "encoder.layer_norm.weight",
        "target.lm.output_layer.weight",
    ]
    tensors = {n: torch.randn(64, 64, generator=g).half() for n in names}
    refs = [TensorRef(k, tuple(v.shape), name_of(v.dtype), "m", loader=lambda v=v: v) for k, v in tensors.items()]
    tmp_path.joinpath("tp").mkdir()
    files = write_tp(refs, tmp_path / "tp", shard)
    assert (len(files) > 1) == (shard is not None)
    ckpt = open_checkpoint(tmp_path / "tp")
    assert ckpt.format == "tencentpretrain" and ckpt.architecture == "llama"
    assert {r.name: r.load() for r in ckpt.tensors}.keys() == tensors.keys()
    assert all(torch.equal(r.load(), tensors[r.name]) for r in ckpt.tensors)
    if shard is None:  # a single file is recognised by its keys
        assert open_checkpoint(files[0]).format == "tencentpretrain"


def test_gguf_reader_exposes_types_and_dequantizes(tmp_path):
    import gguf
    from gguf.quants import dequantize, quantize

    w = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    path = tmp_path / "t.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(1)
    q = quantize(w, gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("blk.0.attn_q.weight", q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("output_norm.weight", np.ones(64, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    ckpt = open_checkpoint(path)
    assert ckpt.format == "gguf" and ckpt.architecture == "llama"
    ref = ckpt.tensor("blk.0.attn_q.weight")
    assert ref.ggml_type == "Q8_0" and ref.shape == (8, 64)
    assert np.array_equal(ref.load().numpy(), dequantize(q, gguf.GGMLQuantizationType.Q8_0))
    assert bytes(ref.raw()) == q.tobytes()
    before = path.read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns of a tensor over read-only memory
        norm = ckpt.tensor("output_norm.weight").load()  # F32: a view of the file's map
    norm.add_(1)  # a private copy: the consumer's, not the file's
    assert torch.equal(norm, torch.full((64,), 2.0)) and path.read_bytes() == before
