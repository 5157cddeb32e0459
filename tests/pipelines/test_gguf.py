"""GGUF export: llama.cpp loads our files, tokenizes like the HF tokenizer and computes the
same logits as transformers; transformers reads them back; types, metadata, determinism."""

from __future__ import annotations

import hashlib
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, TokenType

from weightops import arch as arch_tables
from weightops.arch import Transform
from weightops.arch.transforms import fuse_qkv, permute_interleaved_to_rotary, permute_rotary_to_interleaved
from weightops.errors import WeightopsError
from weightops.io.gguf import read_metadata
from weightops.pipelines.gguf import export_gguf
from weightops.quant import ggml_types, policy

PROMPT = "the quick brown fox jumps over lazy dog 1234. 我们发布了中文模型, tensor stream!"


def export(model: Path, out: Path, type: str = "f32", **kw):
    warnings: list[str] = []
    result = export_gguf(model, out, type=type, warn=warnings.append, **kw)
    return result, warnings


def hf_ids(directory: Path, text: str = PROMPT) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)(text)["input_ids"]


def kld(ref: np.ndarray, cand: np.ndarray) -> float:
    """Mean KL(reference || candidate) over positions."""
    lp = torch.log_softmax(torch.from_numpy(ref).double(), -1)
    lq = torch.log_softmax(torch.from_numpy(cand).double(), -1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


def gguf_tensors(path: Path) -> dict[str, tuple[Q, np.ndarray]]:
    """name -> (type, stored bytes/values) straight from the file."""
    return {t.name: (t.tensor_type, np.array(t.data)) for t in GGUFReader(path).tensors}


# ---------------------------------------------------------------- llama.cpp accepts the files


def test_llama_spm_gqa_f32_matches_transformers(tiny_llama, tmp_path, llama_cpp_run, hf_logits):
    out = tmp_path / "llama-f32.gguf"
    result, warnings = export(tiny_llama, out, "f32")
    assert warnings == []
    ids = hf_ids(tiny_llama)
    got, llm = llama_cpp_run(out, ids)
    assert llm.tokenize(PROMPT.encode(), add_bos=True, special=False) == ids
    ref = hf_logits(tiny_llama, ids)
    assert np.abs(got - ref).max() < 1e-3
    assert llm.n_vocab() == 400 and result.tokenizer.model == "llama"


@pytest.mark.parametrize("qtype", ["f16", "q8_0"])
def test_llama_top1_identical(calm_llama, tmp_path, llama_cpp_run, hf_logits, qtype):
    out = tmp_path / f"llama-{qtype}.gguf"
    export(calm_llama, out, qtype)
    ids = hf_ids(calm_llama)
    got, _ = llama_cpp_run(out, ids)
    ref = hf_logits(calm_llama, ids)
    print(f"{qtype}: max |logit diff| {np.abs(got - ref).max():.4f}, KLD {kld(ref, got):.2e}")
    assert (got.argmax(-1) == ref.argmax(-1)).all()


def test_llama_q4_0_kld_reported(calm_llama, tmp_path, llama_cpp_run, hf_logits):
    out = tmp_path / "llama-q4_0.gguf"
    result, _ = export(calm_llama, out, "q4_0")
    ids = hf_ids(calm_llama)
    got, _ = llama_cpp_run(out, ids)
    ref = hf_logits(calm_llama, ids)
    value, top1 = kld(ref, got), float((got.argmax(-1) == ref.argmax(-1)).mean())
    print(f"q4_0 tiny llama: KLD {value:.4f}, top-1 agreement {top1:.2%}")
    assert 0 < value < 0.1  # quantized, yet still the same model
    assert result.tensor_types["blk.0.ffn_down.weight"] == "Q4_0"  # the mix's other types: test_gguf_mixes


def test_llama_bpe_tokenizer(llama_bpe, tmp_path, llama_cpp_run, hf_logits):
    out = tmp_path / "llama-bpe.gguf"
    result, warnings = export(llama_bpe, out, "f32")
    meta = read_metadata(out)
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    assert result.tokenizer.pre_source == "tokenizer.json pre-tokenizer regex"
    assert any("--pre-tokenizer" in w for w in warnings)  # unknown to llama.cpp's hash: the user is told
    assert len(meta["tokenizer.ggml.merges"]) > 0 and "tokenizer.ggml.scores" not in meta
    ids = hf_ids(llama_bpe)
    got, llm = llama_cpp_run(out, ids)
    assert llm.tokenize(PROMPT.encode(), add_bos=False, special=False) == ids
    assert np.abs(got - hf_logits(llama_bpe, ids)).max() < 1e-3


def test_llama_tied_embeddings(tiny_llama_tied, tmp_path, llama_cpp_run, hf_logits):
    out = tmp_path / "tied.gguf"
    result, _ = export(tiny_llama_tied, out, "f32")
    assert "output.weight" not in result.tensor_types
    meta = read_metadata(out)
    assert meta["llama.attention.head_count_kv"] == meta["llama.attention.head_count"] == 4
    ids = hf_ids(tiny_llama_tied)
    got, _ = llama_cpp_run(out, ids)
    assert np.abs(got - hf_logits(tiny_llama_tied, ids)).max() < 1e-3


def test_bloom_f32_matches_transformers(bloom, tmp_path, llama_cpp_run, hf_logits, monkeypatch):
    out = tmp_path / "bloom-f32.gguf"
    result, warnings = export(bloom, out, "f32")
    assert result.tokenizer.pre == "bloom" and any("--pre-tokenizer" in w for w in warnings)
    assert "output.weight" not in result.tensor_types and "token_embd_norm.bias" in result.tensor_types
    ids = hf_ids(bloom)
    got, llm = llama_cpp_run(out, ids)
    assert llm.tokenize(PROMPT.encode(), add_bos=False, special=False) == ids
    plain = hf_logits(bloom, ids)
    assert (got.argmax(-1) == plain.argmax(-1)).all()
    # llama.cpp's CPU GELU reads an fp16 table (fp16(gelu(fp16(x)))), worth ~2e-3 here; with the
    # same rounding in the reference, what is left is the file's own fidelity.
    import transformers.models.bloom.modeling_bloom as modeling

    monkeypatch.setattr(
        modeling.BloomGelu, "forward", lambda self, x: modeling.bloom_gelu_forward(x.half().float()).half().float()
    )
    assert np.abs(got - hf_logits(bloom, ids)).max() < 1e-3


# ---------------------------------------------------------------- vocabulary


def test_expanded_vocab_and_special_tokens(yayi_bloom, tmp_path, llama_cpp_run):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(yayi_bloom)
    out = tmp_path / "yayi.gguf"
    result, warnings = export(yayi_bloom, out, "f16")
    assert any("--pre-tokenizer" in w and "bloom" in w for w in warnings)
    meta = read_metadata(out)
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    assert len(tokens) == 416 and meta["tokenizer.ggml.eos_token_id"] == 2
    assert meta["tokenizer.chat_template"] == tok.chat_template and "<|YaYi|>" in tok.chat_template
    end = tok.convert_tokens_to_ids("<|End|>")
    assert tokens[end] == "<|End|>" and types[end] == TokenType.CONTROL
    added = tok.convert_tokens_to_ids("weightops")
    assert types[added] == TokenType.USER_DEFINED
    assert tokens[415] == "[PAD415]" and types[415] == TokenType.UNUSED and result.tokenizer.padding == 416 - len(tok)

    _, llm = llama_cpp_run(out, [1])
    assert llm.n_vocab() == 416
    assert llm.tokenize(b"<|End|>", add_bos=False, special=True) == [end]
    text = "<|Human|>hello world<|End|>"
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok(text)["input_ids"]


def test_sentencepiece_added_tokens(tiny_llama, tmp_path, llama_cpp_run):
    """An expanded SentencePiece LLaMA saved by transformers 5 (added tokens only in tokenizer.json):
    the special token is CONTROL and one token in llama.cpp, the added word USER_DEFINED."""
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = tmp_path / "model"
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    tok.add_special_tokens({"additional_special_tokens": ["<|End|>"]})
    tok.add_tokens(["weightops"])
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    model.resize_token_embeddings(416, mean_resizing=False)
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    shutil.copyfile(tiny_llama / "tokenizer.model", model_dir / "tokenizer.model")
    out = tmp_path / "spm.gguf"
    result, _ = export(model_dir, out, "f16")
    meta = read_metadata(out)
    end, word = tok.convert_tokens_to_ids("<|End|>"), tok.convert_tokens_to_ids("weightops")
    assert meta["tokenizer.ggml.token_type"][end] == TokenType.CONTROL
    assert meta["tokenizer.ggml.token_type"][word] == TokenType.USER_DEFINED
    assert meta["tokenizer.ggml.scores"][415] == -10000.0 and result.tokenizer.padding == 416 - len(tok)
    _, llm = llama_cpp_run(out, [1])
    assert llm.n_vocab() == 416
    text = "hello weightops<|End|>"
    assert llm.tokenize(text.encode(), add_bos=True, special=True) == tok(text)["input_ids"]


def test_pre_tokenizer_flag_and_too_small_embedding(bloom, tiny_llama, spm_tokenizer, bloom_tokenizer, tmp_path):
    result, warnings = export(bloom, tmp_path / "a.gguf", "f16", pre_tokenizer="gpt-2")
    assert result.tokenizer.pre == "gpt-2" and read_metadata(tmp_path / "a.gguf")["tokenizer.ggml.pre"] == "gpt-2"
    assert warnings == []
    # a tokenizer with more ids than the embedding has rows: refused, naming what to do
    from transformers import AutoTokenizer

    big = tmp_path / "bigtok"
    tok = AutoTokenizer.from_pretrained(bloom_tokenizer)
    tok.add_tokens(["extra-token"])
    tok.save_pretrained(big)
    with pytest.raises(WeightopsError, match="embedding has only 400 rows"):
        export(bloom, tmp_path / "b.gguf", "f16", tokenizer=big)
    assert not (tmp_path / "b.gguf").exists()


# ---------------------------------------------------------------- transformers reads them back


def _hf_view_of(name: str, values: torch.Tensor, arch: str, config: dict) -> tuple[str, torch.Tensor]:
    row, layer, _ = arch_tables.get(arch).lookup(name, "gguf")
    if row.to_gguf is Transform.ROTARY_Q:
        values = permute_interleaved_to_rotary(values, config["num_attention_heads"])
    elif row.to_gguf is Transform.ROTARY_K:
        values = permute_interleaved_to_rotary(values, config["num_key_value_heads"])
    elif row.to_gguf is Transform.QKV_SPLIT:
        values = fuse_qkv(*values.chunk(3), heads=config["n_head"])
    return row.hf.format(n=layer), values


@pytest.mark.parametrize("model_fixture,qtype", [("tiny_llama", "q8_0"), ("bloom", "q4_1")])
def test_transformers_reads_our_gguf(model_fixture, qtype, request, tmp_path):
    from transformers import AutoModelForCausalLM

    model = request.getfixturevalue(model_fixture)
    out = tmp_path / "m.gguf"
    result, _ = export(model, out, qtype)
    import json

    config = json.loads((model / "config.json").read_text())
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name).state_dict()
    reader = GGUFReader(out)
    assert {t.name for t in reader.tensors} == set(result.tensor_types)
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        values = torch.from_numpy(gguf.quants.dequantize(np.array(t.data), t.tensor_type).reshape(shape).copy())
        hf_name, hf_values = _hf_view_of(t.name, values, result.architecture, config)
        assert torch.equal(loaded[hf_name].float(), hf_values), t.name


