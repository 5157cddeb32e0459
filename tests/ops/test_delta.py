"""apply-delta / make-delta: exact round trips, vocabulary and --replace conventions, every
mismatch and guard rail, inputs sharded differently and in mixed formats, and fp16 equality
with the reference scripts' in-place `param += delta`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from weightops.dtypes import name_of
from weightops.errors import WeightopsError
from weightops.io.checkpoint import open_checkpoint, save_hf
from weightops.io.index import write_index
from weightops.io.torchbin import write_torch_bin
from weightops.ops.delta import make_delta
from weightops.pipelines import deltas
from weightops.stream import TensorRef


def _finetune(src: Path, dst: Path, *, seed: int, new_rows: int = 0) -> Path:
    """A 'fine-tuned' target: every weight nudged as training would, optionally with new
    vocabulary rows (transformers' resize_token_embeddings), saved with save_pretrained."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    with torch.no_grad():
        if new_rows:
            model.resize_token_embeddings(model.config.vocab_size + new_rows, mean_resizing=False)
        for p in model.parameters():
            p.add_((0.02 * torch.randn(p.shape)).to(p.dtype))
    model.save_pretrained(dst)
    for f in src.iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            shutil.copyfile(f, dst / f.name)
    return dst


@pytest.fixture(scope="module")
def llama_ft(tmp_path_factory, tiny_llama):
    return _finetune(tiny_llama, tmp_path_factory.mktemp("llama_ft") / "m", seed=10)


@pytest.fixture(scope="module")
def llama_ft_vocab(tmp_path_factory, tiny_llama):
    return _finetune(tiny_llama, tmp_path_factory.mktemp("llama_ft_vocab") / "m", seed=11, new_rows=32)


@pytest.fixture(scope="module")
def llama_tied_ft(tmp_path_factory, tiny_llama_tied):
    return _finetune(tiny_llama_tied, tmp_path_factory.mktemp("llama_tied_ft") / "m", seed=12)


@pytest.fixture(scope="module")
def bloom_ft(tmp_path_factory, tiny_bloom):
    return _finetune(tiny_bloom, tmp_path_factory.mktemp("bloom_ft") / "m", seed=13)


@pytest.fixture(scope="module")
def bloom_ft_vocab(tmp_path_factory, tiny_bloom):
    return _finetune(tiny_bloom, tmp_path_factory.mktemp("bloom_ft_vocab") / "m", seed=14, new_rows=32)


CASES = {
    "llama": ("tiny_llama", "llama_ft"),
    "llama-tied": ("tiny_llama_tied", "llama_tied_ft"),
    "bloom": ("tiny_bloom", "bloom_ft"),
    "llama-expanded-vocab": ("tiny_llama", "llama_ft_vocab"),
    "bloom-expanded-vocab": ("tiny_bloom", "bloom_ft_vocab"),
}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32}[t.dtype.itemsize])


def _assert_bit_equal(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape, name
        assert torch.equal(_bits(got[name]), _bits(t)), name


def _refs(tensors: dict, source: str = "memory") -> list[TensorRef]:
    return [TensorRef(k, tuple(v.shape), name_of(v.dtype), source, loader=lambda v=v: v) for k, v in tensors.items()]


def _save(tensors: dict, out: Path, like: Path, **kw) -> Path:
    """An HF directory holding `tensors`, with the config and tokenizer files of `like`."""
    save_hf(_refs(tensors), out, aux_files=open_checkpoint(like).aux_files, **kw)
    return out


# --- round trips and conventions -------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_float32_delta_round_trips_bit_for_bit(case, request, tmp_path, load_all):
    base, target = (request.getfixturevalue(n) for n in CASES[case])
    b, t = load_all(base), load_all(target)
    report = deltas.make_delta(base, target, tmp_path / "delta", dtype=torch.float32)
    assert report.warnings == [] and sum(d for d, _ in report.round_trip.values()) == 0
    delta = load_all(tmp_path / "delta")
    assert set(delta) == set(t)
    expanded = []
    for name, d in delta.items():
        n = b[name].shape[0]
        assert d.dtype == torch.float32
        assert torch.equal(d[:n], t[name][:n].float() - b[name].float()), name  # differences
        assert torch.equal(d[n:], t[name][n:].float()), name  # new vocabulary rows, as they are
        if d.shape[0] > n:
            expanded.append(name)
    assert sorted(report.expanded) == sorted(expanded)
    assert bool(expanded) == case.endswith("expanded-vocab")

    report = deltas.apply_delta(base, tmp_path / "delta", tmp_path / "out", dtype=torch.bfloat16)
    assert report.warnings == []
    _assert_bit_equal(load_all(tmp_path / "out"), t)
    out_cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert out_cfg["vocab_size"] == json.loads((target / "config.json").read_text())["vocab_size"]
    assert out_cfg["dtype"] == "bfloat16"  # an explicit --dtype is recorded in config.json
    for f in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "out" / f).read_bytes() == (target / f).read_bytes()


