"""llama-quantize's file types (q4_0 ... q6_k, --pure or its mixes): our one-pass file is the
file `llama_model_quantize` (llama-cpp-python 0.3.36, llama.cpp 0c1e57098) writes from an F32
GGUF of the same model (from the F16/BF16 GGUF with --via), byte for byte: tensor types, KV
(order included), tensor order, blocks, padding; its fallback warnings are llama-quantize's.
The type rules that need big models (70B, use_more_bits over 30/32/80 layers) are checked
against llama-quantize on GGUF files of tiny rows written directly."""

from __future__ import annotations

import ctypes
import re
from collections.abc import Sequence
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader

from weightops import tiny
from weightops.errors import WeightopsError
from weightops.jobs import load_job
from weightops.pipelines.gguf import export_gguf
from weightops.quant import ggml_types, policy

llama_cpp = pytest.importorskip("llama_cpp")

MIXES = [f.name for f in ggml_types.FILE_TYPES if f.quantizer]
K_MIXES = [f.name for f in ggml_types.FILE_TYPES if f.quantizer and f.file_type >= gguf.LlamaFileType.MOSTLY_Q2_K]


# ------------------------------------------------------------------------------------------ the oracle


def llama_quantize(
    src: Path,
    dst: Path,
    mix: str,
    *,
    pure: bool = False,
    output_type: Q | None = None,
    token_embedding_type: Q | None = None,
    regexes: Sequence[tuple[str, Q]] = (),
) -> str:
    """Run llama.cpp's own quantizer (`llama_model_quantize`, 2 threads) and return its log."""
    log: list[str] = []

    @llama_cpp.llama_log_callback
    def collect(level, text, user_data):
        log.append(text.decode("utf-8", "replace"))

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread, params.pure = int(policy.file_type(mix)), 2, pure
    if output_type is not None:
        params.output_tensor_type = int(output_type)
    if token_embedding_type is not None:
        params.token_embedding_type = int(token_embedding_type)
    keep = []
    if regexes:
        overrides = (llama_cpp.llama_model_tensor_override * (len(regexes) + 1))()
        for i, (pattern, qtype) in enumerate(regexes):
            keep.append(pattern.encode())
            overrides[i].pattern, overrides[i].type = keep[-1], int(qtype)
        overrides[len(regexes)].pattern = None
        params.tt_overrides = overrides
    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) == 0
    finally:
        llama_cpp.llama_log_set(llama_cpp._logger.llama_log_callback, ctypes.c_void_p(0))
    return "".join(log)


def fallback_lines(log: str) -> list[str]:
    """llama-quantize's fallback warnings (one per tensor, then the count), whitespace-normalised,
    without its "warning: " / "function: WARNING: " prefixes."""
    lines = [" ".join(line.split()) for line in log.splitlines() if "fall" in line]
    return [re.sub(r"^.*?warning: ", "", line, flags=re.IGNORECASE) for line in lines]


# ------------------------------------------------------------------------------------------ models


BUILDERS = {
    # rows of 256: K blocks used; 4 heads sharing 1 key/value head (n_gqa 4: Q2_K's attn_v rule);
    # 8 layers: use_more_bits and the i < n/8 rules pick some layers and not others
    "llama-256": lambda request, d: tiny.tiny_llama(
        d / "model", request.getfixturevalue("spm_tokenizer"), hidden=256, intermediate=512, layers=8, kv_heads=1
    ),
    "llama": lambda request, d: request.getfixturevalue("tiny_llama"),  # rows of 64: fallbacks fire
    "bloom": lambda request, d: request.getfixturevalue("tiny_bloom"),  # attn_qkv, tied output
    "mistral": lambda request, d: tiny.tiny_mistral(d / "model", request.getfixturevalue("spm_tokenizer")),
    "qwen2": lambda request, d: tiny.tiny_qwen2(d / "model", tiny.qwen2_tokenizer_dir(d / "tokenizer")),
}


@pytest.fixture(scope="module")
def built(request, tmp_path_factory):
    """`built(name)` -> (checkpoint, its F32 GGUF: llama-quantize's input), made once per module."""
    cache: dict[str, tuple[Path, Path]] = {}

    def get(name: str) -> tuple[Path, Path]:
        if name not in cache:
            directory = tmp_path_factory.mktemp(name)
            checkpoint = BUILDERS[name](request, directory)
            export_gguf(checkpoint, directory / "f32.gguf", type="f32")
            cache[name] = checkpoint, directory / "f32.gguf"
        return cache[name]

    return get