# ---------------------------------------------------------------- exact bytes, types, metadata


def test_q8_0_blocks_are_llama_cpp_bytes(tiny_llama, tmp_path, load_all):
    """Each quantized tensor is gguf.quants.quantize (bit-exact with libggml) of the float32
    source values in llama.cpp's layout: quantized from the source, not from an F16 copy."""
    out = tmp_path / "q.gguf"
    export(tiny_llama, out, "q8_0")
    source = load_all(tiny_llama)
    stored = gguf_tensors(out)
    q = permute_rotary_to_interleaved(source["model.layers.1.self_attn.q_proj.weight"].float(), 4)
    k = permute_rotary_to_interleaved(source["model.layers.1.self_attn.k_proj.weight"].float(), 2)
    for name, values in [
        ("blk.1.attn_q.weight", q),
        ("blk.1.attn_k.weight", k),
        ("token_embd.weight", source["model.embed_tokens.weight"].float()),
        ("output.weight", source["lm_head.weight"].float()),
    ]:
        qtype, data = stored[name]
        assert qtype == Q.Q8_0
        assert np.array_equal(data, gguf.quants.quantize(values.numpy(), Q.Q8_0)), name


def test_blocks_equal_llama_cpp_quantizer(tiny_llama, tmp_path):
    """Our one-pass file holds exactly the blocks llama.cpp's own quantizer writes from an F32 file
    of the same model (llama-quantize --pure on F32 = quantizing from the source values)."""
    import ctypes

    llama_cpp = pytest.importorskip("llama_cpp")
    f32 = tmp_path / "f32.gguf"
    export(tiny_llama, f32, "f32")
    ftypes = {
        "q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
        "q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0,
        "q4_1": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_1,
        "q5_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_0,
        "q5_1": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_1,
    }
    for name, ftype in ftypes.items():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.nthread, params.pure = ftype, 2, True
        theirs_path, ours_path = tmp_path / f"llama-cpp-{name}.gguf", tmp_path / f"ours-{name}.gguf"
        assert llama_cpp.llama_model_quantize(str(f32).encode(), str(theirs_path).encode(), ctypes.byref(params)) == 0
        export(tiny_llama, ours_path, name, pure=True)
        theirs, ours = gguf_tensors(theirs_path), gguf_tensors(ours_path)
        assert set(theirs) == set(ours)
        for tensor, (qtype, data) in ours.items():
            assert qtype == theirs[tensor][0], (name, tensor)
            assert np.array_equal(data, theirs[tensor][1]), (name, tensor)
        assert sum(q == ggml_types.parse(name).ggml for q, _ in ours.values()) == 16  # every 2-D weight


