"""BLOOM tensor names in the HF, TencentPretrain and GGUF schemes (reference:
shared/reference/tencentpretrain.md and gguf.md). The output head is tied to the embedding."""

from __future__ import annotations

from typing import Any

from ..errors import WeightopsError
from .checks import tp_heads, tp_shape, tp_size
from .llama import TP_LAYERNORM_EPS
from .spec import ArchSpec, ConfigRules, GGUFVocab, Hparams, Role, Shapes, TPRules, Transform, tensor

H = "transformer.h.{n}."
T = "encoder.transformer.{n}."


def _wb(role: Role, hf: str, tp: str) -> tuple:
    """A weight and its bias (TencentPretrain's LayerNorm calls them gamma/beta)."""
    w, b = ("gamma", "beta") if tp.endswith(("norm.", "norm_1.", "norm_2.")) else ("weight", "bias")
    return tensor(role, hf + "weight", tp + w), tensor(role, hf + "bias", tp + b, "bias")


_QKV = tuple(T + f"self_attn.linear_layers.{i}." for i in range(3))
TENSORS = (
    tensor(Role.EMBEDDING, "transformer.word_embeddings.weight", "embedding.word.embedding.weight"),
    *_wb(Role.EMBEDDING_NORM, "transformer.word_embeddings_layernorm.", "embedding.layer_norm."),
    *_wb(Role.ATTN_NORM, H + "input_layernorm.", T + "layer_norm_1."),
    *(
        tensor(
            Role.ATTN_QKV,
            H + f"self_attention.query_key_value.{part}",
            tuple(p + part for p in _QKV),
            part,
            to_gguf=Transform.QKV_SPLIT,
            to_tp=Transform.QKV_SPLIT,
        )
        for part in ("weight", "bias")
    ),
    *_wb(Role.ATTN_OUT, H + "self_attention.dense.", T + "self_attn.final_linear."),
    *_wb(Role.FFN_NORM, H + "post_attention_layernorm.", T + "layer_norm_2."),
    *_wb(Role.FFN_UP, H + "mlp.dense_h_to_4h.", T + "feed_forward.linear_1."),
    *_wb(Role.FFN_DOWN, H + "mlp.dense_4h_to_h.", T + "feed_forward.linear_2."),
    *_wb(Role.OUTPUT_NORM, "transformer.ln_f.", "encoder.layer_norm."),
    # tied to the embedding: llama.cpp's bloom reads the embedding, TencentPretrain repeats it
    tensor(Role.OUTPUT, "lm_head.weight", "target.lm.output_layer.weight", in_gguf=False),
)
EMBEDDING = "transformer.word_embeddings.weight"


# --- GGUF (llama.cpp) export: the `bloom.*` keys and tensor values convert_hf_to_gguf.py writes ---
GGUF_CONFIG_KEYS = ("hidden_size", "n_head", "n_layer", "layer_norm_epsilon", "vocab_size")
_GGUF_ALIASES = {"n_embed": "hidden_size", "num_attention_heads": "n_head", "num_hidden_layers": "n_layer"}
_GGUF_DEFAULTS = {"layer_norm_epsilon": 1e-5}  # transformers' BloomConfig default


def fill_gguf_config(config: dict) -> dict:
    """`config` with BloomConfig's aliases resolved and its epsilon default (see llama.py)."""
    out = {**_GGUF_DEFAULTS, **{k: v for k, v in config.items() if v is not None}}
    for alias, key in _GGUF_ALIASES.items():
        if alias in out:
            out.setdefault(key, out[alias])
    return out


def _n_embed_heads(config: dict) -> tuple[Any, Any]:
    """(hidden size, head count) under either spelling, as the JSON has them (None when absent)."""
    return config.get("hidden_size", config.get("n_embed")), config.get("n_head", config.get("num_attention_heads"))


def _n_layer(config: dict) -> Any:
    return config.get("n_layer", config.get("num_hidden_layers"))


def hf_shapes(config: dict) -> Shapes:
    """(layers, HF shape of each row and why, problems of the config itself); see llama.py."""
    hidden, heads = _n_embed_heads(config)
    if hidden is None or heads is None:
        raise KeyError("hidden_size" if hidden is None else "n_head")
    layers = _n_layer(config)
    if layers is None:
        raise KeyError("n_layer")
    problems = [] if hidden % heads == 0 else [f"hidden_size {hidden} is not a multiple of n_head {heads}"]
    h, h3, h4 = f"hidden_size {hidden}", f"3 x hidden_size {hidden}", f"4 x hidden_size {hidden}"
    vector = {
        name: ((hidden,), h)
        for name in (
            "transformer.word_embeddings_layernorm.weight",
            "transformer.word_embeddings_layernorm.bias",
            H + "input_layernorm.weight",
            H + "input_layernorm.bias",
            H + "self_attention.dense.bias",
            H + "post_attention_layernorm.weight",
            H + "post_attention_layernorm.bias",
            H + "mlp.dense_4h_to_h.bias",
            "transformer.ln_f.weight",
            "transformer.ln_f.bias",
        )
    }
    shapes = {
        **vector,
        EMBEDDING: ((None, hidden), h),
        "lm_head.weight": ((None, hidden), h),
        H + "self_attention.query_key_value.weight": ((3 * hidden, hidden), f"{h3}, {h}"),
        H + "self_attention.query_key_value.bias": ((3 * hidden,), h3),
        H + "self_attention.dense.weight": ((hidden, hidden), h),
        H + "mlp.dense_h_to_4h.weight": ((4 * hidden, hidden), f"{h4}, {h}"),
        H + "mlp.dense_h_to_4h.bias": ((4 * hidden,), h4),
        H + "mlp.dense_4h_to_h.weight": ((hidden, 4 * hidden), f"{h}, {h4}"),
    }
    return layers, shapes, problems


