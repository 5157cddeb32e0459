"""inspect, manifest and the CLI's error contract."""

import json
import re
from pathlib import Path

import gguf
import pytest
import torch

from weightops.errors import MismatchError
from weightops.io.checkpoint import open_checkpoint, save_hf
from weightops.pipelines.manifest import check_manifest, create_manifest
from weightops.verify import manifest


def test_inspect_parameter_count_matches_transformers(cli, tiny_llama, tiny_bloom):
    from transformers import AutoModelForCausalLM

    files = {"llama": {"tokenizer.model": 400, "tokenizer.json": 400}, "bloom": {"tokenizer.json": 400}}
    for path, arch in ((tiny_llama, "llama"), (tiny_bloom, "bloom")):
        r = cli("inspect", path, "--json")
        assert r.exit_code == 0, r.stderr
        doc = json.loads(r.stdout)
        model = AutoModelForCausalLM.from_pretrained(path)
        assert doc["parameter_count"] == sum(p.numel() for p in model.parameters())
        assert doc["format"] == "hf-safetensors" and doc["architecture"] == arch
        assert doc["vocab"] == {
            "config": 400,
            "tokenizer": 400,
            "embedding_rows": 400,
            "padding_rows": 0,
            "agree": True,
            "tokenizer_files": files[arch],
            "conflicts": [],
        }
        assert doc["dtypes"] == {"bfloat16": doc["tensor_count"]}
        assert {"format", "architecture", "tensor_count", "parameter_count", "dtypes", "files", "vocab"} <= doc.keys()


def test_inspect_flags_vocab_disagreement(cli, tmp_path, tiny_llama):
    src = open_checkpoint(tiny_llama)
    out = tmp_path / "bad"
    save_hf(src.tensors, out, aux_files=src.aux_files, config_update={"vocab_size": 32000})
    r = cli("inspect", out)
    assert r.exit_code == 0
    assert "config 32000, tokenizer 400, embedding rows 400" in r.stdout and "DISAGREE" in r.stdout
    assert json.loads(cli("inspect", out, "--json").stdout)["vocab"]["agree"] is False


def test_vocab_triple_padding_is_not_drift():
    from weightops.io.vocabulary import VocabTriple

    assert VocabTriple(512, 400, 512).agree and VocabTriple(512, 400, 512).padding_rows == 112
    assert not VocabTriple(512, 513, 512).agree  # a token without a row
    assert not VocabTriple(400, 400, 512).agree  # config drifted from the embedding


