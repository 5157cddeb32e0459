"""merge-lora against PEFT's merge_and_unload (and TencentPretrain's merge formula) on the tiny
models: adapters made with PEFT itself (get_peft_model, random lora_B, save_pretrained)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from weightops import tiny
from weightops.pipelines.convert import convert_checkpoint
from weightops.pipelines.merge_lora import merge_lora

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore")


def make_adapter(base: Path, out: Path, seed: int, *, rows: int | None = None, **config) -> Path:
    """A PEFT adapter of `base` (resized to `rows` first) with non-trivial factors."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    if rows is not None:
        model.resize_token_embeddings(rows, mean_resizing=False)
    model = peft.get_peft_model(model, peft.LoraConfig(**config))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_embedding" in name:
                p.normal_(0, 0.3)
            elif "magnitude" in name:
                p.mul_(1.2)
            elif "modules_to_save" in name:
                p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(out)
    return out


def peft_merged(base: Path, adapters: list[Path], rows: int | None = None) -> dict[str, torch.Tensor]:
    """PEFT's result: each adapter loaded with from_pretrained and merged, in turn."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    if rows is not None:
        model.resize_token_embeddings(rows, mean_resizing=False)
    for adapter in adapters:
        model = peft.PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return {k: v.clone() for k, v in model.state_dict().items()}


def weights(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(f))
    return out


LLAMA = dict(
    r=4,
    lora_alpha=8,
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    rank_pattern={"down_proj": 2},
    alpha_pattern={"q_proj": 16},
    use_rslora=True,
    exclude_modules=["model.layers.0.mlp.up_proj"],
)
LLAMA_LAYER1_DORA = dict(r=2, lora_alpha=4, target_modules=["q_proj", "o_proj"], layers_to_transform=[1], use_dora=True)
BLOOM = dict(r=4, lora_alpha=16, target_modules=["query_key_value", "dense_4h_to_h"], lora_bias=True, bias="all")
BLOOM_DORA = dict(r=4, lora_alpha=8, target_modules=["query_key_value", "dense_h_to_4h"], use_dora=True)


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("qwen2")
    return tiny.tiny_qwen2(d / "model", tiny.qwen2_tokenizer_dir(d / "tokenizer"), tied=False)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_llama, tiny_bloom, qwen2) -> dict[str, tuple[Path, Path]]:
    """name -> (base, adapter)."""
    d = tmp_path_factory.mktemp("adapters")
    return {
        "llama": (tiny_llama, make_adapter(tiny_llama, d / "llama", 1, **LLAMA)),
        "llama_dora_layer1": (tiny_llama, make_adapter(tiny_llama, d / "llama_dora", 2, **LLAMA_LAYER1_DORA)),
        "bloom_bias": (tiny_bloom, make_adapter(tiny_bloom, d / "bloom", 3, **BLOOM)),
        "bloom_dora": (tiny_bloom, make_adapter(tiny_bloom, d / "bloom_dora", 4, **BLOOM_DORA)),
        "qwen2": (qwen2, make_adapter(qwen2, d / "qwen2", 5, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
    }


@pytest.mark.parametrize("case", ["llama", "llama_dora_layer1", "bloom_bias", "bloom_dora", "qwen2"])
def test_peft_rounding_is_merge_and_unload(case, adapters, tmp_path) -> None:
    base, adapter = adapters[case]
    report = merge_lora(base, [adapter], tmp_path / "out", rounding="peft")
    got, expected = weights(tmp_path / "out"), peft_merged(base, [adapter])
    changed = [n for n, t in expected.items() if n in got and not torch.equal(t, weights(base).get(n, t))]
    assert changed and report.merged
    for name, t in expected.items():
        if name == "lm_head.weight" and name not in got:  # a tied head stays tied
            assert json.loads((tmp_path / "out" / "config.json").read_text()).get("tie_word_embeddings", True)
            continue
        assert got[name].dtype == t.dtype
        assert torch.equal(got[name], t), f"{case}: {name} differs from PEFT's merge_and_unload"


def test_patterns_and_layer_selection_reach_the_right_modules(adapters) -> None:
    """The cases above are only meaningful if the patterns made a difference: the saved ranks
    follow rank_pattern, the excluded module and layer 0 of the layer-1 adapter hold no factors."""
    saved = load_file(adapters["llama"][1] / "adapter_model.safetensors")
    assert saved["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"].shape[0] == 2
    assert not any("layers.0.mlp.up_proj" in k for k in saved)
    layer1 = load_file(adapters["llama_dora_layer1"][1] / "adapter_model.safetensors")
    assert layer1 and all(".layers.1." in k for k in layer1)


def test_once_is_the_chinese_llama_formula(adapters, tmp_path) -> None:
    """`once`: W += transpose(B.float() @ A.float()) * scaling on the bf16 weight, in place,
    with the scaling from the adapter's config (rsLoRA, patterns): bit for bit, and within one
    bf16 rounding of the exact result."""
    base, adapter = adapters["llama"]
    merge_lora(base, [adapter], tmp_path / "out")
    got, before = weights(tmp_path / "out"), weights(base)
    saved = load_file(adapter / "adapter_model.safetensors")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    checked = 0
    for key, a in saved.items():
        if not key.endswith("lora_A.weight"):
            continue
        module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        b = saved[key.replace("lora_A", "lora_B")]
        kind = module.rsplit(".", 1)[-1]
        r = cfg["rank_pattern"].get(kind, cfg["r"])
        scaling = cfg["alpha_pattern"].get(kind, cfg["lora_alpha"]) / r**0.5
        w = before[module + ".weight"].clone()
        w += (b.float() @ a.float()) * scaling
        assert torch.equal(got[module + ".weight"], w), module
        exact = before[module + ".weight"].double() + (b.double() @ a.double()) * scaling
        ulp = torch.finfo(torch.bfloat16).eps * exact.abs().clamp(min=2**-126)
        assert ((got[module + ".weight"].double() - exact).abs() <= ulp).all()
        checked += 1
    assert checked == 13  # 2 layers x 7 linears, less the excluded one


def test_two_adapters_apply_in_order(adapters, tmp_path) -> None:
    """Chinese-Alpaca-Plus style: the second adapter (DoRA: it sees the first merge's result)
    applies to the first one's result, as two PEFT merges in turn; the other order differs."""
    base, first = adapters["llama"]
    second = adapters["llama_dora_layer1"][1]
    merge_lora(base, [first, second], tmp_path / "ab", rounding="peft")
    expected = peft_merged(base, [first, second])
    got = weights(tmp_path / "ab")
    assert all(torch.equal(got[n], t) for n, t in expected.items())
    merge_lora(base, [second, first], tmp_path / "ba", rounding="peft")
    q = "model.layers.1.self_attn.q_proj.weight"
    assert not torch.equal(weights(tmp_path / "ba")[q], got[q])


@pytest.fixture(scope="module")
def plus_adapter(tmp_path_factory, tiny_llama, merged_llama) -> tuple[Path, int]:
    """A Chinese-LLaMA-Plus-like adapter: the vocabulary expanded (merged_llama's tokenizer),
    embed_tokens and lm_head trained whole (modules_to_save), LoRA on the attention."""
    rows = weights(merged_llama)["model.embed_tokens.weight"].shape[0]
    out = make_adapter(
        tiny_llama,
        tmp_path_factory.mktemp("plus") / "adapter",
        6,
        rows=rows,
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        modules_to_save=["embed_tokens", "lm_head"],
    )
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (merged_llama / name).is_file():
            shutil.copyfile(merged_llama / name, out / name)
    return out, rows


def test_vocabulary_expanding_adapter(tiny_llama, plus_adapter, tmp_path, hf_logits) -> None:
    adapter, rows = plus_adapter
    report = merge_lora(tiny_llama, [adapter], tmp_path / "out", rounding="peft")
    assert report.vocab == (400, rows) and rows > 400
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["vocab_size"] == rows
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (adapter / "tokenizer.json").read_bytes()
    expected = peft_merged(tiny_llama, [adapter], rows=rows)
    got = weights(tmp_path / "out")
    assert all(torch.equal(got[n], t) for n, t in expected.items())
    from transformers import AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(tmp_path / "out")) <= rows
    ids = list(range(1, 40)) + [rows - 1]
    merge_lora(tiny_llama, [adapter], tmp_path / "out32", dtype=torch.float32)  # no bf16 rounding in the way
    ours = hf_logits(tmp_path / "out32", ids)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    model.resize_token_embeddings(rows, mean_resizing=False)
    model = peft.PeftModel.from_pretrained(model, adapter)
    with torch.no_grad():
        theirs = model(torch.tensor([ids])).logits[0].numpy()
    assert ours.shape == theirs.shape and abs(ours - theirs).max() < 1e-3


