"""weightops imatrix: layer-by-layer sums against a whole-model reference (forward hooks on the
transformers model), chunking against llama.cpp's tokenizer and llama-imatrix's rules, the
spill path, other input formats, combining files, and refusals that write nothing."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from weightops import arch, tiny
from weightops.calibrate import text as calib_text
from weightops.errors import WeightopsError
from weightops.io.imatrix import read_imatrix
from weightops.pipelines.imatrix import compute_imatrix

CTX = 32


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "calibration.txt"
    path.write_text("\n".join(tiny.corpus(40, seed=3)), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("qwen2")
    return tiny.tiny_qwen2(d / "model", tiny.qwen2_tokenizer_dir(d / "tokenizer"))


@pytest.fixture(scope="module")
def llama_gguf(tmp_path_factory, tiny_llama) -> Path:
    from weightops.pipelines.gguf import export_gguf

    out = tmp_path_factory.mktemp("imatrix-gguf") / "llama-f32.gguf"
    export_gguf(tiny_llama, out, type="f32")
    return out


def _hf_chunks(model: Path, text: Path, ctx: int = CTX, limit: int | None = None) -> torch.Tensor:
    return calib_text.chunks(calib_text.hf_tokenize(model, text.read_text(encoding="utf-8")), ctx, limit)


def _reference(model_dir: Path, chunks: torch.Tensor, process_output: bool = False) -> dict[str, np.ndarray]:
    """The whole transformers model in float32, one chunk at a time, with a forward hook on
    every linear of every layer (and lm_head with `process_output`), keyed by GGUF name."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    spec = arch.get(model.config.model_type)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    sums: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or (tied and module is model.get_output_embeddings()):
            continue  # llama.cpp multiplies by token_embd then, whose name it does not collect
        hit = spec.lookup(name + ".weight", "hf")
        if hit is None or (hit[1] is None and not process_output):
            continue
        gname = hit[0].gguf.format(n=hit[1])

        def hook(m, args, gname=gname):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            sums[gname] = sums.get(gname, 0) + (x * x).sum(0)

        module.register_forward_pre_hook(hook)
    with torch.no_grad():
        for chunk in chunks:
            model(input_ids=chunk[None])
    return {k: v.numpy() for k, v in sums.items()}


def _sums(path: Path) -> dict[str, np.ndarray]:
    return {k: e.sums.reshape(-1) for k, e in read_imatrix(path).entries.items()}


@pytest.mark.parametrize("which", ["tiny_llama", "tiny_bloom", "tiny_qwen2"])
def test_layer_by_layer_equals_whole_model(which, request, text_file, tmp_path):
    model = request.getfixturevalue(which)
    out = tmp_path / "imatrix.gguf"
    report = compute_imatrix(model, out, text=text_file, ctx=CTX, chunks=6, process_output=True, device="cpu")
    chunks = _hf_chunks(model, text_file, limit=6)
    ref = _reference(model, chunks, process_output=True)
    got = read_imatrix(out)
    assert sorted(got.entries) == sorted(ref)  # output.weight only for the untied LLaMA
    assert ("output.weight" in got.entries) == (which == "tiny_llama")
    for name, e in got.entries.items():
        np.testing.assert_allclose(e.sums.reshape(-1), ref[name], rtol=2e-5, atol=1e-6, err_msg=name)
        assert e.counts.tolist() == [6 * CTX]
    assert (got.chunk_count, got.chunk_size, got.datasets) == (6, CTX, [str(text_file)])
    assert report.entries == len(ref) and report.chunks == 6


def test_q_k_v_and_gate_up_share_their_input(tiny_llama, text_file, tmp_path):
    compute_imatrix(tiny_llama, tmp_path / "m.gguf", text=text_file, ctx=CTX, chunks=2)
    s = _sums(tmp_path / "m.gguf")
    assert np.array_equal(s["blk.1.attn_q.weight"], s["blk.1.attn_k.weight"])
    assert np.array_equal(s["blk.1.attn_q.weight"], s["blk.1.attn_v.weight"])
    assert np.array_equal(s["blk.0.ffn_gate.weight"], s["blk.0.ffn_up.weight"])
    assert not np.array_equal(s["blk.0.attn_q.weight"], s["blk.0.attn_output.weight"])


