"""LLaMA (and Mistral, an alias: the same tensors, with sliding-window attention in its
config): tensor names in the HF, TencentPretrain and GGUF schemes (reference:
shared/reference/tencentpretrain.md and gguf.md), config translation and GGUF keys."""

from __future__ import annotations

from ..errors import WeightopsError
from .checks import tp_heads, tp_shape, tp_size
from .spec import ArchSpec, ConfigRules, GGUFVocab, Hparams, Role, Shapes, TPRules, Transform, tensor

L = "model.layers.{n}."
T = "encoder.transformer.{n}."
TENSORS = (
    tensor(Role.EMBEDDING, "model.embed_tokens.weight", "embedding.word.embedding.weight"),
    tensor(Role.ATTN_NORM, L + "input_layernorm.weight", T + "layer_norm_1.weight"),
    tensor(
        Role.ATTN_Q,
        L + "self_attn.q_proj.weight",
        T + "self_attn.linear_layers.0.weight",
        to_gguf=Transform.ROTARY_Q,
        to_tp=Transform.ROTARY_Q,
    ),
    tensor(
        Role.ATTN_K,
        L + "self_attn.k_proj.weight",
        T + "self_attn.linear_layers.1.weight",
        to_gguf=Transform.ROTARY_K,
        to_tp=Transform.ROTARY_K,
    ),
    tensor(Role.ATTN_V, L + "self_attn.v_proj.weight", T + "self_attn.linear_layers.2.weight"),
    tensor(Role.ATTN_OUT, L + "self_attn.o_proj.weight", T + "self_attn.final_linear.weight"),
    tensor(Role.FFN_NORM, L + "post_attention_layernorm.weight", T + "layer_norm_2.weight"),
    tensor(Role.FFN_GATE, L + "mlp.gate_proj.weight", T + "feed_forward.linear_gate.weight"),
    tensor(Role.FFN_UP, L + "mlp.up_proj.weight", T + "feed_forward.linear_1.weight"),
    tensor(Role.FFN_DOWN, L + "mlp.down_proj.weight", T + "feed_forward.linear_2.weight"),
    tensor(Role.OUTPUT_NORM, "model.norm.weight", "encoder.layer_norm.weight"),
    tensor(Role.OUTPUT, "lm_head.weight", "target.lm.output_layer.weight"),
)
# Buffers of transformers < 4.31 that have no counterpart elsewhere and are recomputed on load.
DROPPABLE = (L + "self_attn.rotary_emb.inv_freq",)


# --- GGUF (llama.cpp) export: the keys and tensor values convert_hf_to_gguf.py writes ---
# config.json keys add_gguf_parameters reads; `fill_gguf` derives the usual missing ones,
# and when one is still missing transformers fills its default
GGUF_CONFIG_KEYS = (
    "num_hidden_layers",
    "max_position_embeddings",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "rope_parameters",
    "rms_norm_eps",
    "head_dim",
    "vocab_size",
)
_DEFAULT_ROPE_THETA = 10000.0