def test_tied_embedding_lora_unties_the_head(tiny_llama_tied, tmp_path, hf_logits) -> None:
    """LoRA on a tied embedding: the head keeps the weights it was trained with (the base's),
    so the output is untied; PEFT's merge would change both (they share one tensor)."""
    targets = ["embed_tokens", "q_proj"]
    adapter = make_adapter(tiny_llama_tied, tmp_path / "adapter", 7, r=4, lora_alpha=8, target_modules=targets)
    report = merge_lora(tiny_llama_tied, [adapter], tmp_path / "out", rounding="peft")
    assert report.untied
    got, base = weights(tmp_path / "out"), weights(tiny_llama_tied)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False
    assert torch.equal(got["lm_head.weight"], base["model.embed_tokens.weight"])
    expected = peft_merged(tiny_llama_tied, [adapter])
    assert torch.equal(got["model.embed_tokens.weight"], expected["model.embed_tokens.weight"])
    from transformers import AutoModelForCausalLM

    ids = list(range(1, 30))
    base32 = AutoModelForCausalLM.from_pretrained(tiny_llama_tied, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base32, adapter)
    with torch.no_grad():
        unmerged = model(torch.tensor([ids])).logits[0].numpy()
    merge_lora(tiny_llama_tied, [adapter], tmp_path / "out32", dtype=torch.float32)
    assert abs(hf_logits(tmp_path / "out32", ids) - unmerged).max() < 1e-3  # the trained model's outputs


