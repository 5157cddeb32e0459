"""Per-architecture knowledge as data: one `ArchSpec` per HF model_type (tensor names in every
naming scheme with their roles and transforms, config rules, GGUF and tokenizer defaults),
looked up with `get(model_type)` or `detect(names, scheme)`. Adding an architecture is adding
its spec; operators and formats ask a spec by role and never name a concrete architecture."""

from __future__ import annotations

import dataclasses

from . import bloom, llama, qwen2
from .checks import check_config_shapes, tp_heads, tp_shape, tp_size
from .registry import detect, get, is_supported, register, register_alias, supported
from .spec import SCHEMES, VOCAB_ROLES, ArchSpec, ConfigRules, GGUFVocab, Hparams, Role, TensorSpec, TPRules, Transform

register(llama.SPEC)
register(bloom.SPEC)
_MISTRAL_DEFAULTS = {"max_position_embeddings": 4096 * 32, "rms_norm_eps": 1e-6, "num_key_value_heads": 8}
register_alias(
    "mistral",
    "llama",
    hf_class="MistralForCausalLM",
    hf_fields={"sliding_window": None},
    config=dataclasses.replace(
        llama.CONFIG, sliding_window=llama.mistral_window, fill_gguf=llama.filler(_MISTRAL_DEFAULTS)
    ),
)  # MistralConfig's defaults
register(qwen2.SPEC)

__all__ = [
    "SCHEMES",
    "VOCAB_ROLES",
    "ArchSpec",
    "ConfigRules",
    "GGUFVocab",
    "Hparams",
    "Role",
    "TPRules",
    "TensorSpec",
    "Transform",
    "check_config_shapes",
    "detect",
    "get",
    "is_supported",
    "register",
    "register_alias",
    "supported",
    "tp_heads",
    "tp_shape",
    "tp_size",
]
