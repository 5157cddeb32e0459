"""Fixtures for TencentPretrain <-> HF conversion: an untied LLaMA without GQA, the shape
TencentPretrain's own HF -> TP script handles."""
from __future__ import annotations

from pathlib import Path

import pytest

from weightops import tiny


@pytest.fixture(scope="session")
def tiny_llama_mha(tmp_path_factory, spm_tokenizer) -> Path:
    """bf16 LLaMA, 4 heads = 4 key/value heads, untied lm_head."""
    return tiny.tiny_llama(tmp_path_factory.mktemp("llama_mha") / "model", spm_tokenizer, kv_heads=4, seed=2)