def test_16bit_delta_warns_with_the_fraction_that_does_not_round_trip(
    cli, tmp_path, tiny_llama, llama_ft_vocab, load_all
):
    report = deltas.make_delta(tiny_llama, llama_ft_vocab, tmp_path / "delta")  # auto: target's bf16
    b, t = load_all(tiny_llama), load_all(llama_ft_vocab)
    expected = {}
    for name, tt in t.items():  # oracle: whole tensors, plain torch
        n = b[name].shape[0]
        d = (tt[:n].float() - b[name].float()).bfloat16()
        back = torch.cat([(b[name].float() + d.float()).bfloat16(), tt[n:]])
        expected[name] = (int((_bits(back) != _bits(tt)).sum()), tt.numel())
    assert report.round_trip == expected
    differing, total = sum(d for d, _ in expected.values()), sum(n for _, n in expected.values())
    assert differing > 0
    [warning] = report.warnings
    assert f"{differing / total:.4%}" in warning and f"({differing} of {total})" in warning and "bfloat16" in warning

    r = cli("make-delta", tiny_llama, llama_ft_vocab, tmp_path / "delta2")
    assert r.exit_code == 0, r.stderr
    assert "warning: the bfloat16 delta does not round-trip" in r.stderr
    assert "vocabulary rows added in" in r.stdout


def test_replace_carries_tensors_whole(tmp_path, tiny_llama, llama_ft_vocab, load_all):
    b, t = load_all(tiny_llama), load_all(llama_ft_vocab)
    globs = ["*embed_tokens*", "lm_head*"]
    report = deltas.make_delta(tiny_llama, llama_ft_vocab, tmp_path / "delta", dtype=torch.float32, replace=globs)
    assert sorted(report.replaced) == ["lm_head.weight", "model.embed_tokens.weight"] and report.expanded == []
    d = load_all(tmp_path / "delta")
    assert torch.equal(d["lm_head.weight"], t["lm_head.weight"].float())
    assert torch.equal(d["model.embed_tokens.weight"], t["model.embed_tokens.weight"].float())
    q = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(d[q], t[q].float() - b[q].float())
    deltas.apply_delta(tiny_llama, tmp_path / "delta", tmp_path / "out", dtype=torch.bfloat16, replace=globs)
    _assert_bit_equal(load_all(tmp_path / "out"), t)

    with pytest.raises(WeightopsError, match=r"--replace 'nothing\*' matches no tensor of DELTA"):
        deltas.apply_delta(tiny_llama, tmp_path / "delta", tmp_path / "out2", replace=["nothing*"])


def test_ziya_style_inv_freq_replaced_or_dropped_with_a_warning(tmp_path, tiny_llama, llama_ft, load_all):
    deltas.make_delta(tiny_llama, llama_ft, tmp_path / "delta", dtype=torch.float32)
    inv = "model.layers.0.self_attn.rotary_emb.inv_freq"
    freq = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))
    _save({**load_all(tmp_path / "delta"), inv: freq}, tmp_path / "ziya", tmp_path / "delta")

    deltas.apply_delta(tiny_llama, tmp_path / "ziya", tmp_path / "out", replace=["*rotary_emb.inv_freq"])
    assert torch.equal(load_all(tmp_path / "out")[inv], freq)

    report = deltas.apply_delta(tiny_llama, tmp_path / "ziya", tmp_path / "out2")
    assert inv not in load_all(tmp_path / "out2")
    [warning] = report.warnings
    assert inv in warning and "only DELTA" in warning and "recomputes" in warning


