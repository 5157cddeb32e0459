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