@pytest.fixture(scope="module", params=list(BUILDERS))
def model(request, built) -> tuple[str, Path, Path]:
    """(name, checkpoint, its F32 GGUF) of every model."""
    return (request.param, *built(request.param))


@pytest.fixture(scope="module")
def llama_256(built) -> tuple[Path, Path]:
    """The 256-row LLaMA and its F32 GGUF, for the option tests."""
    return built("llama-256")


def ours(checkpoint: Path, out: Path, mix: str, **kw) -> list[str]:
    warnings: list[str] = []
    export_gguf(checkpoint, out, type=mix, warn=warnings.append, **kw)
    return warnings


# ------------------------------------------------------------------------------------------ whole files


@pytest.mark.parametrize("pure", [False, True], ids=["mix", "pure"])
@pytest.mark.parametrize("mix", MIXES)
def test_file_is_llama_quantize_s(model, mix, pure, tmp_path, gguf_differences):
    name, checkpoint, f32 = model
    theirs, mine = tmp_path / "theirs.gguf", tmp_path / "ours.gguf"
    log = llama_quantize(f32, theirs, mix, pure=pure)
    warnings = ours(checkpoint, mine, mix, pure=pure)
    assert gguf_differences(mine, theirs) == []
    assert mine.read_bytes() == theirs.read_bytes()
    assert [" ".join(w.split()) for w in warnings if "fall" in w] == fallback_lines(log)


@pytest.mark.parametrize("via,mix", [("f16", "q4_k_m"), ("f16", "q5_0"), ("bf16", "q6_k")])
def test_via_is_llama_quantize_on_the_converted_file(model, via, mix, tmp_path, gguf_differences):
    """--via f16: the file of the two-pass route (convert to F16, then quantize), which differs
    from the one-pass file where F16 rounding changes blocks."""
    name, checkpoint, _ = model
    converted, theirs, mine = tmp_path / f"{via}.gguf", tmp_path / "theirs.gguf", tmp_path / "ours.gguf"
    export_gguf(checkpoint, converted, type=via)
    llama_quantize(converted, theirs, mix)
    ours(checkpoint, mine, mix, via=via)
    assert gguf_differences(mine, theirs) == []


def test_via_f16_reproduces_the_two_pass_file_only(llama_256, tmp_path, gguf_differences):
    """Weights under f16's normal range (~6e-5) lose bits in the F16 file: the two-pass file
    differs from the one-pass one, and --via f16 gives the two-pass file."""
    import shutil

    from safetensors.torch import load_file, save_file

    checkpoint = Path(shutil.copytree(llama_256[0], tmp_path / "small"))
    tensors = load_file(checkpoint / "model.safetensors")
    for name in [n for n in tensors if "down_proj" in n]:
        tensors[name] = (tensors[name].float() * 1e-4).to(tensors[name].dtype)
    save_file(tensors, checkpoint / "model.safetensors", metadata={"format": "pt"})
    export_gguf(checkpoint, tmp_path / "f16.gguf", type="f16")
    llama_quantize(tmp_path / "f16.gguf", tmp_path / "theirs.gguf", "q4_k_m")
    ours(checkpoint, tmp_path / "via.gguf", "q4_k_m", via="f16")
    ours(checkpoint, tmp_path / "direct.gguf", "q4_k_m")
    assert gguf_differences(tmp_path / "via.gguf", tmp_path / "theirs.gguf") == []
    assert {d.split(" ")[0] for d in gguf_differences(tmp_path / "direct.gguf", tmp_path / "theirs.gguf")} == {
        f"blk.{i}.ffn_down.weight" for i in range(8)
    }


@pytest.mark.parametrize(
    "kw,llama_kw",
    [
        # the first matching pattern wins; a tensor it names skips the mix rules and the counters
        (
            {"tensor_types": ["blk.0.attn_v.weight=q8_0", "*attn_v*=q5_1", "*ffn_down*=q4_0"]},
            {"regexes": [(r"blk\.0\.attn_v", Q.Q8_0), ("attn_v", Q.Q5_1), ("ffn_down", Q.Q4_0)]},
        ),
        (
            {"tensor_types": ["blk.1.*=q6_k", "token_embd.weight=q5_k"], "pure": True},
            {"regexes": [(r"blk\.1\.", Q.Q6_K), ("token_embd", Q.Q5_K)], "pure": True},
        ),
        (
            {"output_tensor_type": "q8_0", "token_embedding_type": "q4_k", "tensor_types": ["output.weight=f16"]},
            {"output_type": Q.Q8_0, "token_embedding_type": Q.Q4_K, "regexes": [(r"^output\.weight", Q.F16)]},
        ),
    ],
    ids=["tensor-type", "tensor-type-pure", "output-and-embedding"],
)
@pytest.mark.parametrize("mix", ["q4_k_m", "q3_k_m"])
def test_options_as_llama_quantize(llama_256, mix, kw, llama_kw, tmp_path, gguf_differences):
    checkpoint, f32 = llama_256
    llama_quantize(f32, tmp_path / "theirs.gguf", mix, **llama_kw)
    ours(checkpoint, tmp_path / "ours.gguf", mix, **kw)
    assert gguf_differences(tmp_path / "ours.gguf", tmp_path / "theirs.gguf") == []


