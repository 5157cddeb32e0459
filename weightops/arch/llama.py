"""LLaMA tensor names in the HF, TencentPretrain and GGUF schemes (reference:
shared/reference/tencentpretrain.md and gguf.md)."""
from . import Architecture, Row

L = "model.layers.{n}."
T = "encoder.transformer.{n}."
ARCH = Architecture("llama", (
    Row("model.embed_tokens.weight", ("embedding.word.embedding.weight",), "token_embd.weight"),
    Row(L + "input_layernorm.weight", (T + "layer_norm_1.weight",), "blk.{n}.attn_norm.weight"),
    Row(L + "self_attn.q_proj.weight", (T + "self_attn.linear_layers.0.weight",), "blk.{n}.attn_q.weight", "rotary_q"),
    Row(L + "self_attn.k_proj.weight", (T + "self_attn.linear_layers.1.weight",), "blk.{n}.attn_k.weight", "rotary_k"),
    Row(L + "self_attn.v_proj.weight", (T + "self_attn.linear_layers.2.weight",), "blk.{n}.attn_v.weight"),
    Row(L + "self_attn.o_proj.weight", (T + "self_attn.final_linear.weight",), "blk.{n}.attn_output.weight"),
    Row(L + "post_attention_layernorm.weight", (T + "layer_norm_2.weight",), "blk.{n}.ffn_norm.weight"),
    Row(L + "mlp.gate_proj.weight", (T + "feed_forward.linear_gate.weight",), "blk.{n}.ffn_gate.weight"),
    Row(L + "mlp.up_proj.weight", (T + "feed_forward.linear_1.weight",), "blk.{n}.ffn_up.weight"),
    Row(L + "mlp.down_proj.weight", (T + "feed_forward.linear_2.weight",), "blk.{n}.ffn_down.weight"),
    Row("model.norm.weight", ("encoder.layer_norm.weight",), "output_norm.weight"),
    Row("lm_head.weight", ("target.lm.output_layer.weight",), "output.weight"),
))

EMBEDDING = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"
# Buffers of transformers < 4.31 that have no counterpart elsewhere and are recomputed on load.
DROPPABLE = ("model.layers.{n}.self_attn.rotary_emb.inv_freq",)


# --- GGUF (llama.cpp) export: the `llama.*` keys and tensor values convert_hf_to_gguf.py writes ---
GGUF_ARCH = "llama"
GGUF_VOCABS = ("sentencepiece", "llama-hf", "gpt2")  # tokenizer encodings tried in this order
GGUF_DEFAULT_PRE = "default"  # tokenizer.ggml.pre for a BPE tokenizer llama.cpp does not know
GGUF_ADD_SPACE_PREFIX = True  # tokenizer_config.json's add_prefix_space -> tokenizer.ggml.add_space_prefix
GGUF_SKIP = DROPPABLE
# config.json keys add_gguf_parameters reads; `fill_gguf_config` derives the usual missing ones,
# and when one is still missing transformers fills its default
GGUF_CONFIG_KEYS = ("num_hidden_layers", "max_position_embeddings", "hidden_size", "intermediate_size",
                    "num_attention_heads", "num_key_value_heads", "rope_parameters", "rms_norm_eps", "head_dim",
                    "vocab_size")
# transformers' LlamaConfig defaults for those keys (a test checks them against AutoConfig)
_GGUF_DEFAULTS = {"max_position_embeddings": 2048, "rms_norm_eps": 1e-6}
_DEFAULT_ROPE_THETA = 10000.0