def test_bloom_names_with_and_without_the_transformer_prefix_are_joined(tmp_path, tiny_bloom, bloom_ft, load_all):
    """bigscience's own BLOOM files omit `transformer.`; fine-tunes saved by transformers have it."""
    deltas.make_delta(tiny_bloom, bloom_ft, tmp_path / "delta", dtype=torch.float32)
    b = load_all(tiny_bloom)
    _save({k.removeprefix("transformer."): v for k, v in b.items()}, tmp_path / "base", tiny_bloom)
    assert not any(n.startswith("transformer.") for n in open_checkpoint(tmp_path / "base").names())
    deltas.apply_delta(tmp_path / "base", tmp_path / "delta", tmp_path / "out", dtype=torch.bfloat16)
    _assert_bit_equal(load_all(tmp_path / "out"), load_all(bloom_ft))


# --- mismatches --------------------------------------------------------------------------------


def test_every_mismatch_is_reported_naming_tensor_shapes_and_files(tmp_path, tiny_llama, llama_ft, load_all):
    deltas.make_delta(tiny_llama, llama_ft, tmp_path / "delta", dtype=torch.float32)
    d = load_all(tmp_path / "delta")
    k = "model.layers.0.self_attn.k_proj.weight"
    assert d[k].shape == (32, 64)
    d[k] = torch.zeros(64, 64)  # shape mismatch
    del d["model.layers.1.mlp.up_proj.weight"]  # missing from the delta
    d["model.layers.2.mlp.up_proj.weight"] = torch.zeros(128, 64)  # extra in the delta
    d["model.embed_tokens.weight"] = d["model.embed_tokens.weight"][:300]  # fewer vocabulary rows
    _save(d, tmp_path / "bad", tmp_path / "delta")
    base_file, bad_file = str(tiny_llama / "model.safetensors"), str(tmp_path / "bad" / "model.safetensors")

    with pytest.raises(WeightopsError) as e:
        deltas.apply_delta(tiny_llama, tmp_path / "bad", tmp_path / "out")
    msg = str(e.value)
    lines = msg.splitlines()
    shape_line = next(x for x in lines if k in x)
    assert "(32, 64)" in shape_line and "(64, 64)" in shape_line
    assert base_file in shape_line and bad_file in shape_line
    missing = next(x for x in lines if "model.layers.1.mlp.up_proj.weight" in x)
    assert "missing from DELTA" in missing and base_file in missing
    extra = next(x for x in lines if "model.layers.2.mlp.up_proj.weight" in x)
    assert "is in DELTA" in extra and "missing from BASE" in extra and bad_file in extra
    vocab = next(x for x in lines if "model.embed_tokens.weight" in x)
    assert "fewer vocabulary rows" in vocab and "(400, 64)" in vocab and "(300, 64)" in vocab
    assert not (tmp_path / "out").exists()


def test_non_float_tensors_must_be_replaced(tmp_path, tiny_llama, llama_ft, load_all):
    ids = torch.arange(8)
    _save({**load_all(tiny_llama), "position_ids": ids}, tmp_path / "base", tiny_llama)
    _save({**load_all(llama_ft), "position_ids": ids}, tmp_path / "target", llama_ft)
    with pytest.raises(WeightopsError, match=r"'position_ids' is int64 in BASE .*--replace 'position_ids'"):
        deltas.make_delta(tmp_path / "base", tmp_path / "target", tmp_path / "delta")
    deltas.make_delta(tmp_path / "base", tmp_path / "target", tmp_path / "delta", replace=["position_ids"])
    assert torch.equal(load_all(tmp_path / "delta")["position_ids"], ids)