def test_manifest_create_check_and_tamper(cli, tmp_path, tiny_llama):
    src = open_checkpoint(tiny_llama)
    out = tmp_path / "m"
    save_hf(src.tensors, out, aux_files=src.aux_files, max_shard_size="60KB")
    assert cli("manifest", "create", out).exit_code == 0
    first = (out / "weightops-manifest.json").read_text()
    assert cli("manifest", "create", out).exit_code == 0
    assert (out / "weightops-manifest.json").read_text() == first  # deterministic
    ok = cli("manifest", "check", out)
    assert ok.exit_code == 0 and "match" in ok.stdout

    # flip one byte inside a tensor's data (past the header)
    shard = sorted(out.glob("model-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    (out / "tokenizer_config.json").unlink()
    bad = cli("manifest", "check", out)
    assert bad.exit_code == 3
    assert shard.name in bad.stderr and "tokenizer_config.json: missing" in bad.stderr
    changed = [name for name in json.loads(first)["tensors"] if f"tensor {name}:" in bad.stderr]
    assert len(changed) == 1


def test_manifest_is_stable_across_reserialisation(tmp_path, tiny_llama):
    """Tensor hashes survive re-sharding; file hashes do not."""
    src = open_checkpoint(tiny_llama)
    a, b = tmp_path / "a", tmp_path / "b"
    save_hf(src.tensors, a)
    save_hf(src.tensors, b, max_shard_size="60KB")
    ma, mb = manifest.compute(a), manifest.compute(b)
    assert {k: v["sha256"] for k, v in ma["tensors"].items()} == {k: v["sha256"] for k, v in mb["tensors"].items()}
    assert ma["files"].keys() != mb["files"].keys()


def test_manifest_check_reports_truncation_as_mismatch(tmp_path, tiny_bloom):
    src = open_checkpoint(tiny_bloom)
    out = tmp_path / "m"
    save_hf(src.tensors, out)
    create_manifest(out)
    f = out / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(MismatchError, match=r"(?s)file model\.safetensors: sha256.*tensors unreadable.*truncated"):
        check_manifest(out)


def test_errors_are_one_line_and_debug_shows_traceback(cli, tmp_path, tiny_bloom):
    out = tmp_path / "x"
    out.mkdir()
    (out / "f").write_text("x")
    r = cli("manifest", "check", tmp_path / "x")
    assert r.exit_code == 1 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    missing = cli("inspect", tmp_path / "nothing-here")
    assert missing.exit_code == 2  # usage: click validates the path
    r = cli("--debug", "manifest", "check", tmp_path / "x")
    assert r.exit_code == 1 and r.exception is not None


def test_demo_runs_the_release_template(cli, tmp_path):
    """The README's main command: every operator on tiny models, verified, with a report."""
    r = cli("demo", tmp_path / "demo")
    assert r.exit_code == 0, r.stderr
    # the screen: one line per step, then a short summary (the tables are in the report)
    assert r.stdout == "" and "Result: **PASSED**" in (tmp_path / "demo" / "release" / "release-report.md").read_text()
    screen = r.stderr.splitlines()
    steps = (Path(__file__).parents[2] / "examples" / "release.toml").read_text().count("[[steps]]")
    assert len([line for line in screen if re.match(rf"\[ ?\d+/{steps}\] ok ", line)]) == steps == 19, r.stderr
    assert any(line.startswith("PASSED  tiny LLaMA chat") for line in screen), r.stderr
    assert f"  report     {tmp_path / 'demo' / 'release' / 'release-report.md'}" in screen
    assert "MatMul8bitLt" not in r.stderr and "sha256`" not in r.stderr
    report = json.loads((tmp_path / "demo" / "release" / "release-report.json").read_text())
    ops = {s["op"] for s in report["steps"]}
    assert ops == {"make-delta", "apply-delta", "convert", "expand-vocab", "gguf", "bnb", "verify", "manifest"}
    assert all(s["status"] == "ok" for s in report["steps"])
    checked = {v["step"]: v for v in report["verifications"]}
    assert checked["check-q4_k_m"]["passed"]  # llama-quantize's Q4_K_M mix, run in llama.cpp
    q4_k_m = gguf.GGUFReader(tmp_path / "demo" / "release" / "llama-chat-q4_k_m.gguf")
    assert q4_k_m.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q4_K_M
    exact = {v["step"]: v["kld_max"] for v in report["verifications"]}
    assert exact["check-merged"] == 0 and exact["check-tencentpretrain"] == 0
    assert (tmp_path / "demo" / "release.toml").read_text() == (
        Path(__file__).parents[2] / "examples" / "release.toml"
    ).read_text()
    assert cli("demo", tmp_path / "demo").exit_code == 1  # exists, needs --force


def test_tensor_hash_is_of_the_stored_bytes_however_read(tmp_path, tiny_llama):
    """safetensors tensors are hashed from the file; `.bin` ones from the loaded tensor: both
    are sha256 of the same little-endian bytes, so a converted checkpoint keeps its hashes."""
    import hashlib

    from safetensors.torch import load_file

    src = open_checkpoint(tiny_llama)
    stored = {}
    for f in tiny_llama.glob("*.safetensors"):
        for name, t in load_file(f).items():
            stored[name] = hashlib.sha256(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
    assert all(r.span is not None for r in src.tensors)
    assert {r.name: manifest.sha256_tensor(r) for r in src.tensors} == stored
    as_bin = tmp_path / "bin"
    as_bin.mkdir()
    torch.save({r.name: r.load() for r in src.tensors}, as_bin / "pytorch_model.bin")
    assert {k: v["sha256"] for k, v in manifest.compute(as_bin)["tensors"].items()} == stored


def test_command_modules_are_where_the_lazy_group_looks(tmp_path, tiny_llama):
    """The CLI imports a command's module only when it runs: its table must name them all,
    and inspect / manifest must then start without torch."""
    import subprocess
    import sys

    from weightops import cli

    commands = cli.all_commands()
    assert set(commands) == set(cli._MODULES)
    assert {n: c.callback.__module__.rsplit(".", 1)[1] for n, c in commands.items()} == cli._MODULES
    code = (
        "import sys; from weightops.cli import main\n"
        "for argv in (['inspect', sys.argv[1]], ['manifest', 'create', sys.argv[1]]):\n"
        "    main(['-q', *argv], standalone_mode=False)\n"
        "print(sorted(m for m in ('torch', 'transformers', 'gguf') if m in sys.modules))"
    )
    src = open_checkpoint(tiny_llama)
    copy = tmp_path / "m"  # manifest create writes into the model
    save_hf(src.tensors, copy, aux_files=src.aux_files)
    out = subprocess.run([sys.executable, "-c", code, str(copy)], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr
