"""`weightops bnb` writes exactly what transformers saves after quantizing with
BitsAndBytesConfig, and the result loads and runs like transformers' in-memory model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("bitsandbytes")
pytest.importorskip("accelerate")

from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

from weightops.pipelines.bnb import export_bnb  # noqa: E402
from weightops.quant import bnb as bnb_lib  # noqa: E402

# label -> (our options, BitsAndBytesConfig arguments)
SPECS = {
    "int8": (["--bits", "8"], dict(load_in_8bit=True)),
    "nf4": (["--bits", "4", "--quant-type", "nf4"], dict(load_in_4bit=True, bnb_4bit_quant_type="nf4")),
    "nf4-dq-bf16": (
        ["--bits", "4", "--double-quant", "--compute-dtype", "bfloat16"],
        dict(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        ),
    ),
    "fp4": (["--bits", "4", "--quant-type", "fp4"], dict(load_in_4bit=True, bnb_4bit_quant_type="fp4")),
    "fp4-dq": (
        ["--bits", "4", "--quant-type", "fp4", "--double-quant"],
        dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True),
    ),
}
IDS = torch.randint(4, 400, (1, 32), generator=torch.Generator().manual_seed(0))


def _logits(model) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=IDS).logits[0].float()


def _transformers(src: Path, out: Path, max_shard_size: str = "5GB", **bnb_args) -> torch.Tensor:
    """transformers' own path: quantize while loading, save_pretrained; its in-memory logits."""
    model = AutoModelForCausalLM.from_pretrained(
        src, quantization_config=BitsAndBytesConfig(**bnb_args), device_map="cpu"
    )
    model.save_pretrained(out, max_shard_size=max_shard_size)
    return _logits(model)


def _assert_same_tensors(ours: dict, theirs: dict) -> None:
    assert sorted(ours) == sorted(theirs)
    for name in theirs:
        assert ours[name].dtype == theirs[name].dtype, name
        assert ours[name].shape == theirs[name].shape, name
        assert torch.equal(ours[name], theirs[name]), name


def _config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


@pytest.fixture(scope="module")
def models(tiny_llama, tiny_bloom) -> dict[str, Path]:
    return {"llama": tiny_llama, "bloom": tiny_bloom}


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    """Two short prompts (English, Chinese) for `weightops verify`."""
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text(
        "the quick brown fox jumps over the lazy dog model weights tensor stream merge delta\n\n"
        "我们发布了中文模型的权重和词表扩展以及量化版本今天天气很好\n"
    )
    return path


@pytest.mark.parametrize("label", list(SPECS))
@pytest.mark.parametrize("arch", ["llama", "bloom"])
def test_identical_to_transformers(arch, label, models, prompts, tmp_path, cli, load_all, kld_report):
    src = models[arch]
    options, bnb_args = SPECS[label]
    theirs_logits = _transformers(src, tmp_path / "theirs", **bnb_args)

    r = cli("bnb", src, tmp_path / "ours", *options)
    assert r.exit_code == 0, r.output

    ours, theirs = load_all(tmp_path / "ours"), load_all(tmp_path / "theirs")
    _assert_same_tensors(ours, theirs)
    quantized = [n for n in ours if n.endswith(".SCB") or n.endswith(".weight.absmax")]
    assert len(quantized) == {"llama": 14, "bloom": 8}[arch]  # 7 / 4 linears per layer, 2 layers
    assert not any(n.startswith("lm_head.") and n != "lm_head.weight" for n in ours)
    assert _config(tmp_path / "ours") == _config(tmp_path / "theirs")
    assert _config(tmp_path / "ours")["quantization_config"]["quant_method"] == "bitsandbytes"

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ours")  # no extra arguments
    layer_cls = {"int8": "Linear8bitLt"}.get(label, "Linear4bit")
    assert sum(type(m).__name__ == layer_cls for m in reloaded.modules()) == len(quantized)
    ours_logits = _logits(reloaded)
    assert torch.equal(ours_logits, theirs_logits)

    # KLD vs the original through `weightops verify` (gate opened: tiny random models quantize badly).
    # bf16, the model's dtype: transformers 5.23 loads a pre-quantized BLOOM with dtype=float32 half
    # cast (LayerNorm weights bf16, biases fp32) and cannot run it, whoever wrote the file.
    r = cli(
        "verify",
        src,
        tmp_path / "ours",
        "--device",
        "cpu",
        "--dtype",
        "bfloat16",
        "--prompts",
        prompts,
        "--max-kld",
        "100",
        "--min-top1",
        "0",
        "--json",
        tmp_path / "verify.json",
    )
    assert r.exit_code == 0, r.output
    v = json.loads((tmp_path / "verify.json").read_text())
    assert v["thresholds"]["candidate_kind"] == {"int8": "int8", "nf4": "q4", "fp4": "low"}[label.split("-")[0]]
    print(
        f"{arch} {label}: weightops verify: KLD mean {v['kld_mean']:.6f} max {v['kld_max']:.6f} "
        f"top-1 {v['top1_agreement']:.1%} over {v['tokens']} tokens"
    )
    kld_report[f"{arch} {label}"] = (v["kld_mean"], v["kld_max"], v["top1_agreement"], v["tokens"])
    assert 0 < v["kld_mean"] < float("inf")  # quantized, and still a distribution