def add_gguf_parameters(writer, config: dict, file_type: int) -> None:
    """Hyper-parameter keys in convert_hf_to_gguf.py's order (its context length falls back to
    n_embed when the config has no seq_length, and the feed-forward length is always 4 x n_embed)."""
    n_embed, n_head = _n_embed_heads(config)
    writer.add_context_length(config.get("seq_length", n_embed))
    writer.add_embedding_length(n_embed)
    writer.add_feed_forward_length(4 * n_embed)
    writer.add_block_count(config["n_layer"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head)
    writer.add_layer_norm_eps(config["layer_norm_epsilon"])
    writer.add_file_type(file_type)


# --- TencentPretrain model config <-> HF BloomConfig (weightops convert; reference: tencentpretrain.md) ---
# The fixed part of TencentPretrain's models/bloom/*_config.json. Unlike 7b1_config.json it keeps
# the embedding LayerNorm: BLOOM has one, and TencentPretrain would silently skip its weights.
TP_CONFIG = {
    "hidden_act": "gelu",
    "dropout": 0.0,
    "data_processor": "lm",
    "embedding": ["word"],
    "remove_transformer_bias": False,
    "has_lmtarget_bias": False,
    "remove_embedding_layernorm": False,
    "encoder": "transformer",
    "mask": "causal",
    "layernorm_positioning": "pre",
    "target": ["lm"],
    "tie_weights": True,
    "alibi_position_embedding": True,
    "layer_number_scale": True,
}


def hparams(config: dict) -> Hparams:
    """Head count, layers and tying of a complete BloomConfig dict."""
    hidden, heads = _n_embed_heads(config)
    return Hparams(_n_layer(config), heads, heads, hidden // heads, bool(config.get("tie_word_embeddings", True)))


def hf_config_from_tp(spec: ArchSpec, tp: dict | None, shapes: dict[str, tuple[int, ...]]) -> dict:
    """BloomConfig fields of a TencentPretrain BLOOM: sizes from the tensor shapes (checked
    against the TP model config `tp` when given), the head count only from `tp`."""
    tp = tp or {}
    emb, up = (spec.name_of(role, "tp") for role in (Role.EMBEDDING, Role.FFN_UP))
    vocab, hidden = tp_shape(shapes, emb)
    tp_size(tp, "emb_size", hidden, emb)
    tp_size(tp, "hidden_size", hidden, emb)
    layers = tp_size(tp, "layers_num", spec.layer_count(shapes, "tp"), "encoder.transformer.N.*")
    feedforward = tp_size(tp, "feedforward_size", tp_shape(shapes, up)[0], up)
    if feedforward != 4 * hidden:
        raise WeightopsError(
            f"tensor {up!r} has {feedforward} rows; Hugging Face BLOOM fixes the feed-forward "
            f"size at 4 x hidden = {4 * hidden}"
        )
    heads = tp_heads(tp)
    if hidden % heads:
        raise WeightopsError(f"hidden size {hidden} is not a multiple of heads_num {heads}")
    return {
        "architectures": [spec.hf_class],
        "model_type": spec.name,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "n_layer": layers,
        "n_head": heads,
        "layer_norm_epsilon": tp.get("layernorm_eps", TP_LAYERNORM_EPS),
        "tie_word_embeddings": True,
    }


def tp_config_from_hf(spec: ArchSpec, config: dict) -> dict:
    """The TencentPretrain model config json (its --config_path) of a complete BloomConfig dict."""
    if config.get("apply_residual_connection_post_layernorm"):
        raise WeightopsError(
            "apply_residual_connection_post_layernorm is set: TencentPretrain's pre-LayerNorm "
            "BLOOM cannot compute this model"
        )
    hp = hparams(config)
    if not hp.tied:
        raise WeightopsError(
            "tie_word_embeddings is false: TencentPretrain's BLOOM ties the output head to the embedding"
        )
    hidden = _n_embed_heads(config)[0]
    return {
        "emb_size": hidden,
        "feedforward_size": 4 * hidden,
        "hidden_size": hidden,
        "heads_num": hp.heads,
        "layers_num": hp.layers,
        **TP_CONFIG,
        "layernorm_eps": config["layer_norm_epsilon"],
    }


CONFIG = ConfigRules(
    hparams=hparams,
    hf_shapes=hf_shapes,
    fill_gguf=fill_gguf_config,
    gguf_keys=GGUF_CONFIG_KEYS,
    add_gguf_parameters=add_gguf_parameters,
)
SPEC = ArchSpec(
    name="bloom",
    hf_class="BloomForCausalLM",
    gguf_arch="BLOOM",
    tensors=TENSORS,
    config=CONFIG,
    # an expanded BLOOM vocabulary keeps BLOOM's pre-tokenizer
    vocab=GGUFVocab(encodings=("gpt2",), default_pre="bloom", add_space_prefix=False),
    tp=TPRules(config_from_hf=tp_config_from_hf, hf_config_from=hf_config_from_tp),
    hf_prefix="transformer.",
)