def test_tied_output_type_applies_to_the_embedding(request, tmp_path, gguf_differences):
    """With tied embeddings token_embd is quantized as the output (here: --output-tensor-type)."""
    checkpoint = tiny.tiny_llama(
        tmp_path / "model", request.getfixturevalue("spm_tokenizer"), hidden=256, intermediate=256, tied=True
    )
    export_gguf(checkpoint, tmp_path / "f32.gguf", type="f32")
    llama_quantize(tmp_path / "f32.gguf", tmp_path / "theirs.gguf", "q4_k_s", output_type=Q.Q5_K)
    ours(checkpoint, tmp_path / "ours.gguf", "q4_k_s", output_tensor_type="q5_k")
    assert gguf_differences(tmp_path / "ours.gguf", tmp_path / "theirs.gguf") == []
    assert {t.name: t.tensor_type for t in GGUFReader(tmp_path / "ours.gguf").tensors}["token_embd.weight"] == Q.Q5_K


def test_q8_0_types_agree_with_llama_quantize(model, tmp_path):
    """--type q8_0 is convert_hf_to_gguf.py's file; llama-quantize's Q8_0 gives every tensor the
    same type (its file differs only in KV and tensor order)."""
    name, checkpoint, f32 = model
    llama_quantize(f32, tmp_path / "theirs.gguf", "q8_0")
    ours(checkpoint, tmp_path / "ours.gguf", "q8_0")
    mine, theirs = GGUFReader(tmp_path / "ours.gguf"), GGUFReader(tmp_path / "theirs.gguf")
    assert {t.name: t.tensor_type for t in mine.tensors} == {t.name: t.tensor_type for t in theirs.tensors}
    assert {t.name: np.array(t.data).tobytes() for t in mine.tensors} == {
        t.name: np.array(t.data).tobytes() for t in theirs.tensors
    }


def test_refusals(tiny_llama, tmp_path):
    with pytest.raises(WeightopsError, match="--via applies to the file types llama-quantize makes"):
        export_gguf(tiny_llama, tmp_path / "a.gguf", type="q8_0", via="f16")
    # llama-quantize applies these without a fallback and writes a broken tensor; we refuse
    with pytest.raises(WeightopsError, match=r"'output.weight' \(\d+, 64\): rows of 64 values cannot be Q6_K"):
        export_gguf(tiny_llama, tmp_path / "b.gguf", type="q4_k_m", output_tensor_type="q6_k")
    assert not (tmp_path / "b.gguf").exists()


# ------------------------------------------------------------------------------------------ big-model rules


