"""Fixtures for the GGUF tests: tiny models whose BPE tokenizers split text the way a llama.cpp
pre-tokenizer can (BLOOM's regex, GPT-2's), an expanded BLOOM vocabulary with YaYi's special
tokens, and helpers to run llama.cpp and transformers on the same ids."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from weightops import tiny

# BLOOM's tokenizer.json pre-tokenizer: split words (with a leading space) from whitespace and punctuation.
BLOOM_SPLIT = " ?[^(\\s|[.,!?\u2026\u3002\uff0c\u3001\u0964\u06d4\u060c])]+"
YAYI_SPECIAL = ["<|System|>", "<|Human|>", "<|YaYi|>", "<|End|>"]
CHAT_TEMPLATE = "{% for m in messages %}<|Human|>{{ m['content'] }}<|End|>{% endfor %}<|YaYi|>"
PROMPT = "the quick brown fox jumps over lazy dog 1234. 我们发布了中文模型, tensor stream!"


def _bpe(directory: Path, pre_tokenizer) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(tiny.corpus(), trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(directory)
    return Path(directory)


@pytest.fixture(scope="session")
def bloom_tokenizer(tmp_path_factory) -> Path:
    """Byte-level BPE with BLOOM's pre-tokenizer (its own vocabulary, so llama.cpp's hash does not know it)."""
    from tokenizers import Regex, pre_tokenizers
    pre = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(BLOOM_SPLIT), behavior="isolated"),
                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    return _bpe(tmp_path_factory.mktemp("bloom_tok"), pre)


@pytest.fixture(scope="session")
def gpt2_tokenizer(tmp_path_factory) -> Path:
    """Byte-level BPE with GPT-2's pre-tokenizer regex (what a BPE LLaMA such as SmolLM uses)."""
    from tokenizers import pre_tokenizers
    return _bpe(tmp_path_factory.mktemp("gpt2_tok"), pre_tokenizers.ByteLevel(add_prefix_space=False))


@pytest.fixture(scope="session")
def calm_llama(tmp_path_factory, tiny_llama) -> Path:
    """The tiny LLaMA with its attention/MLP weights scaled by 0.3.

    With initializer_range 0.2 at hidden 64 the shared tiny model is chaotic: Q8_0's ~0.5%
    weight noise flips 5 of 49 top-1 tokens, in llama.cpp and equally in transformers running
    the dequantized weights (the file is not the cause; its blocks equal llama.cpp's own).
    Scaled like this it is as well-conditioned as real checkpoints, so top-1 is a fair check."""
    from transformers import AutoModelForCausalLM
    out = tmp_path_factory.mktemp("calm_llama") / "model"
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("model.layers.") and "norm" not in name:
                p.mul_(0.3)
    model.save_pretrained(out)
    for f in tiny_llama.iterdir():
        if f.name.startswith("tokenizer"):
            shutil.copyfile(f, out / f.name)
    return out


@pytest.fixture(scope="session")
def llama_bpe(tmp_path_factory, gpt2_tokenizer) -> Path:
    """bf16 LLaMA (GQA 4/2) with a byte-level BPE tokenizer instead of SentencePiece."""
    return tiny.tiny_llama(tmp_path_factory.mktemp("llama_bpe") / "model", gpt2_tokenizer, seed=3)


@pytest.fixture(scope="session")
def bloom(tmp_path_factory, bloom_tokenizer) -> Path:
    return tiny.tiny_bloom(tmp_path_factory.mktemp("bloom_gguf") / "model", bloom_tokenizer)


@pytest.fixture(scope="session")
def yayi_bloom(tmp_path_factory, bloom, bloom_tokenizer) -> Path:
    """A YaYi-style BLOOM: 4 added special tokens, one added normal token, a chat template, and an
    embedding padded to 416 rows (more rows than the tokenizer has ids)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out = tmp_path_factory.mktemp("yayi") / "model"
    tok = AutoTokenizer.from_pretrained(bloom_tokenizer)
    tok.add_special_tokens({"additional_special_tokens": YAYI_SPECIAL})
    tok.add_tokens(["weightops"])
    tok.chat_template = CHAT_TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(bloom)
    torch.manual_seed(5)
    model.resize_token_embeddings(416, mean_resizing=False)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def llama_cpp_run():
    """`run(gguf_path, ids)` -> (llama.cpp float32 logits for every position, the Llama object).

    The KV cache is float32 and flash attention off, so that llama.cpp's arithmetic is as
    close to transformers' float32 as it gets."""
    llama_cpp = pytest.importorskip("llama_cpp")

    def run(path: Path, ids: list[int]):
        llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=128, verbose=False, type_k=0, type_v=0,
                              flash_attn=False, n_threads=2)
        llm.eval(ids)
        return np.array(llm.scores[:len(ids)], dtype=np.float32), llm
    return run


@pytest.fixture(scope="session")
def hf_logits():
    """`hf_logits(model_dir, ids)` -> transformers' float32 logits."""
    from transformers import AutoModelForCausalLM

    def run(directory: Path, ids: list[int]) -> np.ndarray:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0].numpy()
    return run
