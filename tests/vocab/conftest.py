"""Fixtures for vocabulary expansion: a second SentencePiece model trained on other text,
a float32 LLaMA (exact init checks), and expanded models made once per session."""
from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from weightops import tiny
from weightops.ops.vocab import expand_vocab

_HANZI = "春夏秋冬山水花鸟风月云雨雪天地人和平安快乐书画诗词歌赋琴棋"
_WORDS = "hello world the model merge token river mountain poetry quick fox".split()


def _other_lines(n: int = 300, seed: int = 7) -> list[str]:
    """Text unlike `tiny.corpus()`: other Chinese characters, partly other English words."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        out.append("".join(rng.choice(_HANZI) for _ in range(18)) + "。")
        out.append(" ".join(rng.choice(_WORDS) for _ in range(8)))
    return out


@pytest.fixture(scope="session")
def other_lines():
    """`other_lines(n, seed)`: the other text, for encoding checks."""
    return _other_lines


@pytest.fixture(scope="session")
def other_spm(tmp_path_factory) -> Path:
    """A second LLaMA-style SentencePiece model (400 pieces) to merge into the base."""
    return tiny.train_spm(tmp_path_factory.mktemp("other_spm") / "other.model", 400, lines=_other_lines())


@pytest.fixture(scope="session")
def other_tokenizer(tmp_path_factory) -> Path:
    """An HF tokenizer directory trained on the other text (for --new-tokenizer remaps)."""
    return tiny.spm_tokenizer_dir(tmp_path_factory.mktemp("other_tok"), 400, lines=_other_lines())


@pytest.fixture(scope="session")
def small_tokenizer(tmp_path_factory) -> Path:
    """A 360-token tokenizer: remapping to it would shrink the embedding."""
    return tiny.spm_tokenizer_dir(tmp_path_factory.mktemp("small_tok"), 360)


@pytest.fixture(scope="session")
def llama_f32(tmp_path_factory, spm_tokenizer) -> Path:
    """float32 LLaMA (untied), so init values can be checked without bf16 rounding."""
    return tiny.tiny_llama(tmp_path_factory.mktemp("llama_f32") / "model", spm_tokenizer, dtype=torch.float32, seed=3)


@pytest.fixture(scope="session")
def merged_llama(tmp_path_factory, tiny_llama, other_spm) -> Path:
    """tiny_llama with `other_spm` merged in and normal + special tokens added (default init)."""
    out = tmp_path_factory.mktemp("merged") / "model"
    expand_vocab(tiny_llama, out, merge_spm=other_spm, add_tokens=["weightops", "hello there"],
                 special_tokens=["<|End|>", "<|Human|>"])
    return out
