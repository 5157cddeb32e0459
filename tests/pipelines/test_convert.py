"""weightops convert: TencentPretrain <-> HF for LLaMA (GQA, tied) and BLOOM.

TencentPretrain checkpoints here are made independently of weightops, by the reference
doc's formulas and torch.save, as TencentPretrain writes them; the HF models they came
from are the proof: converted back, every tensor and the logits must be identical.
"""

from __future__ import annotations

import collections
import json
from pathlib import Path

import pytest
import torch

from weightops import tiny
from weightops.dtypes import name_of
from weightops.errors import WeightopsError
from weightops.io.checkpoint import open_checkpoint, save_hf
from weightops.io.outputs import MARKER
from weightops.io.remap import hf_view, tp_to_hf
from weightops.io.tencentpretrain import write_tp
from weightops.stream import TensorRef

IDS = torch.tensor([[1, 5, 77, 300, 12, 399, 42, 2, 260, 31]])
TEXT = "the quick brown fox 1234. 我们发布了中文模型"


# --- reference formulas (shared/reference/tencentpretrain.md), written independently of weightops ---


def interleave(w: torch.Tensor, heads: int) -> torch.Tensor:
    """HF -> TP row order: W.reshape(h, 2, hd // 2, d).transpose(1, 2).reshape(h * hd, d)."""
    rows, d = w.shape
    return w.reshape(heads, 2, rows // heads // 2, d).transpose(1, 2).reshape(rows, d)


def tp_llama_oracle(hf: dict[str, torch.Tensor], layers: int, heads: int, kv_heads: int) -> dict:
    """TencentPretrain's convert_llama_from_huggingface_to_tencentpretrain.py, from the key table
    (k permuted with the key/value head count, which the script hard-codes as the head count)."""
    out = collections.OrderedDict()
    out["embedding.word.embedding.weight"] = hf["model.embed_tokens.weight"]
    for i in range(layers):
        h, t = f"model.layers.{i}.", f"encoder.transformer.{i}."
        out[t + "self_attn.linear_layers.0.weight"] = interleave(hf[h + "self_attn.q_proj.weight"], heads)
        out[t + "self_attn.linear_layers.1.weight"] = interleave(hf[h + "self_attn.k_proj.weight"], kv_heads)
        out[t + "self_attn.linear_layers.2.weight"] = hf[h + "self_attn.v_proj.weight"]
        out[t + "self_attn.final_linear.weight"] = hf[h + "self_attn.o_proj.weight"]
        out[t + "layer_norm_1.weight"] = hf[h + "input_layernorm.weight"]
        out[t + "feed_forward.linear_gate.weight"] = hf[h + "mlp.gate_proj.weight"]
        out[t + "feed_forward.linear_1.weight"] = hf[h + "mlp.up_proj.weight"]
        out[t + "feed_forward.linear_2.weight"] = hf[h + "mlp.down_proj.weight"]
        out[t + "layer_norm_2.weight"] = hf[h + "post_attention_layernorm.weight"]
    out["encoder.layer_norm.weight"] = hf["model.norm.weight"]
    if "lm_head.weight" in hf:
        out["target.lm.output_layer.weight"] = hf["lm_head.weight"]
    return out


def tp_bloom_oracle(hf: dict[str, torch.Tensor], layers: int, heads: int) -> dict:
    """BLOOM's key table; q/k/v split per head as W.reshape(h, 3, hd, ...)[:, i]."""
    out = collections.OrderedDict()

    def wb(tp: str, name: str, norm: bool = False) -> None:
        w, b = ("gamma", "beta") if norm else ("weight", "bias")
        out[f"{tp}.{w}"], out[f"{tp}.{b}"] = hf[f"{name}.weight"], hf[f"{name}.bias"]

    out["embedding.word.embedding.weight"] = hf["transformer.word_embeddings.weight"]
    wb("embedding.layer_norm", "transformer.word_embeddings_layernorm", norm=True)
    for i in range(layers):
        h, t = f"transformer.h.{i}.", f"encoder.transformer.{i}."
        wb(t + "layer_norm_1", h + "input_layernorm", norm=True)
        for kind in ("weight", "bias"):
            fused = hf[h + f"self_attention.query_key_value.{kind}"]
            per = fused.reshape(heads, 3, fused.shape[0] // heads // 3, *fused.shape[1:])
            for j in range(3):
                out[t + f"self_attn.linear_layers.{j}.{kind}"] = per[:, j].reshape(-1, *fused.shape[1:])
        wb(t + "self_attn.final_linear", h + "self_attention.dense")
        wb(t + "layer_norm_2", h + "post_attention_layernorm", norm=True)
        wb(t + "feed_forward.linear_1", h + "mlp.dense_h_to_4h")
        wb(t + "feed_forward.linear_2", h + "mlp.dense_4h_to_h")
    wb("encoder.layer_norm", "transformer.ln_f", norm=True)
    return out


def llama_tp_config(heads: int = 4, kv_heads: int | None = None, **extra) -> dict:
    """models/llama/*_config.json as TencentPretrain ships it, with the tiny model's sizes."""
    cfg = {
        "emb_size": 64,
        "feedforward_size": 128,
        "hidden_size": 64,
        "hidden_act": "silu",
        "heads_num": heads,
        "layers_num": 2,
        "dropout": 0.1,
        "data_processor": "lm",
        "max_seq_length": 512,
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
        **extra,
    }
    if kv_heads is not None:
        cfg["local_kv_heads_num"] = kv_heads
    return cfg


def bloom_tp_config(**extra) -> dict:
    """models/bloom/7b1_config.json with the tiny model's sizes."""
    return {
        "emb_size": 64,
        "feedforward_size": 256,
        "hidden_size": 64,
        "hidden_act": "gelu",
        "heads_num": 4,
        "layers_num": 2,
        "dropout": 0.0,
        "data_processor": "lm",
        "embedding": ["word"],
        "remove_transformer_bias": False,
        "has_lmtarget_bias": False,
        "remove_embedding_layernorm": True,
        "encoder": "transformer",
        "mask": "causal",
        "layernorm_positioning": "pre",
        "target": ["lm"],
        "tie_weights": True,
        "alibi_position_embedding": True,
        "layer_number_scale": True,
        **extra,
    }


# --- helpers ---


def hf_state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


def tp_state(path: Path) -> dict[str, torch.Tensor]:
    return {r.name: r.load().clone() for r in open_checkpoint(path).tensors}


def save_tp(state: dict, directory: Path, config: dict | None = None) -> tuple[Path, Path | None]:
    """(model.bin, tp_config.json) as a TencentPretrain user has them."""
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(collections.OrderedDict((k, v.clone()) for k, v in state.items()), directory / "model.bin")
    if config is None:
        return directory / "model.bin", None
    (directory / "tp_config.json").write_text(json.dumps(config))
    return directory / "model.bin", directory / "tp_config.json"


def assert_same(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert torch.equal(got[name], want[name]), name


def logits(path: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(IDS).logits


def ok(r) -> None:
    assert r.exit_code == 0, (r.stdout, r.stderr, r.exception)


def failed(r, *needles: str) -> str:
    assert r.exit_code == 1, (r.stdout, r.stderr)
    for n in needles:
        assert n in r.stderr, (n, r.stderr)
    return r.stderr


# --- LLaMA ---


def test_llama_hf_to_tp_equals_tencentpretrain_formula(cli, tmp_path, tiny_llama_mha):
    out = tmp_path / "tp"
    ok(cli("convert", tiny_llama_mha, out, "--to", "tencentpretrain"))
    assert sorted(p.name for p in out.iterdir()) == [
        MARKER,
        "tencentpretrain_config.json",
        "tencentpretrain_model.bin",
        "tokenizer.json",
        "tokenizer.model",
        "tokenizer_config.json",
    ]
    ours = torch.load(out / "tencentpretrain_model.bin", weights_only=True)
    assert_same(ours, tp_llama_oracle(hf_state(tiny_llama_mha), 2, 4, 4))
    cfg = json.loads((out / "tencentpretrain_config.json").read_text())
    want = llama_tp_config()
    assert {k: cfg[k] for k in want if k not in ("dropout",)} == {k: v for k, v in want.items() if k != "dropout"}
    assert cfg["layernorm_eps"] == 1e-5 and "local_kv_heads_num" not in cfg and "tie_weights" not in cfg


@pytest.mark.parametrize(
    "model, kv_heads, tied", [("tiny_llama_mha", 4, False), ("tiny_llama", 2, False), ("tiny_llama_tied", 4, True)]
)
def test_llama_tp_to_hf_gives_identical_logits_and_back(request, cli, tmp_path, spm_tokenizer, model, kv_heads, tied):
    src = request.getfixturevalue(model)
    hf = hf_state(src)
    oracle = tp_llama_oracle(hf, 2, 4, kv_heads)
    assert ("target.lm.output_layer.weight" in oracle) is not tied
    tp_file, tp_cfg = save_tp(
        oracle, tmp_path / "tp", llama_tp_config(kv_heads=kv_heads if kv_heads != 4 else None, layernorm_eps=1e-5)
    )
    out = tmp_path / "hf"
    ok(
        cli(
            "convert",
            tp_file,
            out,
            "--to",
            "hf",
            "--tp-config",
            tp_cfg,
            "--tokenizer",
            spm_tokenizer / "tokenizer.model",
        )
    )
    assert_same(hf_state(out), hf)
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["vocab_size"], cfg["num_key_value_heads"], cfg["tie_word_embeddings"]) == (400, kv_heads, tied)
    assert (cfg["rms_norm_eps"], cfg["max_position_embeddings"], cfg["dtype"]) == (1e-5, 512, "bfloat16")
    assert torch.equal(logits(out), logits(src))

    import sentencepiece as spm
    from transformers import AutoTokenizer

    sp = spm.SentencePieceProcessor(model_file=str(spm_tokenizer / "tokenizer.model"))
    assert AutoTokenizer.from_pretrained(out)(TEXT).input_ids == [sp.bos_id()] + sp.encode(TEXT)

    back = tmp_path / "tp2"
    ok(cli("convert", out, back, "--to", "tencentpretrain"))
    assert_same(tp_state(back), oracle)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_llama_hf_tp_hf_bit_exact_every_dtype(cli, tmp_path, spm_tokenizer, dtype):
    src = tiny.tiny_llama(tmp_path / "src", spm_tokenizer, dtype=dtype, seed=3)
    ok(cli("convert", src, tmp_path / "tp", "--to", "tencentpretrain"))
    assert {t.dtype for t in tp_state(tmp_path / "tp").values()} == {dtype}
    ok(cli("convert", tmp_path / "tp", tmp_path / "hf", "--to", "hf"))  # config + tokenizer found beside it
    assert_same(hf_state(tmp_path / "hf"), hf_state(src))
    a, b = (json.loads((p / "config.json").read_text()) for p in (src, tmp_path / "hf"))
    keys = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "rms_norm_eps",
        "tie_word_embeddings",
        "max_position_embeddings",
        "dtype",
    )
    assert {k: b[k] for k in keys} == {k: a[k] for k in keys}
    ok(cli("convert", tmp_path / "hf", tmp_path / "tp2", "--to", "tencentpretrain"))
    assert_same(tp_state(tmp_path / "tp2"), tp_state(tmp_path / "tp"))


def test_tied_llama_round_trip_keeps_it_tied(cli, tmp_path, tiny_llama_tied):
    ok(cli("convert", tiny_llama_tied, tmp_path / "tp", "--to", "tencentpretrain"))
    assert "target.lm.output_layer.weight" not in tp_state(tmp_path / "tp")
    assert json.loads((tmp_path / "tp" / "tencentpretrain_config.json").read_text())["tie_weights"] is True
    ok(cli("convert", tmp_path / "tp", tmp_path / "hf", "--to", "hf"))
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["tie_word_embeddings"] is True
    assert torch.equal(logits(tmp_path / "hf"), logits(tiny_llama_tied))


def test_tp_layout_is_what_tencentpretrain_rope_expects(cli, tmp_path, tiny_llama):
    """Attention scores with TencentPretrain's RoPE (complex pairs of adjacent rows) on our TP
    weights equal HF's (rotate-half) on the HF weights, GQA included."""
    ok(cli("convert", tiny_llama, tmp_path / "tp", "--to", "tencentpretrain"))
    hf, tp = hf_state(tiny_llama), tp_state(tmp_path / "tp")
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(0))
    hd = 16
    angles = torch.arange(6)[:, None] * (1.0 / 10000 ** (torch.arange(0, hd, 2).float() / hd))[None]

    def hf_rope(w, heads):
        q = (x @ w.float().T).reshape(6, heads, hd)
        cos, sin = (torch.cat([angles, angles], -1).cos()[:, None], torch.cat([angles, angles], -1).sin()[:, None])
        return q * cos + torch.cat([-q[..., hd // 2 :], q[..., : hd // 2]], -1) * sin

    def tp_rope(w, heads):
        q = torch.view_as_complex((x @ w.float().T).reshape(6, heads, hd // 2, 2).contiguous())
        return torch.view_as_real(q * torch.polar(torch.ones_like(angles), angles)[:, None]).reshape(6, heads, hd)

    def scores(rope, q, k):
        qq, kk = rope(q, 4), rope(k, 2).repeat_interleave(2, dim=1)
        return torch.einsum("ihd,jhd->hij", qq, kk)

    p, t = "model.layers.1.self_attn.", "encoder.transformer.1.self_attn.linear_layers."
    want = scores(hf_rope, hf[p + "q_proj.weight"], hf[p + "k_proj.weight"])
    assert torch.allclose(scores(tp_rope, tp[t + "0.weight"], tp[t + "1.weight"]), want, atol=1e-5)
    assert not torch.allclose(scores(tp_rope, hf[p + "q_proj.weight"], hf[p + "k_proj.weight"]), want, atol=1e-3)


def test_sizes_inferred_and_defaults_without_eps(cli, tmp_path, tiny_llama_mha):
    tp_file, tp_cfg = save_tp(
        tp_llama_oracle(hf_state(tiny_llama_mha), 2, 4, 4), tmp_path / "tp", {"heads_num": 4}
    )  # only the head count: everything else from the tensors
    ok(cli("convert", tp_file, tmp_path / "hf", "--to", "hf", "--tp-config", tp_cfg))
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]) == (
        64,
        128,
        2,
        400,
    )
    assert cfg["rms_norm_eps"] == 1e-6 and cfg["max_position_embeddings"] == 2048  # TencentPretrain's defaults
    assert cfg["tie_word_embeddings"] is False and cfg["num_key_value_heads"] == 4


def test_dtype_option(cli, tmp_path, tiny_llama):
    ok(cli("convert", tiny_llama, tmp_path / "tp", "--to", "tencentpretrain"))
    ok(cli("convert", tmp_path / "tp", tmp_path / "hf", "--to", "hf", "--dtype", "float32"))
    got, want = hf_state(tmp_path / "hf"), hf_state(tiny_llama)
    assert all(got[k].dtype == torch.float32 and torch.equal(got[k], want[k].float()) for k in want)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "float32"


# --- BLOOM ---


def test_bloom_hf_to_tp_equals_formula(cli, tmp_path, tiny_bloom):
    ok(cli("convert", tiny_bloom, tmp_path / "tp", "--to", "tencentpretrain"))
    assert_same(tp_state(tmp_path / "tp"), tp_bloom_oracle(hf_state(tiny_bloom), 2, 4))
    cfg = json.loads((tmp_path / "tp" / "tencentpretrain_config.json").read_text())
    assert (cfg["heads_num"], cfg["layers_num"], cfg["feedforward_size"], cfg["layernorm_eps"]) == (4, 2, 256, 1e-5)
    assert cfg["tie_weights"] and cfg["alibi_position_embedding"] and cfg["remove_embedding_layernorm"] is False


@pytest.mark.parametrize("with_tied_copy", [False, True])
def test_bloom_tp_to_hf_logits_and_back(cli, tmp_path, tiny_bloom, bpe_tokenizer, with_tied_copy):
    hf = hf_state(tiny_bloom)
    oracle = tp_bloom_oracle(hf, 2, 4)
    state = dict(oracle)
    if with_tied_copy:  # TencentPretrain's own state dict of a tie_weights model repeats the embedding
        state["target.lm.output_layer.weight"] = oracle["embedding.word.embedding.weight"]
    tp_file, tp_cfg = save_tp(state, tmp_path / "tp", bloom_tp_config(layernorm_eps=1e-5))
    ok(cli("convert", tp_file, tmp_path / "hf", "--to", "hf", "--tp-config", tp_cfg, "--tokenizer", bpe_tokenizer))
    assert_same(hf_state(tmp_path / "hf"), hf)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (cfg["n_head"], cfg["n_layer"], cfg["vocab_size"], cfg["tie_word_embeddings"]) == (4, 2, 400, True)
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (1, 2, 3)
    assert torch.equal(logits(tmp_path / "hf"), logits(tiny_bloom))
    from transformers import AutoTokenizer

    assert (
        AutoTokenizer.from_pretrained(tmp_path / "hf")(TEXT).input_ids
        == AutoTokenizer.from_pretrained(bpe_tokenizer)(TEXT).input_ids
    )
    ok(cli("convert", tmp_path / "hf", tmp_path / "tp2", "--to", "tencentpretrain"))
    assert_same(tp_state(tmp_path / "tp2"), oracle)


def test_bloom_tied_copy_that_differs_is_refused(cli, tmp_path, tiny_bloom):
    state = tp_bloom_oracle(hf_state(tiny_bloom), 2, 4)
    state["target.lm.output_layer.weight"] = state["embedding.word.embedding.weight"] + 1
    tp_file, tp_cfg = save_tp(state, tmp_path / "tp", bloom_tp_config())
    failed(
        cli("convert", tp_file, tmp_path / "hf", "--to", "hf", "--tp-config", tp_cfg),
        "target.lm.output_layer.weight",
        "differs",
    )
    assert not (tmp_path / "hf").exists()


def test_bloom_fuse_is_lazy_and_loads_only_its_three_tensors(tiny_bloom):
    oracle = tp_bloom_oracle(hf_state(tiny_bloom), 2, 4)
    loaded: list[str] = []

    def ref(name, t):
        return TensorRef(name, tuple(t.shape), name_of(t.dtype), "mem", loader=lambda: loaded.append(name) or t)

    refs = [ref(k, v) for k, v in oracle.items()]
    config = hf_view(open_checkpoint(tiny_bloom))[1]
    out = {r.name: r for r in tp_to_hf(refs, "bloom", config)}
    assert loaded == []
    fused = out["transformer.h.1.self_attention.query_key_value.weight"].load()
    assert sorted(loaded) == [f"encoder.transformer.1.self_attn.linear_layers.{i}.weight" for i in range(3)]
    assert torch.equal(fused, hf_state(tiny_bloom)["transformer.h.1.self_attention.query_key_value.weight"])


# --- hf_view, the entry point other commands use ---


def test_hf_view(tmp_path, tiny_llama):
    ckpt = open_checkpoint(tiny_llama)
    refs, config = hf_view(ckpt)
    assert refs == ckpt.tensors and config == json.loads((tiny_llama / "config.json").read_text())
    tp_file, tp_cfg = save_tp(
        tp_llama_oracle(hf_state(tiny_llama), 2, 4, 2), tmp_path / "tp", llama_tp_config(kv_heads=2, layernorm_eps=1e-5)
    )
    refs, config = hf_view(open_checkpoint(tp_file), json.loads(tp_cfg.read_text()))
    assert_same({r.name: r.load() for r in refs}, hf_state(tiny_llama))
    assert (config["model_type"], config["num_key_value_heads"], config["vocab_size"]) == ("llama", 2, 400)
    with pytest.raises(WeightopsError, match="--tp-config"):
        hf_view(open_checkpoint(tp_file))


# --- errors ---


def test_unknown_and_missing_tensors_are_listed(cli, tmp_path, tiny_llama_mha):
    state = tp_llama_oracle(hf_state(tiny_llama_mha), 2, 4, 4)
    state["encoder.transformer.0.self_attn.extra.weight"] = torch.zeros(2)
    del state["encoder.transformer.1.feed_forward.linear_2.weight"]
    tp_file, tp_cfg = save_tp(state, tmp_path / "tp", llama_tp_config())
    failed(
        cli("convert", tp_file, tmp_path / "hf", "--to", "hf", "--tp-config", tp_cfg),
        "unknown tensor(s): encoder.transformer.0.self_attn.extra.weight",
        "missing tensor(s): encoder.transformer.1.feed_forward.linear_2.weight",
        str(tp_file),
    )
    assert not (tmp_path / "hf").exists()

    src = open_checkpoint(tiny_llama_mha)
    extra = TensorRef("model.layers.0.mlp.extra.weight", (2,), "F32", "mem", loader=lambda: torch.zeros(2))
    save_hf([*src.tensors, extra], tmp_path / "hf-extra", aux_files=src.aux_files)
    failed(
        cli("convert", tmp_path / "hf-extra", tmp_path / "tp-out", "--to", "tencentpretrain"),
        "unknown tensor(s): model.layers.0.mlp.extra.weight",
    )


def test_config_problems_are_clear(cli, tmp_path, tiny_llama):
    state = tp_llama_oracle(hf_state(tiny_llama), 2, 4, 2)
    tp_file, _ = save_tp(state, tmp_path / "tp")
    failed(cli("convert", tp_file, tmp_path / "a", "--to", "hf"), "attention heads", "--tp-config")
    _, no_kv = save_tp(state, tmp_path / "tp1", llama_tp_config())  # GQA checkpoint, config without kv heads
    failed(cli("convert", tp_file, tmp_path / "b", "--to", "hf", "--tp-config", no_kv), "local_kv_heads_num")
    _, wrong = save_tp(state, tmp_path / "tp2", llama_tp_config(kv_heads=2) | {"emb_size": 4096})
    failed(cli("convert", tp_file, tmp_path / "c", "--to", "hf", "--tp-config", wrong), "emb_size=4096")
    failed(cli("convert", tp_file, tmp_path / "d", "--to", "tencentpretrain"), "already")


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_parameters": {"rope_theta": 1e6, "rope_type": "default"}},  # transformers 5
        {"rope_theta": 10000.0, "rope_scaling": {"type": "linear", "factor": 2.0}},
    ],
)
def test_rope_tencentpretrain_cannot_compute_is_refused(cli, tmp_path, tiny_llama, rope):
    src = open_checkpoint(tiny_llama)
    config = {k: v for k, v in src.config.items() if k != "rope_parameters"} | rope
    save_hf(src.tensors, tmp_path / "rope", extra_files={"config.json": json.dumps(config)})
    failed(cli("convert", tmp_path / "rope", tmp_path / "tp", "--to", "tencentpretrain"), "theta 10000")


def test_old_inv_freq_buffers_are_dropped(cli, tmp_path, tiny_llama_mha):
    hf = hf_state(tiny_llama_mha)
    state = dict(hf)
    for i in range(2):
        state[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.rand(8)
    old = tmp_path / "old"
    old.mkdir()
    torch.save(state, old / "pytorch_model.bin")
    (old / "config.json").write_bytes((tiny_llama_mha / "config.json").read_bytes())
    ok(cli("convert", old, tmp_path / "tp", "--to", "tencentpretrain"))
    assert_same(tp_state(tmp_path / "tp"), tp_llama_oracle(hf, 2, 4, 4))


def test_existing_output_needs_force_and_must_be_ours(cli, tmp_path, tiny_llama):
    (tmp_path / "tp").mkdir()
    (tmp_path / "tp" / "keep").write_text("x")
    for extra in ((), ("--force",)):
        failed(cli("convert", tiny_llama, tmp_path / "tp", "--to", "tencentpretrain", *extra), "did not write")
    assert (tmp_path / "tp" / "keep").read_text() == "x"
    (tmp_path / "tp" / "keep").unlink()
    ok(cli("convert", tiny_llama, tmp_path / "tp", "--to", "tencentpretrain"))  # empty: fine
    failed(cli("convert", tiny_llama, tmp_path / "tp", "--to", "tencentpretrain"), "--force")
    ok(cli("convert", tiny_llama, tmp_path / "tp", "--to", "tencentpretrain", "--force"))
    assert not (tmp_path / "tp" / "keep").exists()


# --- sharded TencentPretrain checkpoints, inspect ---


def test_sharded_tp_output_and_input(cli, tmp_path, tiny_llama):
    ok(cli("convert", tiny_llama, tmp_path / "single", "--to", "tencentpretrain", "--max-shard-size", "10MB"))
    assert not (tmp_path / "single" / "tencentpretrain_model.bin.index.json").exists()  # not exceeded: one file
    ok(cli("convert", tiny_llama, tmp_path / "sharded", "--to", "tencentpretrain", "--max-shard-size", "60KB"))
    parts = sorted(p.name for p in (tmp_path / "sharded").glob("tencentpretrain_model-*.bin"))
    assert len(parts) >= 3 and parts[0] == "tencentpretrain_model-0.bin"
    index = json.loads((tmp_path / "sharded" / "tencentpretrain_model.bin.index.json").read_text())
    single = tp_state(tmp_path / "single")
    assert sorted(index["weight_map"]) == sorted(single) and set(index["weight_map"].values()) == set(parts)
    assert all((tmp_path / "sharded" / p).stat().st_size < 60_000 + 4096 for p in parts)
    assert_same(tp_state(tmp_path / "sharded"), single)

    # a sharded input, as TencentPretrain's convert_model_into_blocks.py lays it out, without our config
    blocks = tmp_path / "blocks"
    blocks.mkdir()
    write_tp(open_checkpoint(tmp_path / "single" / "tencentpretrain_model.bin").tensors, blocks, 50_000)
    tp_cfg = tmp_path / "cfg.json"
    tp_cfg.write_text(json.dumps(llama_tp_config(kv_heads=2, layernorm_eps=1e-5)))
    ok(cli("convert", blocks, tmp_path / "hf", "--to", "hf", "--tp-config", tp_cfg))
    assert_same(hf_state(tmp_path / "hf"), hf_state(tiny_llama))


def test_inspect_tencentpretrain(cli, tmp_path, tiny_llama, tiny_bloom):
    ok(cli("convert", tiny_llama, tmp_path / "tp", "--to", "tencentpretrain"))
    doc = json.loads(cli("inspect", tmp_path / "tp", "--json").stdout)
    assert (doc["format"], doc["architecture"], doc["layers"], doc["hidden_size"]) == (
        "tencentpretrain",
        "llama",
        2,
        64,
    )
    assert (doc["heads"], doc["kv_heads"], doc["vocab"]["embedding_rows"]) == (4, 2, 400)
    bare, cfg = save_tp(tp_state(tmp_path / "tp"), tmp_path / "bare", llama_tp_config(kv_heads=2))
    r = cli("inspect", bare)
    ok(r)
    assert "tencentpretrain" in r.stdout and "llama" in r.stdout and "heads unknown" in r.stdout
    assert "heads 4 (key/value 2)" in cli("inspect", bare, "--tp-config", cfg).stdout
    ok(cli("convert", tiny_bloom, tmp_path / "tpb", "--to", "tencentpretrain"))
    doc = json.loads(cli("inspect", tmp_path / "tpb", "--json").stdout)
    assert (doc["architecture"], doc["layers"], doc["heads"]) == ("bloom", 2, 4)


def test_vocab_size_is_embedding_rows_and_tokenizer_must_fit(cli, tmp_path, tiny_llama_mha, spm_tokenizer):
    state = tp_llama_oracle(hf_state(tiny_llama_mha), 2, 4, 4)
    for name in ("embedding.word.embedding.weight", "target.lm.output_layer.weight"):  # an expanded vocabulary
        state[name] = torch.cat([state[name], torch.ones(24, 64, dtype=torch.bfloat16)])
    tp_file, tp_cfg = save_tp(state, tmp_path / "tp", llama_tp_config())
    r = cli("convert", tp_file, tmp_path / "hf", "--to", "hf", "--tp-config", tp_cfg, "--tokenizer", spm_tokenizer)
    ok(r)
    assert "424 rows for 400 tokens" in r.stderr
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["vocab_size"] == 424
    for name in ("embedding.word.embedding.weight", "target.lm.output_layer.weight"):
        state[name] = state[name][:300]
    tp_file, tp_cfg = save_tp(state, tmp_path / "tp-small", llama_tp_config())
    failed(
        cli("convert", tp_file, tmp_path / "hf2", "--to", "hf", "--tp-config", tp_cfg, "--tokenizer", spm_tokenizer),
        "400 tokens",
        "300 rows",
    )


def test_bloom_names_without_transformer_prefix(tiny_bloom):
    from weightops.io.remap import hf_to_tp

    ckpt = open_checkpoint(tiny_bloom)
    bare = [r.renamed(r.name.removeprefix("transformer.")) for r in ckpt.tensors]
    assert all(not r.name.startswith("transformer.") for r in bare)
    got = {r.name: r.load() for r in hf_to_tp(bare, "bloom", hf_view(ckpt)[1])}
    assert_same(got, tp_bloom_oracle(hf_state(tiny_bloom), 2, 4))
