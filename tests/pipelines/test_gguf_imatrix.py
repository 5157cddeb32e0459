"""weightops gguf --imatrix: the whole file is the one llama.cpp's own llama-quantize --imatrix
(built from the vendored source, reading the imatrix with llama.cpp's loader) writes from our
F32 GGUF, byte for byte: weighted blocks, the type rules an imatrix changes (Q4_0/Q5_0's first
ffn_down layers), the quantize.imatrix.* keys and their order; tensors without an entry
unweighted; a wrong-sized entry refused before anything is written; the CLI and the job runner."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader

from weightops import tiny
from weightops.errors import WeightopsError
from weightops.io.gguf_header import read_header
from weightops.io.imatrix import Entry, read_imatrix, write_imatrix
from weightops.jobs import load_job
from weightops.pipelines.gguf import export_gguf
from weightops.pipelines.imatrix import compute_imatrix
from weightops.quant import ggml_types

pytest.importorskip("llama_cpp")

# every --type with a weighted path: llama-quantize's mixes (q8_0 is the converter's file, and Q8_0 has none)
MIXES = [f.name for f in ggml_types.FILE_TYPES if f.quantizer]


@dataclass(frozen=True)
class Model:
    """A checkpoint, its F32 GGUF (llama-quantize's input) and an importance matrix of it."""

    checkpoint: Path
    f32: Path
    imatrix: Path


def _model(root: Path, checkpoint: Path, fmt: str = "gguf") -> Model:
    text = root / "calibration.txt"
    text.write_text("\n".join(tiny.corpus(60, seed=5)), encoding="utf-8")
    f32 = export_gguf(checkpoint, root / "f32.gguf", type="f32").output
    imatrix = compute_imatrix(checkpoint, root / f"imatrix.{fmt}", text=text, ctx=64, device="cpu", format=fmt).output
    return Model(checkpoint, f32, imatrix)


@pytest.fixture(scope="module")
def llama(tmp_path_factory, spm_tokenizer) -> Model:
    """Rows of 256 (the K types apply), 4 query heads per key/value head (Q2_K's attn_v rule),
    8 layers (the i < n/8 rules pick layer 0)."""
    root = tmp_path_factory.mktemp("llama-imatrix")
    checkpoint = tiny.tiny_llama(root / "model", spm_tokenizer, hidden=256, intermediate=256, layers=8, kv_heads=1)
    return _model(root, checkpoint)


def theirs(llama_quantize, model: Model, out: Path, mix: str, *options: str | Path, imatrix=None) -> Path:
    imatrix = model.imatrix if imatrix is None else imatrix
    llama_quantize(*options, "--imatrix", imatrix, model.f32, out, mix.upper(), "2")
    return out


def ours(model: Model, out: Path, mix: str, imatrix=None, **kw) -> Path:
    return export_gguf(
        model.checkpoint, out, type=mix, imatrix=str(model.imatrix if imatrix is None else imatrix), **kw
    ).output


def types(path: Path) -> dict[str, Q]:
    return {t.name: t.tensor_type for t in GGUFReader(path).tensors}


# ------------------------------------------------------------------------------------------ whole files


# --pure files of one base type differ only in general.file_type: one --pure case per base type
FIRST_OF_BASE = {ggml_types.parse_file_type(m).tensor_type: m for m in reversed(MIXES)}
CASES = [(m, False) for m in MIXES] + [(m, True) for m in MIXES if m in FIRST_OF_BASE.values()]


@pytest.mark.parametrize("mix,pure", CASES, ids=[f"{m}-{'pure' if p else 'mix'}" for m, p in CASES])
def test_file_is_llama_quantize_imatrix_s(llama, mix, pure, tmp_path, llama_quantize, gguf_differences):
    mine = ours(llama, tmp_path / "ours.gguf", mix, pure=pure)
    reference = theirs(llama_quantize, llama, tmp_path / "theirs.gguf", mix, *(["--pure"] if pure else []))
    assert gguf_differences(mine, reference) == []
    assert mine.read_bytes() == reference.read_bytes()
    if mix in ("q4_0", "q5_0") and not pure:  # the imatrix rule: the first eighth of ffn_down gets the _1 type
        assert types(reference)["blk.0.ffn_down.weight"] == (Q.Q4_1 if mix == "q4_0" else Q.Q5_1)
        assert types(reference)["blk.1.ffn_down.weight"] == Q[mix.upper()]


def test_the_imatrix_changes_the_blocks(llama, tmp_path, llama_quantize, gguf_differences):
    """The comparisons above are not vacuous: llama-quantize's weighted blocks differ from its
    unweighted ones in every weighted matrix."""
    weighted = theirs(llama_quantize, llama, tmp_path / "weighted.gguf", "q4_k_s")
    llama_quantize(llama.f32, tmp_path / "plain.gguf", "Q4_K_S", "2")
    changed = {d.split(" ")[0] for d in gguf_differences(weighted, tmp_path / "plain.gguf") if "bytes" in d}
    assert changed == set(read_imatrix(llama.imatrix).entries)


def test_bloom_with_a_dat_file(tiny_bloom, tmp_path, llama_quantize, gguf_differences):
    """BLOOM (attn_qkv, tied output) with rows of 64: the K types fall back to Q5_0 / Q4_0 /
    Q8_0, quantized with the weights of their own type; a legacy .dat imatrix."""
    model = _model(tmp_path, tiny_bloom, fmt="dat")
    mine = ours(model, tmp_path / "ours.gguf", "q3_k_m")
    assert gguf_differences(mine, theirs(llama_quantize, model, tmp_path / "theirs.gguf", "q3_k_m")) == []
    assert {Q.Q4_0, Q.Q5_0} <= set(types(mine).values())


# ------------------------------------------------------------------------------------------ partial and odd files


def test_missing_and_extra_entries_as_llama_quantize(llama, tmp_path, llama_quantize, gguf_differences):
    """Tensors without an entry are quantized unweighted (blk.0.ffn_down still takes Q4_1: an
    imatrix was given); entries for tensors the model lacks, and a token embedding's of another
    size, are ignored; the file name and dataset are cut to 127 bytes; no chunk count, no
    chunks_count key."""
    data = read_imatrix(llama.imatrix)
    for name in [n for n in data.entries if ".attn_v." in n or n.startswith("blk.2.") or n == "blk.0.ffn_down.weight"]:
        del data.entries[name]
    data.entries["blk.99.attn_q.weight"] = Entry(np.ones((1, 7), np.float32), np.array([3], np.float32))
    data.entries["token_embd.weight"] = Entry(np.ones((1, 7), np.float32), np.array([3], np.float32))
    data.datasets, data.chunk_count = ["d" * 200, "other.txt"], 0
    long_dir = tmp_path / ("x" * 100)
    long_dir.mkdir()
    imatrix = write_imatrix(data, long_dir / "partial-imatrix.gguf")
    assert len(str(imatrix).encode()) > 127
    for mix in ("q4_0", "q4_k_m"):
        mine = ours(llama, tmp_path / f"ours-{mix}.gguf", mix, imatrix=imatrix)
        reference = theirs(llama_quantize, llama, tmp_path / f"theirs-{mix}.gguf", mix, imatrix=imatrix)
        assert gguf_differences(mine, reference) == [], mix
        assert mine.read_bytes() == reference.read_bytes()
    meta = read_header(mine).metadata
    assert [k for k in meta if k.startswith("quantize.")] == [
        "quantize.imatrix.file",
        "quantize.imatrix.dataset",
        "quantize.imatrix.entries_count",
    ]
    assert meta["quantize.imatrix.file"] == str(imatrix)[:127]
    assert meta["quantize.imatrix.dataset"] == "d" * 127
    assert meta["quantize.imatrix.entries_count"] == len(data.entries)
    assert types(mine)["blk.0.ffn_down.weight"] is Q.Q6_K  # q4_k_m: more bits (no imatrix rule)
    assert types(tmp_path / "ours-q4_0.gguf")["blk.0.ffn_down.weight"] is Q.Q4_1


def test_no_matching_entry_warns(llama, tmp_path, llama_quantize):
    data = read_imatrix(llama.imatrix)
    data.entries = {"blk.99.attn_q.weight": Entry(np.ones((1, 256), np.float32), np.array([3], np.float32))}
    imatrix = write_imatrix(data, tmp_path / "unrelated.gguf")
    warnings: list[str] = []
    mine = ours(llama, tmp_path / "ours.gguf", "q6_k", imatrix=imatrix, warn=warnings.append)
    assert any("no entry for any tensor" in w and str(imatrix) in w for w in warnings)
    assert (
        mine.read_bytes()
        == theirs(llama_quantize, llama, tmp_path / "theirs.gguf", "q6_k", imatrix=imatrix).read_bytes()
    )


# ------------------------------------------------------------------------------------------ refusals


def test_wrong_size_refused_before_writing(llama, tmp_path, llama_quantize, gguf_differences):
    data = read_imatrix(llama.imatrix)
    data.entries["blk.3.attn_q.weight"] = Entry(np.ones((1, 128), np.float32), np.array([3], np.float32))
    bad = write_imatrix(data, tmp_path / "bad.gguf")
    run = llama_quantize("--imatrix", bad, llama.f32, tmp_path / "theirs.gguf", "Q4_K_M", "2", check=False)
    assert run.returncode and "imatrix size 128 is different from tensor size 256" in run.stdout + run.stderr
    out = tmp_path / "out" / "ours.gguf"
    out.parent.mkdir()
    with pytest.raises(WeightopsError, match=rf"{bad}: imatrix tensor 'blk.3.attn_q.weight': 128 weights, .* 256"):
        ours(llama, out, "q4_k_m", imatrix=bad)
    assert list(out.parent.iterdir()) == []
    # a tensor llama-quantize leaves in its input type is not quantized: its entry is never checked
    keep = "blk.3.attn_q.weight"
    llama_quantize("--tensor-type", f"{keep}=f32", "--imatrix", bad, llama.f32, tmp_path / "kept.gguf", "Q4_K_M", "2")
    mine = ours(llama, tmp_path / "ours-kept.gguf", "q4_k_m", imatrix=bad, tensor_types=[f"{keep}=f32"])
    assert gguf_differences(mine, tmp_path / "kept.gguf") == []


def test_converter_types_refuse_an_imatrix(llama, tmp_path):
    for mix in ("f16", "q8_0"):
        with pytest.raises(WeightopsError, match=f"--imatrix applies to .*--type {mix} is convert_hf_to_gguf.py's own"):
            ours(llama, tmp_path / f"{mix}.gguf", mix)
        assert not (tmp_path / f"{mix}.gguf").exists()


# ------------------------------------------------------------------------------------------ CLI and jobs


def test_cli_records_the_path_as_given(llama, tmp_path, monkeypatch, cli, llama_quantize):
    """llama-quantize records --imatrix as typed (here relative): so do we."""
    monkeypatch.chdir(llama.imatrix.parent)
    r = cli("gguf", llama.checkpoint, tmp_path / "ours.gguf", "--type", "q5_0", "--imatrix", llama.imatrix.name)
    assert r.exit_code == 0, r.output
    llama_quantize("--imatrix", llama.imatrix.name, llama.f32, tmp_path / "theirs.gguf", "Q5_0", "2")
    assert read_header(tmp_path / "ours.gguf").metadata["quantize.imatrix.file"] == llama.imatrix.name
    assert (tmp_path / "ours.gguf").read_bytes() == (tmp_path / "theirs.gguf").read_bytes()


def test_job_takes_an_imatrix_step(llama, tmp_path):
    job = tmp_path / "job.toml"
    job.write_text(
        f'[job]\nname = "j"\noutput = "out"\n[inputs]\nm = "{llama.checkpoint}"\n'
        f'text = "{llama.f32.parent / "calibration.txt"}"\n'
        '[[steps]]\nname = "im"\nop = "imatrix"\nmodel = "@m"\noutput = "m.imatrix"\ntext = "@text"\n'
        '[[steps]]\nname = "q"\nop = "gguf"\nmodel = "@m"\noutput = "m.gguf"\ntype = "q4_k_m"\nimatrix = "@im"\n'
    )
    loaded = load_job(job)
    step = loaded.steps[1]
    produced = loaded.steps[0].output
    assert step.argv[step.argv.index("--imatrix") + 1] == str(produced)
    assert produced in step.inputs