def test_type_policy():
    shapes = [
        ("token_embd.weight", (400, 64)),
        ("blk.0.attn_norm.weight", (64,)),
        ("blk.0.attn_qkv.bias", (192,)),
        ("blk.0.ffn_down.weight", (64, 128)),
        ("blk.0.attn_v.weight", (32, 64)),
        ("output.weight", (400, 64)),
        ("blk.0.odd.weight", (64, 48)),
    ]
    warned: list[str] = []
    q8 = policy.assign_types(shapes, "q8_0", warn=warned.append)
    assert q8 == {
        "token_embd.weight": Q.Q8_0,
        "blk.0.attn_norm.weight": Q.F32,
        "blk.0.attn_qkv.bias": Q.F32,
        "blk.0.ffn_down.weight": Q.Q8_0,
        "blk.0.attn_v.weight": Q.Q8_0,
        "output.weight": Q.Q8_0,
        "blk.0.odd.weight": Q.F16,
    }
    assert len(warned) == 2 and "blk.0.odd.weight" in warned[0] and "falling back to f16" in warned[0]
    assert warned[1] == "1 of 7 tensor(s) required fallback quantization"
    model = policy.Model("llama", 1, 4, 2)  # llama-quantize's types: tests/pipelines/test_gguf_mixes.py
    pure = policy.assign_types(shapes, "q5_1", model=model, pure=True)
    assert pure["token_embd.weight"] == pure["output.weight"] == Q.Q5_1
    over = policy.assign_types(
        shapes,
        "q4_0",
        model=model,
        overrides=policy.parse_overrides(
            ["blk.*.ffn_down.weight=q8_0", "output.weight=f16", "*attn_v*=q5_0", "*attn_v*=q4_1"]
        ),
    )
    assert (over["blk.0.ffn_down.weight"], over["output.weight"], over["blk.0.attn_v.weight"]) == (
        Q.Q8_0,
        Q.F16,
        Q.Q5_0,  # the first matching pattern wins, as in llama-quantize
    )
    assert (
        int(policy.file_type("q4_0")) == 2
        and int(policy.file_type("bf16")) == 32
        and int(policy.file_type("q5_1")) == 9
        and int(policy.file_type("q8_0")) == 7
    )
    with pytest.raises(WeightopsError, match="GLOB=TYPE"):
        policy.parse_overrides(["q8_0"])


