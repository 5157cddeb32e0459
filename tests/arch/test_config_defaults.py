"""GGUF export fills missing config keys itself (no 3 s transformers import); the values must
be exactly what transformers' AutoConfig would have given."""

import pytest
from transformers import AutoConfig

from weightops import arch

LLAMA_CONFIGS = [
    # Llama-1-7B's config.json (transformers 4.28 era): no GQA key, no rope keys, no head_dim
    {
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-06,
        "vocab_size": 32000,
    },
    # Llama-2 style: explicit nulls and rope_theta
    {
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "num_hidden_layers": 2,
        "rope_scaling": None,
        "rope_theta": 500000.0,
        "vocab_size": 1000,
        "head_dim": None,
    },
    # a minimal one, as the benchmarks write
    {
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 8,
        "num_attention_heads": 16,
        "num_key_value_heads": 4,
        "vocab_size": 32000,
        "rms_norm_eps": 1e-05,
    },
    # explicit head_dim different from hidden / heads
    {
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "head_dim": 32,
        "vocab_size": 500,
    },
]
BLOOM_CONFIGS = [
    {"n_embed": 1024, "n_head": 16, "n_layer": 24, "vocab_size": 250880, "layer_norm_epsilon": 1e-05},
    {"hidden_size": 64, "num_attention_heads": 4, "n_layer": 2, "vocab_size": 300},
]


CASES = {"llama": LLAMA_CONFIGS, "mistral": LLAMA_CONFIGS, "qwen2": LLAMA_CONFIGS[1:], "bloom": BLOOM_CONFIGS}


def test_every_architecture_has_cases():
    assert set(CASES) == set(arch.supported())


@pytest.mark.parametrize("name,config", [(n, c) for n, cs in CASES.items() for c in cs])
def test_filled_keys_equal_transformers_defaults(name, config):
    spec = arch.get(name)
    filled = spec.config.fill_gguf(config)
    keys = spec.config.gguf_keys
    if not all(k in filled for k in keys):
        return  # incomplete: the export asks transformers itself
    expected = AutoConfig.for_model(name, **config).to_dict()
    assert {k: filled[k] for k in keys} == {k: expected[k] for k in keys}


def test_legacy_rope_scaling_is_left_to_transformers():
    config = {**LLAMA_CONFIGS[0], "rope_scaling": {"type": "linear", "factor": 2.0}}
    assert "rope_parameters" not in arch.get("llama").config.fill_gguf(config)
