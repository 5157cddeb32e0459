"""Every command that applies, over every architecture in the registry: a new architecture is
tested by adding its spec and a tiny builder to BUILDERS (a spec without one fails here)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from weightops import arch, tiny
from weightops.arch import Role

PROMPT = "the quick brown fox jumps over lazy dog 1234. 我们发布了中文模型, tensor stream!"

# name -> build(request, directory): the tiny model of that architecture
BUILDERS: dict[str, Callable[[pytest.FixtureRequest, Path], Path]] = {
    "llama": lambda request, d: request.getfixturevalue("tiny_llama"),
    "bloom": lambda request, d: request.getfixturevalue("tiny_bloom"),
    "mistral": lambda request, d: tiny.tiny_mistral(d / "model", request.getfixturevalue("spm_tokenizer")),
    "qwen2": lambda request, d: tiny.tiny_qwen2(d / "model", tiny.qwen2_tokenizer_dir(d / "tokenizer")),
}


def test_every_architecture_has_a_builder():
    assert set(BUILDERS) == set(arch.supported())


def test_every_tensor_has_a_shape_rule():
    llama_like = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_hidden_layers": 2,
    }
    configs = {"bloom": {"hidden_size": 64, "n_head": 4, "n_layer": 2}}
    for name in arch.supported():
        spec = arch.get(name)
        _, shapes, problems = spec.config.hf_shapes(configs.get(name, llama_like))
        assert set(shapes) == {t.hf for t in spec.tensors} and problems == []


def test_unknown_model_type_lists_the_supported_ones():
    from weightops.errors import WeightopsError

    with pytest.raises(WeightopsError, match="unknown architecture 'gpt2'; supported: llama, bloom, mistral, qwen2"):
        arch.get("gpt2")


@pytest.fixture(scope="session", params=arch.supported())
def model(request, tmp_path_factory) -> tuple[str, Path]:
    name = request.param
    return name, BUILDERS[name](request, tmp_path_factory.mktemp(name))


@pytest.fixture(scope="session")
def gguf_f32(model, tmp_path_factory) -> tuple[Path, list[str]]:
    """The model exported as an F32 GGUF (once per architecture) and the export's warnings."""
    from weightops.pipelines.gguf import export_gguf

    warnings: list[str] = []
    out = tmp_path_factory.mktemp("gguf") / f"{model[0]}-f32.gguf"
    export_gguf(model[1], out, type="f32", warn=warnings.append)
    return out, warnings


def _ok(result) -> None:
    assert result.exit_code == 0, result.output + str(result.exception)


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from weightops.io.checkpoint import open_checkpoint

    return {r.name: r.load().clone() for r in open_checkpoint(path).tensors}


def _hf_ids(directory: Path) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)(PROMPT)["input_ids"]


def test_inspect(model, cli):
    name, path = model
    result = cli("inspect", "--json", path)
    _ok(result)
    info = json.loads(result.stdout)
    assert info["architecture"] == name and info["vocab"]["agree"] and info["layers"] == 2


def test_make_and_apply_delta(model, cli, tmp_path):
    name, path = model
    target = tiny.finetune(path, tmp_path / "target")
    _ok(cli("make-delta", path, target, tmp_path / "delta", "--dtype", "float32"))
    _ok(cli("apply-delta", path, tmp_path / "delta", tmp_path / "rebuilt", "--dtype", "bfloat16"))
    want, got = _tensors(target), _tensors(tmp_path / "rebuilt")
    assert set(got) == set(want) and all(torch.equal(got[n], want[n]) for n in want)


def test_expand_vocab(model, cli, tmp_path):
    name, path = model
    spec = arch.get(name)
    _ok(cli("expand-vocab", path, tmp_path / "out", "--special-token", "<|weightops|>", "--pad-to-multiple", "64"))
    before, after = _tensors(path), _tensors(tmp_path / "out")
    vocab = [n for n in before if spec.role(n, "hf") in arch.VOCAB_ROLES]
    assert vocab and any(spec.role(n, "hf") is Role.EMBEDDING for n in vocab)
    for n in vocab:  # the embedding and an untied head grow; known rows are carried bit for bit
        rows = before[n].shape[0]
        assert after[n].shape[0] % 64 == 0 and after[n].shape[0] > rows
        assert torch.equal(after[n][:rows], before[n])
    assert all(torch.equal(after[n], before[n]) for n in before if n not in vocab)
    info = json.loads(cli("inspect", "--json", tmp_path / "out").stdout)
    assert info["architecture"] == name and info["vocab"]["tokenizer"] == info["vocab"]["tokenizer"]