def test_chunks_follow_llama_imatrix(llama_gguf, text_file):
    """llama.cpp's own tokens (llama_tokenize with add_special, as common_tokenize), cut as
    compute_imatrix cuts them: n_ctx tokens per chunk, the first replaced by BOS, the tail dropped."""
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(llama_gguf), vocab_only=True, verbose=False)
    tokens = llm.tokenize(text_file.read_text(encoding="utf-8").encode(), add_bos=True, special=False)
    bos = llm.token_bos()
    assert llm._model.add_bos_token() and tokens[0] == bos
    n = len(tokens) // CTX
    expected = [[bos, *tokens[i * CTX + 1 : (i + 1) * CTX]] for i in range(n)]
    got = calib_text.chunks(calib_text.gguf_tokenize(llama_gguf, text_file.read_text(encoding="utf-8")), CTX)
    assert got.tolist() == expected
    assert (
        calib_text.chunks(calib_text.gguf_tokenize(llama_gguf, text_file.read_text()), CTX, 3).tolist() == expected[:3]
    )


def test_hf_tokenizer_chunks_like_llama_cpp(tiny_llama, llama_gguf, text_file):
    got = _hf_chunks(tiny_llama, text_file)
    gguf = calib_text.chunks(calib_text.gguf_tokenize(llama_gguf, text_file.read_text(encoding="utf-8")), CTX)
    assert torch.equal(got, gguf)