@pytest.mark.parametrize("untied_side", ["BASE", "DELTA"])
def test_tied_vs_untied_embeddings_is_an_error(untied_side, tmp_path, tiny_llama, llama_ft, load_all):
    deltas.make_delta(tiny_llama, llama_ft, tmp_path / "delta", dtype=torch.float32)
    untied = tiny_llama if untied_side == "BASE" else tmp_path / "delta"
    tied = _save({k: v for k, v in load_all(untied).items() if k != "lm_head.weight"}, tmp_path / "tied", untied)
    base, delta = (untied, tied) if untied_side == "BASE" else (tied, untied)
    with pytest.raises(
        WeightopsError,
        match=rf"tied vs untied embeddings: {untied_side} .* separate output head "
        r"'lm_head.weight' \(.*model.safetensors\)",
    ):
        deltas.apply_delta(base, delta, tmp_path / "out")


def test_checkpoints_in_other_naming_schemes_are_refused(tmp_path, tiny_llama):
    tp = tmp_path / "tp.bin"
    write_torch_bin(
        [TensorRef("embedding.word.embedding.weight", (4, 4), "F32", "m", loader=lambda: torch.zeros(4, 4))], tp
    )
    with pytest.raises(WeightopsError, match=r"BASE .*tp.bin is a tencentpretrain checkpoint.*convert"):
        deltas.apply_delta(tp, tiny_llama, tmp_path / "out")


# --- guard rails -------------------------------------------------------------------------------

NORMS = ("model.layers.0.input_layernorm.weight", "model.norm.weight")


def test_guard_full_model_given_as_delta(cli, tmp_path, tiny_llama, llama_ft, load_all):
    r = cli("apply-delta", tiny_llama, llama_ft, tmp_path / "out")
    assert r.exit_code == 1
    assert "near 2" in r.stderr and "looks like a full model" in r.stderr and "--allow-suspicious-delta" in r.stderr
    assert all(n in r.stderr for n in NORMS) and not (tmp_path / "out").exists()
    r = cli("apply-delta", tiny_llama, llama_ft, tmp_path / "out", "--force")  # replaces outputs, nothing more
    assert r.exit_code == 1 and "looks like a full model" in r.stderr and not (tmp_path / "out").exists()
    r = cli("apply-delta", tiny_llama, llama_ft, tmp_path / "out", "--allow-suspicious-delta")
    assert r.exit_code == 0, r.stderr
    b, t, out = load_all(tiny_llama), load_all(llama_ft), load_all(tmp_path / "out")
    assert torch.equal(out[NORMS[1]], (b[NORMS[1]].float() + t[NORMS[1]].float()).bfloat16())


def test_guard_result_vanishes(tmp_path, tiny_llama, llama_ft, load_all):
    """A 'delta' of base − target applied to the target's own base gives norms near 0."""
    minus = {k: -(v.float() * 0.99) for k, v in load_all(tiny_llama).items()}
    _save(minus, tmp_path / "delta", llama_ft)
    with pytest.raises(WeightopsError, match=r"nearly vanish .*near 0.*model\.norm\.weight"):
        deltas.apply_delta(tiny_llama, tmp_path / "delta", tmp_path / "out")


def test_guard_base_is_itself_a_delta(tmp_path, tiny_llama, llama_ft, load_all):
    deltas.make_delta(tiny_llama, llama_ft, tmp_path / "d1", dtype=torch.float32)
    g = torch.Generator().manual_seed(5)
    other = {k: 0.02 * torch.randn(v.shape, generator=g) for k, v in load_all(tmp_path / "d1").items()}
    _save(other, tmp_path / "other", tmp_path / "d1")  # another fine-tune's delta, independent of d1
    with pytest.raises(
        WeightopsError,
        match=r"DELTA .*'s norm weights are \d\.\d\dx the base's.* BASE .* is itself "
        r"a delta.*model\.norm\.weight",
    ):
        deltas.apply_delta(tmp_path / "d1", tmp_path / "other", tmp_path / "out")
    with pytest.raises(WeightopsError, match=r"refusing to apply: BASE .*looks like a delta \(were BASE and DELTA"):
        deltas.apply_delta(tmp_path / "d1", llama_ft, tmp_path / "out")
    with pytest.raises(WeightopsError, match=r"refusing to make a delta: BASE .*looks like a delta.*input_layernorm"):
        deltas.make_delta(tmp_path / "d1", llama_ft, tmp_path / "d2")
    with pytest.raises(WeightopsError, match=r"refusing to make a delta: TARGET .*looks like a delta"):
        deltas.make_delta(tiny_llama, tmp_path / "d1", tmp_path / "d3")
    deltas.make_delta(tiny_llama, tmp_path / "d1", tmp_path / "d3", allow_suspicious=True)
    assert (tmp_path / "d3" / "model.safetensors").is_file()


