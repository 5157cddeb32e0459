"""Model config files (HF config.json, TencentPretrain's model config json): read once, and
the values that sizes and arithmetic are made of checked for type and range right there.

Every operator divides by head counts and loops over layers; a `num_attention_heads` of 0
or "four" would otherwise surface far away as a bare ZeroDivisionError or TypeError, and a
size written as `"32000"` would compare unequal to the tensors ("32000 vs 32000"). Keys
that are absent or null are left alone (the readers fill in defaults).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..errors import WeightopsError, shown

# HF and TencentPretrain spellings of the counts and sizes: positive integers.
POSITIVE_INTS = frozenset(
    {
        "num_attention_heads",
        "num_key_value_heads",
        "num_hidden_layers",
        "hidden_size",
        "intermediate_size",
        "vocab_size",
        "max_position_embeddings",
        "head_dim",
        "n_head",
        "n_layer",
        "n_embed",
        "seq_length",
        "heads_num",
        "local_kv_heads_num",
        "layers_num",
        "emb_size",
        "feedforward_size",
        "max_seq_length",
    }
)
# Epsilons and RoPE bases: positive finite numbers.
POSITIVE_NUMBERS = frozenset({"rms_norm_eps", "layer_norm_epsilon", "layernorm_eps", "rope_theta", "initializer_range"})
STRINGS = frozenset({"model_type", "dtype", "torch_dtype", "hidden_act"})
FLAGS = frozenset({"tie_word_embeddings", "tie_weights"})
OBJECTS = frozenset({"rope_parameters", "rope_scaling", "quantization_config"})


def read_config(path: Path) -> dict[str, Any]:
    """A config json as a dict, refusing what no model config can be."""
    try:
        doc = json.loads(Path(path).read_bytes())
    except ValueError as e:  # UnicodeDecodeError included
        raise WeightopsError(f"{shown(path)}: invalid JSON ({e})") from None
    return check_config(doc, path)


def check_config(config: object, path: Path | str) -> dict[str, Any]:
    """`config` unchanged if it is an object whose known keys have their JSON types and
    ranges; else an error naming `path` and the key."""
    if not isinstance(config, dict):
        raise WeightopsError(f"{shown(path)}: holds {_kind(config)}, not a JSON object of model settings")
    for key, value in config.items():
        if value is None:
            continue
        if key in POSITIVE_INTS and not (type(value) is int and value > 0):
            _bad(path, key, value, "a positive integer, written without quotes or decimal point")
        elif key in POSITIVE_NUMBERS and not (type(value) in (int, float) and math.isfinite(value) and value > 0):
            _bad(path, key, value, "a positive number")
        elif key in STRINGS and not isinstance(value, str):
            _bad(path, key, value, "a string")
        elif key in FLAGS and type(value) is not bool:
            _bad(path, key, value, "true or false")
        elif key in OBJECTS and not isinstance(value, dict):
            _bad(path, key, value, "an object")
    return config


def _bad(path: Path | str, key: str, value: Any, wanted: str) -> None:
    raise WeightopsError(
        f"{shown(path)}: {shown(key)} is {shown(json.dumps(value))[:80]} ({_kind(value)}); it must be {wanted}"
    )


def _kind(value: Any) -> str:
    return {
        dict: "an object",
        list: "an array",
        str: "a string",
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        type(None): "null",
    }.get(type(value), type(value).__name__)