def synthetic(path: Path, arch: str, layers: int, heads: int, kv_heads: int, *, tied: bool = False) -> list:
    """A GGUF with llama-quantize's view of a big model (block count, head counts, tensor names)
    but rows of 2 x 256 zeros: cheap to quantize; returns its (name, shape) list."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(layers)
    writer.add_context_length(64)
    writer.add_embedding_length(256)
    writer.add_feed_forward_length(256)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_eps(1e-5) if arch == "bloom" else writer.add_layer_norm_rms_eps(1e-5)
    attention = ["attn_qkv"] if arch == "bloom" else ["attn_q", "attn_k", "attn_v"]
    ffn = ["ffn_up", "ffn_down"] + ([] if arch == "bloom" else ["ffn_gate"])
    names = ["token_embd.weight", "output_norm.weight"] + ([] if tied else ["output.weight"])
    for i in range(layers):
        names += [f"blk.{i}.{n}.weight" for n in [*attention, "attn_output", *ffn, "attn_norm", "ffn_norm"]]
    tensors = []
    for name in names:
        values = np.zeros((256,) if "norm" in name else (2, 256), dtype=np.float32)
        writer.add_tensor(name, values)
        tensors.append((name, values.shape))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tensors


@pytest.mark.parametrize(
    "arch,layers,heads,kv_heads,tied",
    [
        ("llama", 80, 64, 8, False),  # LLM_TYPE_70B
        ("llama", 80, 8, 8, False),  # 65B: no 70B rule
        ("qwen2", 80, 8, 8, True),  # 70B whatever the heads; tied output
        ("llama", 32, 32, 8, False),
        ("bloom", 30, 8, 8, True),  # attn_qkv under the attn_v rules
        ("llama", 16, 16, 2, False),  # n/16 = 1
    ],
)
def test_types_on_big_models(arch, layers, heads, kv_heads, tied, tmp_path):
    source = tmp_path / "in.gguf"
    tensors = synthetic(source, arch, layers, heads, kv_heads, tied=tied)
    model = policy.Model(arch, layers, heads, kv_heads)
    for mix in MIXES:
        llama_quantize(source, tmp_path / f"{mix}.gguf", mix)
        theirs = {t.name: t.tensor_type for t in GGUFReader(tmp_path / f"{mix}.gguf").tensors}
        assert policy.assign_types(tensors, mix, model=model) == theirs, mix


# ------------------------------------------------------------------------------------------ CLI and jobs


def test_cli_and_job_accept_the_mixes(cli, llama_256, tmp_path):
    checkpoint, _ = llama_256
    out = tmp_path / "m.gguf"
    r = cli("gguf", checkpoint, out, "--type", "Q4_K_M", "--via", "f16", "--output-tensor-type", "q8_0")
    assert r.exit_code == 0, r.output
    assert "MOSTLY_Q4_K_M" in r.stdout
    job = tmp_path / "job.toml"
    job.write_text(
        f'[job]\nname = "j"\noutput = "out"\n[inputs]\nm = "{checkpoint}"\n'
        '[[steps]]\nname = "q"\nop = "gguf"\nmodel = "@m"\noutput = "m.gguf"\ntype = "q5_k_m"\nvia = "bf16"\n'
        'output-tensor-type = "q6_k"\ntoken-embedding-type = "q5_k"\ntensor-type = ["*ffn_down*=q8_0"]\npure = true\n'
    )
    argv = load_job(job).steps[0].argv
    for option in ("q5_k_m", "--via", "bf16", "--output-tensor-type", "q6_k", "--token-embedding-type", "--pure"):
        assert option in argv


# ------------------------------------------------------------------------------------------ reading back


def test_k_mix_files_read_back_everywhere(llama_256, tmp_path):
    """A K-quant mix is a model like any other: inspect counts its K types, the manifest
    checks, our reader dequantizes as gguf.quants does, llama.cpp loads and runs it, and
    verify runs it in llama.cpp under the gate of its least precise type (Q4_K: q4)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from weightops.io.checkpoint import open_checkpoint
    from weightops.pipelines.inspect import inspect_checkpoint
    from weightops.pipelines.manifest import check_manifest, create_manifest
    from weightops.pipelines.verify import verify_checkpoint

    checkpoint, _ = llama_256
    out = tmp_path / "m.gguf"
    ours(checkpoint, out, "q4_k_m")
    summary = inspect_checkpoint(out)
    stored = {t.name: t for t in GGUFReader(out).tensors}
    assert summary["dtypes"] == {
        k.name: sum(t.tensor_type == k for t in stored.values()) for k in {t.tensor_type for t in stored.values()}
    }
    assert {"Q4_K", "Q6_K"} <= set(summary["dtypes"])
    create_manifest(out)
    assert set(check_manifest(out)["tensors"]) == set(stored)  # raises on any difference
    for ref in open_checkpoint(out).tensors:
        t = stored[ref.name]
        expected = gguf.quants.dequantize(np.array(t.data), t.tensor_type).reshape(ref.shape)
        assert np.array_equal(ref.load().numpy(), expected), ref.name
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=64, logits_all=True, verbose=False, n_threads=2)
    llm.eval(llm.tokenize(b"the quick brown fox", add_bos=True))
    assert np.isfinite(np.array(llm.scores[:4])).all()
    result = verify_checkpoint(checkpoint, out, prompts=["the quick brown fox jumps over the lazy dog"])
    assert result["thresholds"]["candidate_kind"] == "q4"
    assert result["candidate"]["tensor_types"] == ["Q4_K", "Q6_K"]  # of the matrices