def fill_gguf_config(config: dict) -> dict:
    """`config` with the GGUF keys an older config.json lacks filled in as transformers'
    LlamaConfig fills them (GQA heads, head_dim, rope_parameters from rope_theta), so an
    export needs no transformers import (a slow one). Legacy `rope_scaling` is left to transformers."""
    out = {**_GGUF_DEFAULTS, **{k: v for k, v in config.items() if v is not None}}
    heads = out.get("num_attention_heads")
    if heads:
        out.setdefault("num_key_value_heads", heads)
        if "hidden_size" in out:
            out.setdefault("head_dim", out["hidden_size"] // heads)
    if "rope_parameters" not in out and "rope_scaling" not in out:
        out["rope_parameters"] = {"rope_type": "default",
                                  "rope_theta": float(out.get("rope_theta", _DEFAULT_ROPE_THETA))}
    return out


def _heads(config: dict) -> tuple[int, int]:
    heads = config["num_attention_heads"]
    return heads, config.get("num_key_value_heads") or heads


def hf_shapes(config: dict) -> tuple[int, dict[str, tuple[tuple[int | None, ...], str]], list[str]]:
    """(layers, the HF shape each row must have and the config keys deciding it, problems of
    the config itself) for `arch.check_config_shapes`; None stands for the vocabulary size."""
    heads, kv_heads = _heads(config)
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    hd = config.get("head_dim") or hidden // heads
    problems = []
    if heads % kv_heads:
        problems.append(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    if hd % 2:
        problems.append(f"head_dim {hd} is odd; rotary embeddings rotate pairs of values")
    h = f"hidden_size {hidden}"
    q = f"num_attention_heads {heads} x head_dim {hd}"
    kv = f"num_key_value_heads {kv_heads} x head_dim {hd}"
    i = f"intermediate_size {inter}"
    shapes = {
        EMBEDDING: ((None, hidden), h), LM_HEAD: ((None, hidden), h),
        L + "input_layernorm.weight": ((hidden,), h), L + "post_attention_layernorm.weight": ((hidden,), h),
        "model.norm.weight": ((hidden,), h),
        L + "self_attn.q_proj.weight": ((heads * hd, hidden), f"{q}, {h}"),
        L + "self_attn.k_proj.weight": ((kv_heads * hd, hidden), f"{kv}, {h}"),
        L + "self_attn.v_proj.weight": ((kv_heads * hd, hidden), f"{kv}, {h}"),
        L + "self_attn.o_proj.weight": ((hidden, heads * hd), f"{h}, {q}"),
        L + "mlp.gate_proj.weight": ((inter, hidden), f"{i}, {h}"),
        L + "mlp.up_proj.weight": ((inter, hidden), f"{i}, {h}"),
        L + "mlp.down_proj.weight": ((hidden, inter), f"{h}, {i}"),
    }
    return config["num_hidden_layers"], shapes, problems


def add_gguf_parameters(writer, config: dict, file_type: int) -> None:
    """Hyper-parameter keys in convert_hf_to_gguf.py's order; `config` is a transformers
    config dict with defaults filled in (what AutoConfig(...).to_dict() gives)."""
    from gguf import RopeScalingType

    from ..errors import WeightopsError
    heads, kv_heads = _heads(config)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type"))
    if rope_type == "linear" and rope.get("factor") is not None:
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    elif rope_type not in (None, "default", "dynamic"):
        raise WeightopsError(f"RoPE scaling type {rope_type!r} is not supported for GGUF export yet "
                             "(supported: none, linear)")
    theta = rope.get("rope_theta", config.get("rope_theta"))
    if theta is not None:
        writer.add_rope_freq_base(theta)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    if config.get("head_dim") is not None:
        writer.add_key_length(config["head_dim"])
        writer.add_value_length(config["head_dim"])
    writer.add_file_type(file_type)
    writer.add_vocab_size(config["vocab_size"])
    writer.add_rope_dimension_count(config.get("head_dim") or config["hidden_size"] // heads)


def add_gguf_tokenizer_quirks(writer, directory, config: dict) -> None:
    """What convert_hf_to_gguf.py's LlamaModel.set_vocab adds by vocabulary size: CodeLlama's
    (32016) infill tokens, and add_bos_token = false for 49152 (granite small models, and so
    SmolLM/SmolLM2, which share the size)."""
    from ..io.gguf_tokenizer import quiet_gguf
    from ..io.special_vocab import SpecialVocab
    vocab_size = config.get("vocab_size", 32000)
    if vocab_size == 32016:
        with quiet_gguf():
            infill = SpecialVocab(directory, load_merges=False, special_token_types=["prefix", "suffix", "middle",
                                                                                     "eot"])
            for typ, token_id in (("prefix", 32007), ("suffix", 32008), ("middle", 32009), ("eot", 32010)):
                infill._set_special_token(typ, token_id)
            infill.add_to_gguf(writer, quiet=True)
    if vocab_size == 49152:
        with quiet_gguf():
            writer.add_add_bos_token(False)


def gguf_tensor(kind: str, tensor, config: dict):
    """HF values -> GGUF values: q/k rows from rotate-half to llama.cpp's interleaved order."""
    from . import permute_rotary_to_interleaved
    heads, kv_heads = _heads(config)
    if kind == "rotary_q":
        return permute_rotary_to_interleaved(tensor, heads)
    if kind == "rotary_k":
        return permute_rotary_to_interleaved(tensor, kv_heads)
    return tensor


# --- TencentPretrain model config <-> HF LlamaConfig (weightops convert; reference: tencentpretrain.md) ---
from ..errors import WeightopsError  # noqa: E402
from . import Hparams, tp_heads, tp_shape, tp_size  # noqa: E402

# The fixed part of TencentPretrain's models/llama/*_config.json (sizes are filled in per model).
TP_CONFIG = {"hidden_act": "silu", "dropout": 0.0, "data_processor": "lm", "embedding": ["word"],
             "remove_transformer_bias": True, "remove_embedding_layernorm": True, "rotary_position_embedding": True,
             "encoder": "transformer", "feed_forward": "gated", "mask": "causal", "layernorm_positioning": "pre",
             "layernorm": "rms", "target": ["lm"]}
TP_LAYERNORM_EPS = 1e-6   # TencentPretrain's default when its config sets no layernorm_eps
TP_MAX_SEQ_LENGTH = 2048  # LLaMA's context, for a TP checkpoint converted without a config
TP_ROPE_THETA = 10000.0   # fixed in TencentPretrain's precompute_freqs_cis; it has no RoPE scaling
# The output head in both schemes; TencentPretrain's state dict repeats the embedding there when tie_weights.
TIED_OUTPUT = {"hf": LM_HEAD, "tp": ARCH.rename(LM_HEAD, "hf", "tp")[0]}


def hf_hparams(config: dict) -> Hparams:
    """Head counts, layers and tying of a complete LlamaConfig dict."""
    heads, kv_heads = _heads(config)
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    return Hparams(config["num_hidden_layers"], heads, kv_heads, head_dim, bool(config["tie_word_embeddings"]))


def hf_config_from_tp(tp: dict | None, shapes: dict[str, tuple[int, ...]]) -> dict:
    """LlamaConfig fields of a TencentPretrain LLaMA. Sizes come from the tensor shapes (and
    must agree with the TP model config `tp` when one is given); head counts only from `tp`."""
    tp = tp or {}
    emb, up, k = (ARCH.rename(n, "hf", "tp")[0] for n in
                  (EMBEDDING, "model.layers.0.mlp.up_proj.weight", "model.layers.0.self_attn.k_proj.weight"))
    vocab, hidden = tp_shape(shapes, emb)
    tp_size(tp, "emb_size", hidden, emb)
    tp_size(tp, "hidden_size", hidden, emb)
    layers = tp_size(tp, "layers_num", ARCH.layer_count(shapes, "tp"), "encoder.transformer.N.*")
    intermediate = tp_size(tp, "feedforward_size", tp_shape(shapes, up)[0], up)
    heads = tp_heads(tp)
    kv_heads = int(tp.get("local_kv_heads_num", heads))
    kv_rows = tp_shape(shapes, k)[0]
    if hidden % heads or kv_rows != kv_heads * (hidden // heads):
        raise WeightopsError(f"tensor {k!r} has {kv_rows} rows, but the TencentPretrain config gives {kv_heads} "
                             f"key/value heads x head size {hidden // heads} (hidden {hidden} / heads_num {heads}); "
                             "set local_kv_heads_num for grouped-query attention")
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
            "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv_heads,
            "hidden_act": tp.get("hidden_act", TP_CONFIG["hidden_act"]),
            "max_position_embeddings": tp.get("max_seq_length", TP_MAX_SEQ_LENGTH),
            "rms_norm_eps": tp.get("layernorm_eps", TP_LAYERNORM_EPS),
            "tie_word_embeddings": TIED_OUTPUT["tp"] not in shapes or bool(tp.get("tie_weights"))}


def tp_config_from_hf(config: dict) -> dict:
    """The TencentPretrain model config json (its --config_path) of a complete LlamaConfig dict."""
    hp = hf_hparams(config)
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    theta = float(rope.get("rope_theta", config.get("rope_theta", TP_ROPE_THETA)))
    if rope_type != "default" or theta != TP_ROPE_THETA:
        raise WeightopsError(f"TencentPretrain computes rotary embeddings with theta {TP_ROPE_THETA:g} and no "
                             f"scaling; this model has rope_type {rope_type!r}, theta {theta:g}, so it would "
                             "compute different outputs there")
    if hp.head_dim * hp.heads != config["hidden_size"]:
        raise WeightopsError(f"head_dim {hp.head_dim} x {hp.heads} heads != hidden_size {config['hidden_size']}: "
                             "TencentPretrain derives the head size from hidden_size / heads_num")
    out = {"emb_size": config["hidden_size"], "feedforward_size": config["intermediate_size"],
           "hidden_size": config["hidden_size"], "heads_num": hp.heads, "layers_num": hp.layers,
           "max_seq_length": config["max_position_embeddings"], **TP_CONFIG, "hidden_act": config["hidden_act"],
           "layernorm_eps": config["rms_norm_eps"]}
    if hp.kv_heads != hp.heads:
        out["local_kv_heads_num"] = hp.kv_heads
    if hp.tied:
        out["tie_weights"] = True
    return out

