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


def _heads(config: dict) -> tuple[int, int]:
    heads = config["num_attention_heads"]
    return heads, config.get("num_key_value_heads") or heads


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


def gguf_tensor(kind: str, tensor, config: dict):
    """HF values -> GGUF values: q/k rows from rotate-half to llama.cpp's interleaved order."""
    from . import permute_rotary_to_interleaved
    heads, kv_heads = _heads(config)
    if kind == "rotary_q":
        return permute_rotary_to_interleaved(tensor, heads)
    if kind == "rotary_k":
        return permute_rotary_to_interleaved(tensor, kv_heads)
    return tensor
