"""Model config json files (HF config.json, TencentPretrain's model config), read once and
type-checked where they are read, so no command has to: a size written as `"32000"` or
`4096.0` is refused here with the file and the key, instead of comparing unequal to the
tensors later ("32000 vs 32000") or dividing by a string deep inside an export.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import WeightopsError

# Sizes and counts (HF LlamaConfig/BloomConfig names, then TencentPretrain's): whole numbers >= 1.
SIZE_KEYS = frozenset({
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "max_position_embeddings", "n_layer", "n_head", "n_embed",
    "emb_size", "feedforward_size", "heads_num", "layers_num", "local_kv_heads_num", "max_seq_length"})
# Real numbers (an integer is a number too).
NUMBER_KEYS = frozenset({"rms_norm_eps", "layer_norm_epsilon", "layernorm_eps", "rope_theta", "initializer_range"})
FLAG_KEYS = frozenset({"tie_word_embeddings", "tie_weights"})
TEXT_KEYS = frozenset({"model_type"})


def _kind(value: object) -> str:
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "an object"}.get(type(value), type(value).__name__)


def check_config(config: object, path: Path) -> dict:
    """`config` unchanged if it is an object whose known keys have their JSON types (null
    counts as absent: transformers fills the default); else an error naming `path` and the key."""
    if not isinstance(config, dict):
        raise WeightopsError(f"{path}: holds {_kind(config)}, not a JSON object of model settings")
    for key, value in config.items():
        if value is None:
            continue
        if key in SIZE_KEYS and (type(value) is not int or value < 1):
            raise WeightopsError(f"{path}: {key} is {json.dumps(value)} ({_kind(value)}); it must be a whole "
                                 "number of at least 1, written without quotes or decimal point")
        if key in NUMBER_KEYS and type(value) not in (int, float):
            raise WeightopsError(f"{path}: {key} is {json.dumps(value)} ({_kind(value)}); it must be a number")
        if key in FLAG_KEYS and type(value) is not bool:
            raise WeightopsError(f"{path}: {key} is {json.dumps(value)} ({_kind(value)}); it must be true or false")
        if key in TEXT_KEYS and type(value) is not str:
            raise WeightopsError(f"{path}: {key} is {json.dumps(value)} ({_kind(value)}); it must be a string")
    return config


def read_config(path: Path) -> dict:
    """A model config json file, parsed and checked (`check_config`)."""
    try:
        config = json.loads(Path(path).read_text())
    except ValueError as e:
        raise WeightopsError(f"{path}: invalid JSON ({e})") from None
    return check_config(config, path)