def test_guard_accepts_a_fine_tune_with_frozen_norms(tmp_path, tiny_llama, load_all):
    """LoRA merges leave the norm gains untouched: their differences are exactly 0, which is fine."""
    b = load_all(tiny_llama)
    target = {k: v if v.dim() == 1 else (v.float() + 0.01).bfloat16() for k, v in b.items()}
    _save(target, tmp_path / "target", tiny_llama)
    deltas.make_delta(tiny_llama, tmp_path / "target", tmp_path / "delta", dtype=torch.float32)
    assert all(not v.any() for k, v in load_all(tmp_path / "delta").items() if v.dim() == 1)
    deltas.apply_delta(tiny_llama, tmp_path / "delta", tmp_path / "out", dtype=torch.bfloat16)
    _assert_bit_equal(load_all(tmp_path / "out"), target)


# --- sharding, formats, memory ----------------------------------------------------------------


def _write_bin_shards(tensors: dict, out: Path, like: Path, per_shard: int) -> Path:
    """A sharded pytorch_model-*.bin directory, tensors in reverse name order, `per_shard` per file."""
    out.mkdir()
    names = sorted(tensors, reverse=True)
    groups = [names[i : i + per_shard] for i in range(0, len(names), per_shard)]
    weight_map = {}
    for i, group in enumerate(groups):
        fname = f"pytorch_model-{i + 1:05d}-of-{len(groups):05d}.bin"
        write_torch_bin(_refs({n: tensors[n] for n in group}), out / fname)
        weight_map.update({n: fname for n in group})
    write_index(out / "pytorch_model.bin.index.json", weight_map, {"total_size": 0})
    for f in open_checkpoint(like).aux_files:
        shutil.copyfile(f, out / f.name)
    return out


def _groups(path: Path) -> set[frozenset]:
    by_file: dict[str, set] = {}
    for r in open_checkpoint(path).tensors:
        by_file.setdefault(r.source, set()).add(r.name)
    return {frozenset(v) for v in by_file.values()}


def test_sharded_inputs_with_other_boundaries_and_mixed_formats(tmp_path, tiny_llama, llama_ft_vocab, load_all):
    b, t = load_all(tiny_llama), load_all(llama_ft_vocab)
    deltas.make_delta(tiny_llama, llama_ft_vocab, tmp_path / "delta", dtype=torch.float32)
    # safetensors base in 40 KB shards, .bin delta in reversed 3-tensor shards
    base_st = _save(b, tmp_path / "base_st", tiny_llama, max_shard_size="40KB")
    delta_bin = _write_bin_shards(load_all(tmp_path / "delta"), tmp_path / "delta_bin", tmp_path / "delta", 3)
    assert open_checkpoint(base_st).format == "hf-safetensors" and open_checkpoint(delta_bin).format == "hf-bin"
    assert len(_groups(base_st)) > 2 and len(_groups(delta_bin)) > 2 and _groups(base_st) != _groups(delta_bin)
    deltas.apply_delta(base_st, delta_bin, tmp_path / "out", dtype=torch.bfloat16, max_shard_size="100KB")
    _assert_bit_equal(load_all(tmp_path / "out"), t)
    assert len(list((tmp_path / "out").glob("model-*.safetensors"))) > 1

    # and the other way round: a single .bin base, a sharded safetensors delta
    base_bin = tmp_path / "base_bin"
    base_bin.mkdir()
    write_torch_bin(_refs(b), base_bin / "pytorch_model.bin")
    delta_st = _save(load_all(tmp_path / "delta"), tmp_path / "delta_st", tmp_path / "delta", max_shard_size="50KB")
    deltas.apply_delta(base_bin, delta_st, tmp_path / "out2", dtype=torch.bfloat16)
    _assert_bit_equal(load_all(tmp_path / "out2"), t)