def test_skip_is_recorded_so_loading_keeps_it(tiny_llama, tmp_path, cli, load_all):
    r = cli("bnb", tiny_llama, tmp_path / "ours", "--bits", "8", "--skip", "*.mlp.down_proj.weight")
    assert r.exit_code == 0, r.output
    assert "2 kept by --skip" in r.stdout
    skip = ["lm_head", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert _config(tmp_path / "ours")["quantization_config"]["llm_int8_skip_modules"] == skip
    theirs_logits = _transformers(tiny_llama, tmp_path / "theirs", load_in_8bit=True, llm_int8_skip_modules=skip)
    ours = load_all(tmp_path / "ours")
    _assert_same_tensors(ours, load_all(tmp_path / "theirs"))
    assert ours["model.layers.1.mlp.down_proj.weight"].dtype == torch.bfloat16
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ours")
    assert type(reloaded.model.layers[1].mlp.down_proj) is torch.nn.Linear
    assert type(reloaded.model.layers[1].mlp.up_proj).__name__ == "Linear8bitLt"
    assert torch.equal(_logits(reloaded), theirs_logits)


def test_sharded_output_matches_save_pretrained(tiny_llama, tmp_path, cli):
    """Shards, index and its total_parameters as save_pretrained writes them; double quant's
    variable-length quant states are sized before the shard headers are written."""
    _transformers(
        tiny_llama,
        tmp_path / "theirs",
        "40KB",
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
    )
    r = cli("bnb", tiny_llama, tmp_path / "ours", "--bits", "4", "--double-quant", "--max-shard-size", "40KB")
    assert r.exit_code == 0, r.output
    names = sorted(p.name for p in (tmp_path / "theirs").glob("model*"))
    assert len(names) > 3 and names == sorted(p.name for p in (tmp_path / "ours").glob("model*"))
    for name in names:
        assert (tmp_path / "ours" / name).read_bytes() == (tmp_path / "theirs" / name).read_bytes(), name


def test_streams_one_weight_at_a_time_and_is_deterministic(tiny_bloom, tmp_path, monkeypatch):
    """Each weight is quantized once, its result is dropped once written, and never more than
    one weight's result is alive; two runs give the same bytes."""
    calls, alive, peak = [], [], [0]
    quantize, take = bnb_lib.quantize_tensor, bnb_lib._Quantized.take

    def counting_quantize(weight, spec, nested_offset=None):
        if not weight.is_meta and weight.numel() > bnb_lib.BLOCKSIZE:
            calls.append(tuple(weight.shape))
        return quantize(weight, spec, nested_offset)

    def tracking_take(self, suffix):
        if self not in alive:
            alive.append(self)
        out = take(self, suffix)
        peak[0] = max(peak[0], sum(q._parts is not None for q in alive))
        return out

    monkeypatch.setattr(bnb_lib, "quantize_tensor", counting_quantize)
    monkeypatch.setattr(bnb_lib._Quantized, "take", tracking_take)
    report = export_bnb(tiny_bloom, tmp_path / "a", bits=4, double_quant=True, device="cpu", max_shard_size="30KB")
    assert len(calls) == len(report.quantized) == 8
    assert peak[0] == 1 and all(q._parts is None for q in alive)
    export_bnb(tiny_bloom, tmp_path / "b", bits=4, double_quant=True, device="cpu", max_shard_size="30KB")
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_errors_name_the_problem(tiny_llama, tmp_path, cli):
    r = cli("bnb", tiny_llama, tmp_path / "x", "--bits", "8", "--skip", "*.no_such_proj.weight")
    assert r.exit_code == 1 and "'*.no_such_proj.weight' matches no linear weight" in r.stderr
    r = cli("bnb", tiny_llama, tmp_path / "x", "--bits", "8", "--double-quant")
    assert r.exit_code == 2 and "--double-quant applies to --bits 4 only" in r.output
    assert cli("bnb", tiny_llama, tmp_path / "q", "--bits", "8").exit_code == 0
    r = cli("bnb", tmp_path / "q", tmp_path / "x", "--bits", "4")
    assert r.exit_code == 1 and "already has a quantization_config" in r.stderr
    r = cli("bnb", tiny_llama, tmp_path / "q", "--bits", "4")
    assert r.exit_code == 1 and "--force" in r.stderr
    if not torch.cuda.is_available():
        r = cli("bnb", tiny_llama, tmp_path / "x", "--bits", "8", "--device", "cuda")
        assert r.exit_code == 1 and "no CUDA device" in r.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("shape", [(64, 128), (33, 70), (5, 3)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_planned_layout_is_what_bitsandbytes_produces(shape, dtype):
    """The header is written from the plan (meta kernels + predicted nested offset) before
    any weight is quantized, so the plan must match the real result, partial blocks included."""
    w = (0.05 * torch.randn(shape, generator=torch.Generator().manual_seed(1))).to(dtype)
    for spec in (bnb_lib.BnbSpec(8), bnb_lib.BnbSpec(4, "nf4"), bnb_lib.BnbSpec(4, "fp4", double_quant=True)):
        offset = bnb_lib.absmax_mean(w) if spec.double_quant else None
        plan = bnb_lib.plan_tensor(shape, dtype, spec, offset)
        real = bnb_lib.quantize_tensor(w, spec)
        assert {k: (tuple(v.shape), v.dtype) for k, v in plan.items()} == {
            k: (tuple(v.shape), v.dtype) for k, v in real.items()
        }
        if spec.double_quant:
            state = real[f"weight.quant_state.bitsandbytes__{spec.quant_type}"]
            assert json.loads(bytes(state.tolist()))["nested_offset"] == offset


@pytest.mark.parametrize("label", ["int8", "nf4-dq-bf16"])
def test_tensors_are_cast_to_the_config_dtype_first(label, spm_tokenizer, tmp_path, cli, load_all):
    """float32 tensors whose config says float16: from_pretrained(dtype="auto") quantizes (and
    saves the rest) in float16, so we do too; the 4-bit quant state records float16."""
    from weightops import tiny

    src = tiny.tiny_llama(tmp_path / "src", spm_tokenizer, dtype=torch.float32, seed=3)
    cfg = _config(src)
    cfg["dtype"] = "float16"
    (src / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    options, bnb_args = SPECS[label]
    _transformers(src, tmp_path / "theirs", **bnb_args)
    assert cli("bnb", src, tmp_path / "ours", *options).exit_code == 0
    ours = load_all(tmp_path / "ours")
    _assert_same_tensors(ours, load_all(tmp_path / "theirs"))
    assert ours["model.embed_tokens.weight"].dtype == torch.float16
    assert _config(tmp_path / "ours") == _config(tmp_path / "theirs")


def test_bloom_without_the_transformer_prefix_gets_the_names_transformers_saves(tiny_bloom, tmp_path, cli, load_all):
    """Old BLOOM checkpoints omit `transformer.`; the loaded model (and so save_pretrained) has it."""
    from safetensors.torch import save_file

    src = tmp_path / "src"
    src.mkdir()
    for f in tiny_bloom.iterdir():
        if f.suffix == ".json":
            (src / f.name).write_bytes(f.read_bytes())
    tensors = {k.removeprefix("transformer."): v for k, v in load_all(tiny_bloom).items()}
    assert "h.0.self_attention.dense.weight" in tensors
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    _transformers(src, tmp_path / "theirs", load_in_8bit=True)
    assert cli("bnb", src, tmp_path / "ours", "--bits", "8").exit_code == 0
    _assert_same_tensors(load_all(tmp_path / "ours"), load_all(tmp_path / "theirs"))