def test_metadata_keys_as_convert_hf_to_gguf(tiny_llama, tmp_path):
    out = tmp_path / "m.gguf"
    export(tiny_llama, out, "q8_0")
    meta = read_metadata(out)
    assert list(meta) == [
        "general.architecture",
        "general.type",
        "general.name",
        "general.size_label",
        "llama.block_count",
        "llama.context_length",
        "llama.embedding_length",
        "llama.feed_forward_length",
        "llama.attention.head_count",
        "llama.attention.head_count_kv",
        "llama.rope.freq_base",
        "llama.attention.layer_norm_rms_epsilon",
        "llama.attention.key_length",
        "llama.attention.value_length",
        "general.file_type",
        "llama.vocab_size",
        "llama.rope.dimension_count",
        "general.quantization_version",
        "tokenizer.ggml.model",
        "tokenizer.ggml.pre",
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.scores",
        "tokenizer.ggml.token_type",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.unknown_token_id",
        "tokenizer.ggml.add_bos_token",
        "tokenizer.ggml.add_sep_token",
    ]
    assert (meta["general.file_type"], meta["general.quantization_version"]) == (7, 2)
    assert (meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]) == (4, 2)
    assert (meta["llama.rope.dimension_count"], meta["llama.rope.freq_base"]) == (16, 10000.0)
    assert meta["tokenizer.ggml.token_type"][:4] == [
        TokenType.UNKNOWN,
        TokenType.CONTROL,
        TokenType.CONTROL,
        TokenType.BYTE,
    ]
    names = [t.name for t in GGUFReader(out).tensors]
    assert names[:3] == ["token_embd.weight", "blk.0.attn_norm.weight", "blk.0.attn_q.weight"]
    assert names[-2:] == ["output_norm.weight", "output.weight"]
    assert all(t.data_offset % 32 == 0 for t in GGUFReader(out).tensors)