def test_convert_tencentpretrain(model, cli, tmp_path):
    name, path = model
    result = cli("convert", path, tmp_path / "tp", "--to", "tencentpretrain")
    if arch.get(name).tp is None:  # TencentPretrain cannot compute it: refused, nothing written
        assert result.exit_code == 1 and f"TencentPretrain cannot compute {name} models" in result.output
        assert not (tmp_path / "tp").exists()
        return
    _ok(result)
    _ok(cli("convert", tmp_path / "tp", tmp_path / "hf", "--to", "hf", "--arch", name))
    want, got = _tensors(path), _tensors(tmp_path / "hf")
    assert set(got) == set(want) and all(torch.equal(got[n], want[n]) for n in want)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == name and config["architectures"] == [arch.get(name).hf_class]


def test_gguf_runs_in_llama_cpp(model, gguf_f32, monkeypatch):
    """llama.cpp loads the file, tokenizes like the HF tokenizer and computes transformers'
    float32 logits (within LLaMA's tolerance)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from transformers import AutoModelForCausalLM

    name, path = model
    ids = _hf_ids(path)
    llm = llama_cpp.Llama(
        model_path=str(gguf_f32[0]),
        logits_all=True,
        n_ctx=128,
        verbose=False,
        type_k=0,
        type_v=0,
        flash_attn=False,
        n_threads=2,
    )
    bos = llm.token_bos() if ids and ids[0] == llm.token_bos() else None
    assert llm.tokenize(PROMPT.encode(), add_bos=bos is not None, special=False) == ids
    llm.eval(ids)
    got = np.array(llm.scores[: len(ids)], dtype=np.float32)
    if name == "bloom":  # llama.cpp's CPU GELU reads an fp16 table; round the reference alike (see tests/gguf)
        import transformers.models.bloom.modeling_bloom as modeling

        monkeypatch.setattr(
            modeling.BloomGelu, "forward", lambda self, x: modeling.bloom_gelu_forward(x.half().float()).half().float()
        )
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(got - ref).max() < 1e-3


def test_gguf_is_what_convert_hf_to_gguf_writes(model, gguf_f32, llama_cpp_source, tmp_path):
    """Metadata (every key and value, tokenizer included) and tensor values equal llama.cpp's
    own converter's F32 file. The tiny BPE vocabularies are unknown to its pre-tokenizer hash
    table, so it is told the pre-tokenizer our file carries."""
    from gguf import GGUFReader

    from weightops.io.gguf import read_metadata

    name, path = model
    ours = read_metadata(gguf_f32[0])
    theirs_path = tmp_path / "oracle.gguf"
    code = (
        "import sys; sys.path[:0] = [sys.argv[1], sys.argv[1] + '/gguf-py']\n"
        "import conversion.base as base\n"
        "pre = sys.argv[2]\n"
        "base.TextModel.get_vocab_base_pre = lambda self, tokenizer: pre\n"
        "sys.argv = ['convert_hf_to_gguf.py', sys.argv[3], '--outtype', 'f32', '--outfile', sys.argv[4]]\n"
        "import convert_hf_to_gguf; convert_hf_to_gguf.main()"
    )
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            str(llama_cpp_source),
            ours.get("tokenizer.ggml.pre", "default"),
            str(path),
            str(theirs_path),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    theirs = read_metadata(theirs_path)
    assert ours == theirs
    a = {t.name: np.array(t.data) for t in GGUFReader(gguf_f32[0]).tensors}
    b = {t.name: np.array(t.data) for t in GGUFReader(theirs_path).tensors}
    assert set(a) == set(b) and all(np.array_equal(a[n], b[n]) for n in a)


def test_verify_against_gguf(model, gguf_f32, cli):
    name, path = model
    _ok(cli("verify", path, gguf_f32[0], "--device", "cpu"))


def test_bnb(model, cli, tmp_path):
    name, path = model
    spec = arch.get(name)
    _ok(cli("bnb", path, tmp_path / "nf4", "--bits", "4", "--device", "cpu"))
    config = json.loads((tmp_path / "nf4" / "config.json").read_text())
    assert config["quantization_config"]["load_in_4bit"] and config["model_type"] == name
    names = set(_tensors(tmp_path / "nf4"))
    for n, t in _tensors(path).items():  # layer matrices quantized; biases, norms and the rest kept
        hit = spec.lookup(n, "hf")
        if hit and hit[1] is not None and t.dim() == 2:
            assert n + ".absmax" in names, n
        else:
            assert n in names, n


def test_manifest(model, cli, tmp_path):
    import shutil

    name, path = model
    copy = tmp_path / "m"
    shutil.copytree(path, copy)
    _ok(cli("manifest", "create", copy))
    _ok(cli("manifest", "check", copy))
    data = json.loads((copy / "weightops-manifest.json").read_text())
    assert data  # written, and checked above