def filler(defaults: dict):
    """`fill(config)`: `config` with the GGUF keys an older config.json lacks filled in as
    transformers' config class does (`defaults`, GQA heads, head_dim, rope_parameters from
    rope_theta), so an export needs no transformers import (a slow one). Legacy
    `rope_scaling` is left to transformers."""

    def fill(config: dict) -> dict:
        out = {**defaults, **{k: v for k, v in config.items() if v is not None}}
        heads = out.get("num_attention_heads")
        if heads:
            out.setdefault("num_key_value_heads", heads)
            if "hidden_size" in out:
                out.setdefault("head_dim", out["hidden_size"] // heads)
        if "rope_parameters" not in out and "rope_scaling" not in out:
            out["rope_parameters"] = {
                "rope_type": "default",
                "rope_theta": float(out.get("rope_theta", _DEFAULT_ROPE_THETA)),
            }
        return out

    return fill


def heads(config: dict) -> tuple[int, int]:
    n = config["num_attention_heads"]
    return n, config.get("num_key_value_heads") or n


def hf_shapes(config: dict) -> Shapes:
    """(layers, the HF shape each tensor must have and the config keys deciding it, problems of
    the config itself) for `arch.check_config_shapes`; None stands for the vocabulary size."""
    n_heads, kv_heads = heads(config)
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    hd = config.get("head_dim") or hidden // n_heads
    problems = []
    if n_heads % kv_heads:
        problems.append(f"num_attention_heads {n_heads} is not a multiple of num_key_value_heads {kv_heads}")
    if hd % 2:
        problems.append(f"head_dim {hd} is odd; rotary embeddings rotate pairs of values")
    h = f"hidden_size {hidden}"
    q = f"num_attention_heads {n_heads} x head_dim {hd}"
    kv = f"num_key_value_heads {kv_heads} x head_dim {hd}"
    i = f"intermediate_size {inter}"
    shapes = {
        "model.embed_tokens.weight": ((None, hidden), h),
        "lm_head.weight": ((None, hidden), h),
        L + "input_layernorm.weight": ((hidden,), h),
        L + "post_attention_layernorm.weight": ((hidden,), h),
        "model.norm.weight": ((hidden,), h),
        L + "self_attn.q_proj.weight": ((n_heads * hd, hidden), f"{q}, {h}"),
        L + "self_attn.k_proj.weight": ((kv_heads * hd, hidden), f"{kv}, {h}"),
        L + "self_attn.v_proj.weight": ((kv_heads * hd, hidden), f"{kv}, {h}"),
        L + "self_attn.o_proj.weight": ((hidden, n_heads * hd), f"{h}, {q}"),
        L + "mlp.gate_proj.weight": ((inter, hidden), f"{i}, {h}"),
        L + "mlp.up_proj.weight": ((inter, hidden), f"{i}, {h}"),
        L + "mlp.down_proj.weight": ((hidden, inter), f"{h}, {i}"),
    }
    return config["num_hidden_layers"], shapes, problems


def add_text_parameters(writer, config: dict, file_type: int) -> None:
    """The keys convert_hf_to_gguf.py's TextModel writes for every RMSNorm/RoPE decoder, in
    its order; `config` is a transformers config dict with defaults filled in."""
    from gguf import RopeScalingType

    n_heads, kv_heads = heads(config)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_heads)
    writer.add_head_count_kv(kv_heads)
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type"))
    if rope_type == "linear" and rope.get("factor") is not None:
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    elif rope_type not in (None, "default", "dynamic"):
        raise WeightopsError(
            f"RoPE scaling type {rope_type!r} is not supported for GGUF export yet (supported: none, linear)"
        )
    theta = rope.get("rope_theta", config.get("rope_theta"))
    if theta is not None:
        writer.add_rope_freq_base(theta)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    if config.get("head_dim") is not None:
        writer.add_key_length(config["head_dim"])
        writer.add_value_length(config["head_dim"])
    writer.add_file_type(file_type)