def test_writer_streams_and_fails_cleanly(tmp_path):
    """The writer asks for each tensor's bytes only while writing (never all at once), and a
    failing or short tensor leaves no output and no temporary file behind."""
    from weightops.io.gguf import GGUFTensor, plan_writer, write_gguf

    live, peak = [0], [0]

    def tensor(name: str, fail: str | None = None) -> GGUFTensor:
        def produce():
            if fail == "raise":
                raise RuntimeError(f"cannot read {name}")
            live[0] += 1
            peak[0] = max(peak[0], live[0])
            yield np.full(64 * 32 if fail != "short" else 10, 7, dtype=np.float32)

        def release():
            live[0] -= 1

        return GGUFTensor(name, (64, 32), Q.F32, produce, release)

    good = [tensor(f"t{i}.weight") for i in range(6)]
    out = tmp_path / "ok.gguf"
    write_gguf(plan_writer("llama", good), good, out)
    assert [t.name for t in GGUFReader(out).tensors] == [t.name for t in good]
    assert peak[0] == 1  # one tensor at a time, never the whole model
    for fail, match in (("raise", "cannot read t1.weight"), ("short", "produced 40 bytes, expected 8192")):
        bad = [tensor("t0.weight"), tensor("t1.weight", fail), tensor("t2.weight")]
        with pytest.raises((RuntimeError, WeightopsError), match=match):
            write_gguf(plan_writer("llama", bad), bad, tmp_path / "bad.gguf")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.gguf"]