def test_tied_head_stays_tied_when_untouched(tiny_llama_tied, tmp_path) -> None:
    adapter = make_adapter(tiny_llama_tied, tmp_path / "adapter", 8, r=2, lora_alpha=4, target_modules=["v_proj"])
    report = merge_lora(tiny_llama_tied, [adapter], tmp_path / "out")
    assert not report.untied and "lm_head.weight" not in weights(tmp_path / "out")


# --- TencentPretrain adapters ---------------------------------------------------------------------

TP_R, TP_ALPHA = 4, 16.0


@pytest.fixture(scope="module", params=["tiny_llama_mha", "tiny_bloom"])
def tp_case(request, tmp_path_factory) -> tuple[Path, Path, Path]:
    """(HF base, its TencentPretrain conversion, a TencentPretrain LoRA file on Q and V): LLaMA's
    Q rows are interleaved there, BLOOM's Q and V are rows of the fused query_key_value."""
    hf = request.getfixturevalue(request.param)
    d = tmp_path_factory.mktemp("tp_lora")
    convert_checkpoint(hf, d / "base", to="tencentpretrain")
    torch.manual_seed(9)
    state = {}
    for layer in range(2):
        for linear in (0, 2):  # TencentPretrain's LoraLinear: Q and V
            name = f"encoder.transformer.{layer}.self_attn.linear_layers.{linear}"
            state[f"{name}.lora_A"] = torch.randn(TP_R, 64)
            state[f"{name}.lora_B"] = 0.3 * torch.randn(64, TP_R)
    torch.save(state, d / "lora.bin")
    return hf, d / "base", d / "lora.bin"