def add_gguf_parameters(writer, config: dict, file_type: int) -> None:
    """TextModel's keys, then the two LlamaModel adds (vocabulary size, RoPE dimensions)."""
    add_text_parameters(writer, config, file_type)
    writer.add_vocab_size(config["vocab_size"])
    writer.add_rope_dimension_count(config.get("head_dim") or config["hidden_size"] // heads(config)[0])


def add_gguf_tokenizer_quirks(writer, directory, config: dict) -> None:
    """What convert_hf_to_gguf.py's LlamaModel.set_vocab adds by vocabulary size: CodeLlama's
    (32016) infill tokens, and add_bos_token = false for 49152 (granite small models, and so
    SmolLM/SmolLM2, which share the size)."""
    from ..io.gguf_tokenizer import quiet_gguf
    from ..io.special_vocab import SpecialVocab

    vocab_size = config.get("vocab_size", 32000)
    if vocab_size == 32016:
        with quiet_gguf():
            infill = SpecialVocab(
                directory, load_merges=False, special_token_types=["prefix", "suffix", "middle", "eot"]
            )
            for typ, token_id in (("prefix", 32007), ("suffix", 32008), ("middle", 32009), ("eot", 32010)):
                infill._set_special_token(typ, token_id)
            infill.add_to_gguf(writer, quiet=True)
    if vocab_size == 49152:
        with quiet_gguf():
            writer.add_add_bos_token(False)


def hparams(config: dict) -> Hparams:
    """Head counts, layers and tying of a LlamaConfig-like dict."""
    n_heads, kv_heads = heads(config)
    head_dim = config.get("head_dim") or config["hidden_size"] // n_heads
    return Hparams(
        config["num_hidden_layers"], n_heads, kv_heads, head_dim, bool(config.get("tie_word_embeddings", False))
    )


# --- TencentPretrain model config <-> HF LlamaConfig (weightops convert; reference: tencentpretrain.md) ---
# The fixed part of TencentPretrain's models/llama/*_config.json (sizes are filled in per model).
TP_CONFIG = {
    "hidden_act": "silu",
    "dropout": 0.0,
    "data_processor": "lm",
    "embedding": ["word"],
    "remove_transformer_bias": True,
    "remove_embedding_layernorm": True,
    "rotary_position_embedding": True,
    "encoder": "transformer",
    "feed_forward": "gated",
    "mask": "causal",
    "layernorm_positioning": "pre",
    "layernorm": "rms",
    "target": ["lm"],
}
TP_LAYERNORM_EPS = 1e-6  # TencentPretrain's default when its config sets no layernorm_eps
TP_MAX_SEQ_LENGTH = 2048  # LLaMA's context, for a TP checkpoint converted without a config
TP_ROPE_THETA = 10000.0  # fixed in TencentPretrain's precompute_freqs_cis; it has no RoPE scaling


def hf_config_from_tp(spec: ArchSpec, tp: dict | None, shapes: dict[str, tuple[int, ...]]) -> dict:
    """HF config fields of a TencentPretrain LLaMA. Sizes come from the tensor shapes (and
    must agree with the TP model config `tp` when one is given); head counts only from `tp`."""
    tp = tp or {}
    emb, up, k = (spec.name_of(role, "tp") for role in (Role.EMBEDDING, Role.FFN_UP, Role.ATTN_K))
    vocab, hidden = tp_shape(shapes, emb)
    tp_size(tp, "emb_size", hidden, emb)
    tp_size(tp, "hidden_size", hidden, emb)
    layers = tp_size(tp, "layers_num", spec.layer_count(shapes, "tp"), "encoder.transformer.N.*")
    intermediate = tp_size(tp, "feedforward_size", tp_shape(shapes, up)[0], up)
    n_heads = tp_heads(tp)
    kv_heads = int(tp.get("local_kv_heads_num", n_heads))
    kv_rows = tp_shape(shapes, k)[0]
    if hidden % n_heads or kv_rows != kv_heads * (hidden // n_heads):
        raise WeightopsError(
            f"tensor {k!r} has {kv_rows} rows, but the TencentPretrain config gives {kv_heads} "
            f"key/value heads x head size {hidden // n_heads} (hidden {hidden} / heads_num "
            f"{n_heads}); "
            "set local_kv_heads_num for grouped-query attention"
        )
    return {
        "architectures": [spec.hf_class],
        "model_type": spec.name,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": kv_heads,
        "hidden_act": tp.get("hidden_act", TP_CONFIG["hidden_act"]),
        "max_position_embeddings": tp.get("max_seq_length", TP_MAX_SEQ_LENGTH),
        "rms_norm_eps": tp.get("layernorm_eps", TP_LAYERNORM_EPS),
        "tie_word_embeddings": spec.name_of(Role.OUTPUT, "tp") not in shapes or bool(tp.get("tie_weights")),
        **spec.hf_fields,
    }


def tp_config_from_hf(spec: ArchSpec, config: dict) -> dict:
    """The TencentPretrain model config json (its --config_path) of a complete HF config dict."""
    hp = spec.config.hparams(config)
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    theta = float(rope.get("rope_theta", config.get("rope_theta", TP_ROPE_THETA)))
    if rope_type != "default" or theta != TP_ROPE_THETA:
        raise WeightopsError(
            f"TencentPretrain computes rotary embeddings with theta {TP_ROPE_THETA:g} and no "
            f"scaling; this model has rope_type {rope_type!r}, theta {theta:g}, so it would "
            "compute different outputs there"
        )
    window = spec.config.sliding_window(config)
    if window is not None and window < config["max_position_embeddings"]:
        raise WeightopsError(
            f"this {spec.name} model attends to the last {window} positions only (sliding_window), "
            f"within a context of {config['max_position_embeddings']}; TencentPretrain's LLaMA "
            "attends to every earlier position, so it would compute different outputs there"
        )
    if hp.head_dim * hp.heads != config["hidden_size"]:
        raise WeightopsError(
            f"head_dim {hp.head_dim} x {hp.heads} heads != hidden_size {config['hidden_size']}: "
            "TencentPretrain derives the head size from hidden_size / heads_num"
        )
    out = {
        "emb_size": config["hidden_size"],
        "feedforward_size": config["intermediate_size"],
        "hidden_size": config["hidden_size"],
        "heads_num": hp.heads,
        "layers_num": hp.layers,
        "max_seq_length": config["max_position_embeddings"],
        **TP_CONFIG,
        "hidden_act": config["hidden_act"],
        "layernorm_eps": config["rms_norm_eps"],
    }
    if hp.kv_heads != hp.heads:
        out["local_kv_heads_num"] = hp.kv_heads
    if hp.tied:
        out["tie_weights"] = True
    return out


def mistral_window(config: dict) -> int | None:
    """Mistral's sliding attention window (transformers applies it whenever it is set)."""
    return config.get("sliding_window")


CONFIG = ConfigRules(
    hparams=hparams,
    hf_shapes=hf_shapes,
    fill_gguf=filler({"max_position_embeddings": 2048, "rms_norm_eps": 1e-6}),  # LlamaConfig's
    gguf_keys=GGUF_CONFIG_KEYS,
    add_gguf_parameters=add_gguf_parameters,
)
SPEC = ArchSpec(
    name="llama",
    hf_class="LlamaForCausalLM",
    gguf_arch="LLAMA",
    tensors=TENSORS,
    config=CONFIG,
    vocab=GGUFVocab(
        encodings=("sentencepiece", "llama-hf", "gpt2"),
        default_pre="default",
        add_space_prefix=True,
        quirks=add_gguf_tokenizer_quirks,
    ),
    tp=TPRules(config_from_hf=tp_config_from_hf, hf_config_from=hf_config_from_tp),
    droppable=DROPPABLE,
)