def test_each_input_tensor_is_read_once_while_streaming(tmp_path, tiny_llama, llama_ft):
    """One pass: every big tensor is loaded exactly once (norm gains also once for the guard)."""
    loads: dict[str, int] = {}

    def counted(path):
        def wrap(r: TensorRef) -> TensorRef:
            def load():
                loads[f"{path.name}:{r.name}"] = loads.get(f"{path.name}:{r.name}", 0) + 1
                return r.load()

            return TensorRef(r.name, r.shape, r.dtype_name, r.source, loader=load)

        return [wrap(r) for r in open_checkpoint(path).tensors]

    from weightops.pipelines.deltas import DeltaReport

    report = DeltaReport()
    refs = make_delta(counted(tiny_llama), counted(llama_ft), report=report)
    assert loads == {k: 1 for k in loads} and all("norm" in k for k in loads)  # guard: norm gains only
    loads.clear()
    save_hf(refs, tmp_path / "delta", force=True)
    assert set(loads) == {f"{p.name}:{n}" for p in (tiny_llama, llama_ft) for n in open_checkpoint(p).names()}
    assert set(loads.values()) == {1}
    assert set(report.round_trip) == set(open_checkpoint(llama_ft).names())  # counted during that one pass


# --- agreement with the reference scripts and with transformers -------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16bit_apply_equals_in_place_param_plus_delta(dtype, tmp_path, tiny_llama, load_all):
    """FastChat/ChatYuan load both models in fp16 and do `param += delta` on CPU; we match it bit for bit."""
    g = torch.Generator().manual_seed(3)
    base, delta = {}, {}
    for name, v in load_all(tiny_llama).items():
        is_norm = v.dim() == 1
        base[name] = (
            (1 + 0.1 * torch.randn(v.shape, generator=g)) if is_norm else torch.randn(v.shape, generator=g)
        ).to(dtype)
        delta[name] = ((0.01 if is_norm else 0.3) * torch.randn(v.shape, generator=g)).to(dtype)
    _save(base, tmp_path / "base", tiny_llama)
    _save(delta, tmp_path / "delta", tiny_llama)
    deltas.apply_delta(tmp_path / "base", tmp_path / "delta", tmp_path / "out")  # auto: delta's dtype

    reference_base = load_file(tmp_path / "base" / "model.safetensors")
    reference_delta = load_file(tmp_path / "delta" / "model.safetensors")
    for name, param in reference_base.items():
        param += reference_delta[name]  # the reference scripts' in-place 16-bit add
    ours = load_all(tmp_path / "out")
    _assert_bit_equal(ours, reference_base)
    _assert_bit_equal(ours, {k: (base[k].float() + delta[k].float()).to(dtype) for k in base})  # the definition
    exact = {k: (base[k].double() + delta[k].double()) for k in base}
    assert any(not torch.equal(ours[k].double(), exact[k]) for k in base)  # rounding really happened


def test_cli_round_trip_gives_identical_logits_in_transformers(cli, tmp_path, tiny_llama, llama_ft_vocab):
    from transformers import AutoModelForCausalLM

    r = cli("make-delta", tiny_llama, llama_ft_vocab, tmp_path / "delta", "--dtype", "float32")
    assert r.exit_code == 0, r.stderr
    assert "warning" not in r.stderr
    r = cli(
        "apply-delta",
        tiny_llama,
        tmp_path / "delta",
        tmp_path / "out",
        "--dtype",
        "bfloat16",
        "--max-shard-size",
        "100KB",
    )
    assert r.exit_code == 0, r.stderr
    assert "model.embed_tokens.weight" in r.stdout and "lm_head.weight" in r.stdout
    ids = torch.tensor([[1, 5, 77, 399, 400, 431, 12, 3]])  # includes ids of the added rows
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(llama_ft_vocab)(ids).logits
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "out")(ids).logits
    assert want.shape == (1, 8, 432) and torch.equal(got, want)

    r = cli("apply-delta", tiny_llama, tmp_path / "delta", tmp_path / "out")
    assert r.exit_code == 1 and "exists and is not empty" in r.stderr