def test_tencentpretrain_adapter_is_its_own_merge_formula(tp_case, tmp_path) -> None:
    """On a TencentPretrain base: `W += (B @ A) * alpha / r` on TencentPretrain's rows (LoraLinear.eval),
    computed in float32 and rounded once; the HF output converted back gives exactly that. On the
    HF base the same adapter's Q rows are permuted to rotate-half order: the same model."""
    hf, base, lora = tp_case
    merge_lora(base, [lora], tmp_path / "from_tp", tp_lora_r=TP_R, tp_lora_alpha=TP_ALPHA)
    convert_checkpoint(tmp_path / "from_tp", tmp_path / "back", to="tencentpretrain")
    ours = torch.load(tmp_path / "back" / "tencentpretrain_model.bin", weights_only=True)
    tp_base = torch.load(next(base.glob("*.bin")), weights_only=True)
    state = torch.load(lora, weights_only=True)
    for name, w in tp_base.items():
        module = name.removesuffix(".weight")
        if f"{module}.lora_A" in state:
            delta = (state[f"{module}.lora_B"] @ state[f"{module}.lora_A"]) * (TP_ALPHA / TP_R)
            w = (w.float() + delta).to(w.dtype)
        assert torch.equal(ours[name], w), name
    merge_lora(hf, [lora], tmp_path / "from_hf", tp_lora_r=TP_R, tp_lora_alpha=TP_ALPHA)
    from_hf, from_tp = weights(tmp_path / "from_hf"), weights(tmp_path / "from_tp")
    assert from_hf.keys() == from_tp.keys() and all(torch.equal(from_hf[k], from_tp[k]) for k in from_hf)


# --- composition ----------------------------------------------------------------------------------


def test_gguf_with_lora_equals_merge_then_gguf(adapters, tmp_path) -> None:
    gguf = pytest.importorskip("gguf")
    from weightops.pipelines.gguf import export_gguf

    base, adapter = adapters["llama"]
    export_gguf(base, tmp_path / "one-pass.gguf", type="q8_0", lora=[adapter])
    merge_lora(base, [adapter], tmp_path / "merged")
    export_gguf(tmp_path / "merged", tmp_path / "two-pass.gguf", type="q8_0")
    one, two = (gguf.GGUFReader(tmp_path / n) for n in ("one-pass.gguf", "two-pass.gguf"))
    assert [t.name for t in one.tensors] == [t.name for t in two.tensors]
    for a, b in zip(one.tensors, two.tensors, strict=True):
        assert a.tensor_type == b.tensor_type and bytes(a.data) == bytes(b.data), a.name
    plain = gguf.GGUFReader(export_gguf(base, tmp_path / "plain.gguf", type="q8_0").output)
    q = "blk.0.attn_q.weight"
    data = {r: bytes(next(t for t in r.tensors if t.name == q).data) for r in (plain, one)}
    assert data[plain] != data[one]  # the adapter changed it


def test_cli_merge_lora(adapters, cli, tmp_path) -> None:
    base, adapter = adapters["llama"]
    result = cli("merge-lora", base, adapter, tmp_path / "out", "--dtype", "float16")
    assert result.exit_code == 0, result.output
    assert "13 tensors merged" in result.stdout
    got = weights(tmp_path / "out")
    assert {t.dtype for t in got.values()} == {torch.float16}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "float16"


def test_job_steps(adapters, tmp_path) -> None:
    """merge-lora and gguf --lora are job steps whose adapters may be inputs or earlier outputs."""
    from weightops import jobs

    base, first = adapters["llama"]
    second = adapters["llama_dora_layer1"][1]
    job = tmp_path / "job.toml"
    job.write_text(
        f"""[job]
name = "lora"
output = "release"

[inputs]
base = "{base}"
plus = "{first}"
alpaca = "{second}"

[[steps]]
name = "merged"
op = "merge-lora"
base = "@base"
adapters = ["@plus", "@alpaca"]
output = "merged"
rounding = "peft"

[[steps]]
name = "q8"
op = "gguf"
model = "@base"
output = "q8.gguf"
lora = ["@plus", "@alpaca"]
type = "q8_0"
"""
    )
    merged, q8 = jobs.load_job(job).steps
    out = tmp_path / "release"
    assert merged.argv == ["merge-lora", str(base), str(first), str(second), str(out / "merged"), "--rounding", "peft"]
    assert q8.argv[q8.argv.index("--lora") :][:4] == ["--lora", str(first), "--lora", str(second)]