def test_no_bos_when_the_tokenizer_adds_none(tiny_qwen2, text_file):
    tok = calib_text.hf_tokenize(tiny_qwen2, text_file.read_text(encoding="utf-8"))
    assert tok.bos is None
    assert calib_text.chunks(tok, CTX).reshape(-1).tolist() == tok.ids[: len(tok.ids) // CTX * CTX]


def test_chunks_limits_the_count(tiny_llama, text_file, tmp_path):
    compute_imatrix(tiny_llama, tmp_path / "m.gguf", text=text_file, ctx=CTX, chunks=3)
    m = read_imatrix(tmp_path / "m.gguf")
    assert m.chunk_count == 3
    assert {tuple(e.counts.tolist()) for e in m.entries.values()} == {(3 * CTX,)}


def test_spilling_gives_the_same_sums(tiny_bloom, text_file, tmp_path):
    a = compute_imatrix(tiny_bloom, tmp_path / "ram.gguf", text=text_file, ctx=CTX, chunks=5)
    b = compute_imatrix(tiny_bloom, tmp_path / "disk.gguf", text=text_file, ctx=CTX, chunks=5, memory_budget=1)
    assert a.spilled == 0 and b.spilled == 5 * CTX * 64 * 4
    ram, disk = _sums(tmp_path / "ram.gguf"), _sums(tmp_path / "disk.gguf")
    assert ram.keys() == disk.keys()
    for k in ram:
        assert np.array_equal(ram[k], disk[k]), k
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk.gguf", "ram.gguf"]  # no spill file left


def _assert_close(a: Path, b: Path, rtol: float = 1e-4) -> None:
    x, y = _sums(a), _sums(b)
    assert x.keys() == y.keys()
    for k in x:
        np.testing.assert_allclose(x[k], y[k], rtol=rtol, atol=1e-5, err_msg=k)


def test_gguf_and_tencentpretrain_inputs_match_hf(tiny_llama, llama_gguf, tp_llama, text_file, tmp_path):
    compute_imatrix(tiny_llama, tmp_path / "hf.gguf", text=text_file, ctx=CTX, chunks=4, process_output=True)
    compute_imatrix(llama_gguf, tmp_path / "gguf.gguf", text=text_file, ctx=CTX, chunks=4, process_output=True)
    compute_imatrix(tp_llama, tmp_path / "tp.gguf", text=text_file, ctx=CTX, chunks=4, tokenizer=tiny_llama)
    _assert_close(tmp_path / "hf.gguf", tmp_path / "gguf.gguf")
    hf = _sums(tmp_path / "hf.gguf")
    hf.pop("output.weight")
    tp = _sums(tmp_path / "tp.gguf")
    assert hf.keys() == tp.keys()
    for k in hf:
        np.testing.assert_allclose(hf[k], tp[k], rtol=1e-4, atol=1e-5, err_msg=k)


def test_bloom_gguf_matches_hf(bloom, text_file, tmp_path):
    """BLOOM's fused QKV is reordered in GGUF: the layers must see it back in HF order."""
    from weightops.pipelines.gguf import export_gguf

    gguf = tmp_path / "bloom.gguf"
    export_gguf(bloom, gguf, type="f32")
    compute_imatrix(bloom, tmp_path / "hf.gguf", text=text_file, ctx=CTX, chunks=3)
    compute_imatrix(gguf, tmp_path / "gguf.gguf", text=text_file, ctx=CTX, chunks=3, tokenizer=bloom)
    _assert_close(tmp_path / "hf.gguf", tmp_path / "gguf.gguf")


def test_in_files_combine_with_and_without_text(tiny_llama, text_file, tmp_path):
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    compute_imatrix(tiny_llama, a, text=text_file, ctx=CTX, chunks=2)
    compute_imatrix(tiny_llama, b, text=text_file, ctx=CTX, chunks=3)
    compute_imatrix(tiny_llama, tmp_path / "ab.gguf", in_files=[a, b])
    compute_imatrix(tiny_llama, tmp_path / "ab3.gguf", in_files=[a, b], text=text_file, ctx=CTX, chunks=2)
    ma, mb, ab, ab3 = (read_imatrix(tmp_path / f) for f in ("a.gguf", "b.gguf", "ab.gguf", "ab3.gguf"))
    for k in ma.entries:
        np.testing.assert_allclose(ab.entries[k].sums, ma.entries[k].sums + mb.entries[k].sums, rtol=1e-6)
        assert ab.entries[k].counts.tolist() == [5 * CTX]
        np.testing.assert_allclose(ab3.entries[k].sums, 2 * ma.entries[k].sums + mb.entries[k].sums, rtol=1e-6)
        assert ab3.entries[k].counts.tolist() == [7 * CTX]
    assert ab3.datasets == [str(text_file)] * 3


def test_cli_writes_gguf_and_dat(cli, tiny_llama, text_file, tmp_path):
    r = cli("-q", "imatrix", tiny_llama, tmp_path / "m.gguf", "--text", text_file, "--ctx", CTX, "--chunks", 2)
    assert r.exit_code == 0, r.output
    assert "14 matrices; 2 chunks of 32 tokens" in r.output
    r = cli(
        "-q",
        "imatrix",
        tiny_llama,
        tmp_path / "m.dat",
        "--text",
        text_file,
        "--ctx",
        CTX,
        "--chunks",
        2,
        "--format",
        "dat",
    )
    assert r.exit_code == 0, r.output
    assert (tmp_path / "m.dat").stat().st_size > 0


# --- refusals: a clear error and no output


def _refused(match: str, out: Path, **kwargs) -> None:
    with pytest.raises(WeightopsError, match=match):
        compute_imatrix(output=out, **kwargs)
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


def test_text_shorter_than_one_chunk(tiny_llama, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("the quick brown fox", encoding="utf-8")
    _refused("fewer than one --ctx 512 chunk", tmp_path / "m.gguf", model=tiny_llama, text=short)


def test_nothing_to_do(tiny_llama, tmp_path):
    _refused("give a calibration --text", tmp_path / "m.gguf", model=tiny_llama)


def test_tokenizer_larger_than_the_embedding(tiny_llama, text_file, tmp_path):
    big = tiny.spm_tokenizer_dir(tmp_path / "big-tokenizer", vocab_size=600)
    _refused("but the embedding has only", tmp_path / "m.gguf", model=tiny_llama, text=text_file, tokenizer=big)


def test_non_finite_activations(tiny_llama, text_file, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama, broken)
    weights = broken / "model.safetensors"
    state = load_file(weights)
    state["model.layers.0.self_attn.o_proj.weight"][0, 0] = float("inf")
    save_file(state, weights, metadata={"format": "pt"})
    _refused("non-finite activations reach 'blk.0.ffn_", tmp_path / "m.gguf", model=broken, text=text_file, ctx=CTX)


def test_in_file_of_another_model(tiny_llama, tiny_bloom, text_file, tmp_path):
    other = tmp_path / "bloom.gguf"
    compute_imatrix(tiny_bloom, other, text=text_file, ctx=CTX, chunks=1)
    _refused(
        "entry 'blk.0.attn_qkv.weight' names no matrix of", tmp_path / "m.gguf", model=tiny_llama, in_files=[other]
    )


def test_imatrix_is_a_job_step(tmp_path, tiny_llama, text_file):
    from weightops import jobs

    job = tmp_path / "job.toml"
    job.write_text(
        f'[job]\nname = "t"\noutput = "out"\n[inputs]\nmodel = "{tiny_llama}"\n'
        f'[[steps]]\nname = "imatrix"\nop = "imatrix"\nmodel = "@model"\noutput = "imatrix.gguf"\n'
        f'text = "{text_file}"\nctx = {CTX}\nchunks = 2\nprocess-output = true\n'
    )
    plan = jobs.plan(jobs.load_job(job))
    assert plan["steps"][0]["expected_bytes"] is None
    assert "--chunks 2 --process-output" in plan["steps"][0]["command"]
    jobs.run_job(job)
    m = read_imatrix(tmp_path / "out" / "imatrix.gguf")
    assert m.chunk_count == 2 and "output.weight" in m.entries
