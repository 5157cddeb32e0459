"""Qwen2: LLaMA's layout with q/k/v biases, rotate-half RoPE kept as it is in GGUF
(llama.cpp's qwen2 architecture is NEOX-style), a byte-level BPE tokenizer with the `qwen2`
pre-tokenizer. TencentPretrain has no Qwen2, so no TencentPretrain names."""

from __future__ import annotations

from . import llama
from .llama import L
from .spec import ArchSpec, ConfigRules, GGUFVocab, Role, Shapes, tensor

_BIASES = {Role.ATTN_Q: "q_proj", Role.ATTN_K: "k_proj", Role.ATTN_V: "v_proj"}
TENSORS = tuple(
    t
    for row in llama.TENSORS
    for t in (
        tensor(row.role, row.hf, None),
        *((tensor(row.role, f"{L}self_attn.{_BIASES[row.role]}.bias", None, "bias"),) if row.role in _BIASES else ()),
    )
)


def hf_shapes(config: dict) -> Shapes:
    """LLaMA's shapes plus the q/k/v biases (one value per output row)."""
    layers, shapes, problems = llama.hf_shapes(config)
    for proj in _BIASES.values():
        (rows, _), why = shapes[f"{L}self_attn.{proj}.weight"]
        shapes[f"{L}self_attn.{proj}.bias"] = ((rows,), why.split(", ")[0])
    return layers, shapes, problems


def window(config: dict) -> int | None:
    """Qwen2 attends within `sliding_window` only when `use_sliding_window` is set."""
    return config.get("sliding_window") if config.get("use_sliding_window") else None


# convert_hf_to_gguf.py's Qwen2Model writes TextModel's keys only (no vocab_size, no RoPE dimensions),
# key/value lengths only when config.json has head_dim. Missing keys: transformers' Qwen2Config fills them.
CONFIG = ConfigRules(
    hparams=llama.hparams,
    hf_shapes=hf_shapes,
    fill_gguf=lambda config: {k: v for k, v in config.items() if v is not None},
    # LLaMA's keys but head_dim: the converter's qwen2 writes key/value lengths only when
    # config.json itself has head_dim
    gguf_keys=tuple(k for k in llama.GGUF_CONFIG_KEYS if k != "head_dim"),
    add_gguf_parameters=llama.add_text_parameters,
    sliding_window=window,
)
SPEC = ArchSpec(
    name="qwen2",
    hf_class="Qwen2ForCausalLM",
    gguf_arch="QWEN2",
    tensors=TENSORS,
    config=CONFIG,
    vocab=GGUFVocab(encodings=("sentencepiece", "gpt2"), default_pre="qwen2", add_space_prefix=False),
)