def test_old_config_gets_transformers_defaults(tiny_llama, tmp_path):
    """A config.json missing keys (older transformers: no head_dim, no rope_parameters) is completed
    with transformers' defaults, as convert_hf_to_gguf.py's AutoConfig does: same file."""
    import json
    import shutil

    old = tmp_path / "old" / tiny_llama.name  # general.name comes from the directory name
    shutil.copytree(tiny_llama, old)
    config = json.loads((old / "config.json").read_text())
    del config["head_dim"], config["rope_parameters"]
    (old / "config.json").write_text(json.dumps(config))
    export(tiny_llama, tmp_path / "a.gguf", "f16")
    export(old, tmp_path / "b.gguf", "f16")
    assert read_metadata(tmp_path / "b.gguf")["llama.attention.key_length"] == 16
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()


@pytest.mark.parametrize("qtype", ["q4_1", "bf16"])
def test_deterministic_bytes(tiny_llama, tmp_path, monkeypatch, qtype):
    """Same input, same bytes, also when tensors are encoded a few rows at a time."""
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    export(tiny_llama, a, qtype)
    monkeypatch.setattr("weightops.pipelines.gguf.CHUNK_ELEMENTS", 100)  # 1 row of 64 values per slab
    export(tiny_llama, b, qtype)
    assert hashlib.sha256(a.read_bytes()).digest() == hashlib.sha256(b.read_bytes()).digest()


@pytest.mark.parametrize("model_fixture", ["tiny_llama", "bloom"])
def test_tencentpretrain_to_gguf_in_one_pass(model_fixture, request, tmp_path):
    """A TencentPretrain checkpoint (interleaved q/k, split QKV) gives the same GGUF tensors as
    its HF original, with no HF checkpoint written in between."""
    import json

    from weightops.io.checkpoint import open_checkpoint
    from weightops.io.remap import tp_view
    from weightops.io.tencentpretrain import write_tp

    model = request.getfixturevalue(model_fixture)
    refs, tp_config = tp_view(open_checkpoint(model))
    tp_dir = tmp_path / "tp"
    tp_dir.mkdir()
    (tmp_path / "tp_config.json").write_text(json.dumps(tp_config))
    [tp_file] = write_tp(refs, tp_dir, None)
    from_hf, from_tp = tmp_path / "hf.gguf", tmp_path / "tp.gguf"
    export(model, from_hf, "q8_0")
    result, _ = export(tp_file, from_tp, "q8_0", tp_config=tmp_path / "tp_config.json", tokenizer=model)
    a, b = gguf_tensors(from_hf), gguf_tensors(from_tp)
    assert list(a) == list(b) == list(result.tensor_types)
    for name in a:
        assert a[name][0] == b[name][0] and np.array_equal(a[name][1], b[name][1]), name


# ---------------------------------------------------------------- command line


def test_cli(cli, tiny_llama, tmp_path):
    out = tmp_path / "x.gguf"
    r = cli("gguf", tiny_llama, out, "--type", "q5_0", "--pure", "--tensor-type", "output.weight=q8_0")
    assert r.exit_code == 0, r.output
    assert "Q5_0" in r.stdout and str(out) in r.stdout
    assert {t.name: t.tensor_type for t in GGUFReader(out).tensors}["output.weight"] == Q.Q8_0
    r = cli("gguf", tiny_llama, out, "--type", "q5_0")
    assert r.exit_code == 1 and "--force" in r.stderr
    r = cli("gguf", tiny_llama, tmp_path / "y.gguf", "--tensor-type", "q8_0")
    assert r.exit_code == 1 and "GLOB=TYPE" in r.stderr
    if not torch.cuda.is_available():
        r = cli("gguf", tiny_llama, tmp_path / "z.gguf", "--device", "cuda")
        assert r.exit_code == 1 and "no CUDA device" in r.stderr
