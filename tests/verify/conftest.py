"""Fixtures for `weightops verify`: a short prompt file, and candidates made from the tiny LLaMA
(perturbed, converted to TencentPretrain, exported to GGUF Q8_0, with a foreign tokenizer, with
a smaller vocabulary)."""
from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from weightops import tiny

PROMPTS = [
    {"name": "english", "text": "the quick brown fox jumps over the lazy dog, then the model weights merge."},
    {"name": "chinese", "text": "我们发布了中文模型的权重和词表扩展。"},
    {"name": "chat", "text": "用户：今天天气很好吗？\n小元：今天天气很好，大家一起学习。"},
]
SCALED = "model.layers.1.mlp.down_proj.weight"


@pytest.fixture(scope="session")
def prompts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in PROMPTS), encoding="utf-8")
    return path


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def scaled_copy(src: Path, dst: Path, names: Callable[[str], bool], factor: float) -> Path:
    """A copy of the model in `src` with the tensors whose names match scaled by `factor`."""
    out = copy_model(src, dst)
    weights = out / "model.safetensors"
    tensors = load_file(weights)
    for name, t in tensors.items():
        if names(name):
            tensors[name] = (t.float() * factor).to(t.dtype)
    save_file(tensors, weights, metadata={"format": "pt"})
    return out


@pytest.fixture(scope="session")
def perturbed_llama(tmp_path_factory, tiny_llama) -> Path:
    """The tiny LLaMA with one layer's down projection scaled by 1.5."""
    return scaled_copy(tiny_llama, tmp_path_factory.mktemp("perturbed") / "model", lambda n: n == SCALED, 1.5)


@pytest.fixture(scope="session")
def calm_llama(tmp_path_factory, tiny_llama) -> Path:
    """The tiny LLaMA with its attention and MLP weights scaled by 0.3. The shared one (initializer
    range 0.2 at hidden 64) is chaotic: Q8_0's weight noise flips ~7 % of its top-1 tokens, in
    transformers running the dequantized weights as much as in llama.cpp. Calmed like this it
    reacts to quantization as trained checkpoints do (Q8_0: KLD ~2e-4, top-1 ~98 %), so the
    default gates apply to it unchanged."""
    return scaled_copy(tiny_llama, tmp_path_factory.mktemp("calm") / "model",
                       lambda n: n.startswith("model.layers.") and "norm" not in n, 0.3)


@pytest.fixture(scope="session")
def tp_llama(tmp_path_factory, tiny_llama) -> Path:
    """The tiny LLaMA converted to TencentPretrain by `weightops convert`'s library function."""
    from weightops.ops.convert import convert
    out = tmp_path_factory.mktemp("tp") / "model"
    convert(tiny_llama, out, to="tencentpretrain")
    return out


@pytest.fixture(scope="session")
def q8_gguf(tmp_path_factory, calm_llama) -> Path:
    """`calm_llama` as GGUF Q8_0, written by `weightops gguf`'s library function."""
    from weightops.gguf_export import export_gguf
    out = tmp_path_factory.mktemp("gguf") / "calm-q8_0.gguf"
    export_gguf(calm_llama, out, type="q8_0")
    return out


@pytest.fixture(scope="session")
def int8_llama(tmp_path_factory, calm_llama) -> Path:
    """`calm_llama` as bitsandbytes int8, written by `weightops bnb`'s library function."""
    pytest.importorskip("bitsandbytes")
    from weightops.quant.bnb import bnb_checkpoint
    out = tmp_path_factory.mktemp("int8") / "model"
    bnb_checkpoint(calm_llama, out, bits=8)
    return out


@pytest.fixture(scope="session")
def foreign_tokenizer_llama(tmp_path_factory, tiny_llama) -> Path:
    """The tiny LLaMA's weights shipped with another SentencePiece tokenizer of the same size
    (trained on other text): every id is valid, but the ids mean other pieces."""
    out = copy_model(tiny_llama, tmp_path_factory.mktemp("foreign") / "model")
    other = tiny.spm_tokenizer_dir(tmp_path_factory.mktemp("foreign_tok"), lines=tiny.corpus(seed=7))
    for f in other.iterdir():
        shutil.copyfile(f, out / f.name)
    return out


@pytest.fixture(scope="session")
def small_vocab_llama(tmp_path_factory) -> Path:
    """A LLaMA whose tokenizer and embedding have 300 ids (the tiny LLaMA's prompts use more)."""
    english = tiny.corpus()[::2]  # fewer distinct characters, so 300 pieces suffice
    tok = tiny.spm_tokenizer_dir(tmp_path_factory.mktemp("tok300"), vocab_size=300, lines=english)
    return tiny.tiny_llama(tmp_path_factory.mktemp("llama300") / "model", tok)


@pytest.fixture
def scaled_tensor() -> str:
    """The tensor `perturbed_llama` changed."""
    return SCALED


@pytest.fixture
def gguf_available():
    pytest.importorskip("llama_cpp")
    return True
