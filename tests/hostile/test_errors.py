"""Hostile inputs for every command: each must fail with exit 1 (2 for usage), one error line
naming the file (and the tensor where there is one), no traceback, no bare exception type,
and no raw control character from a file reaching the terminal."""

from __future__ import annotations

import json
import re
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

EVIL = "evil\nerror: forged line \x1b[31mred"  # a tensor name / token that tries to forge output
_BARE = re.compile(r"^error: [A-Za-z]*(Error|Exception)\b")


# --- building bad inputs ----------------------------------------------------------------------


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def raw_safetensors(path: Path, header: object, data: bytes = b"") -> Path:
    """A safetensors file with exactly this header (any JSON) and data."""
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def edit_config(model: Path, **changes) -> Path:
    cfg = json.loads((model / "config.json").read_text())
    cfg.update(changes)
    (model / "config.json").write_text(json.dumps(cfg))
    return model


def rewrite_tensors(model: Path, fn: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]) -> Path:
    from safetensors.torch import load_file

    path = model / "model.safetensors"
    tensors = fn(load_file(path))
    path.unlink()
    save_file({k: v.contiguous() for k, v in tensors.items()}, path)
    return model


@dataclass
class Case:
    """`build(tmp, models)` makes the inputs and returns the argv; the error must mention
    every string in `names` (the file, the tensor)."""

    build: Callable[[Path, dict[str, Path]], list]
    names: list[str] = field(default_factory=list)
    code: int = 1


def _garbage_file(name: str, data: bytes) -> Callable:
    def build(tmp: Path, m: dict) -> list:
        (tmp / name).write_bytes(data)
        return ["inspect", tmp / name]

    return build


def _model_with(fn: Callable[[Path], object], command: Callable[[Path, Path, dict], list]) -> Callable:
    def build(tmp: Path, m: dict) -> list:
        model = copy_model(m["llama"], tmp / "model")
        fn(model)
        return command(model, tmp, m)

    return build


def _inspect(model: Path, tmp: Path, m: dict) -> list:
    return ["inspect", model]


def _gguf(model: Path, tmp: Path, m: dict) -> list:
    return ["gguf", model, tmp / "out.gguf"]


def _to_tp(model: Path, tmp: Path, m: dict) -> list:
    return ["convert", model, tmp / "tp", "--to", "tencentpretrain"]


def _bnb(model: Path, tmp: Path, m: dict) -> list:
    return ["bnb", model, tmp / "bnb", "--bits", "8", "--device", "cpu"]


def _expand(model: Path, tmp: Path, m: dict) -> list:
    (tmp / "tokens.txt").write_text("hello\nworld\n")
    return ["expand-vocab", model, tmp / "out", "--add-tokens", tmp / "tokens.txt"]


def _apply_to_original(delta: Path, tmp: Path, m: dict) -> list:
    return ["apply-delta", m["llama"], delta, tmp / "out"]


def _zero_sized_linear(tensors: dict) -> dict:
    return {**tensors, "model.layers.1.mlp.down_proj.weight": torch.zeros(64, 0, dtype=torch.bfloat16)}


def _evil_names(tensors: dict) -> dict:
    tensors[EVIL] = torch.zeros(2)
    return tensors


def _header_without_offsets(tmp: Path, m: dict) -> list:
    raw_safetensors(tmp / "model.safetensors", {"w": {"dtype": "F32", "shape": [2]}}, b"\0" * 8)
    return ["inspect", tmp / "model.safetensors"]


def _header_list(tmp: Path, m: dict) -> list:
    raw_safetensors(tmp / "model.safetensors", [1, 2, 3])
    return ["inspect", tmp / "model.safetensors"]


def _header_offsets_text(tmp: Path, m: dict) -> list:
    raw_safetensors(tmp / "model.safetensors", {"w": {"dtype": "F32", "shape": [2], "data_offsets": "x"}}, b"\0" * 8)
    return ["inspect", tmp / "model.safetensors"]


def _short_window(tmp: Path, m: dict) -> list:
    """A window shorter than shape x dtype: reading the tensor fails (or the header check does)."""
    raw_safetensors(
        tmp / "model.safetensors", {"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 8]}}, b"\0" * 8
    )
    return ["manifest", "create", tmp / "model.safetensors"]


def _index_weight_map_list(model: Path) -> None:
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["a", "b"]}))


def _index_evil_shard(model: Path) -> None:
    (model / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"lm_head.weight": "shard\n\x1b[31m.safetensors"}})
    )


def _config_list(model: Path) -> None:
    (model / "config.json").write_text("[1, 2]")


def _config_garbage(model: Path) -> None:
    (model / "config.json").write_bytes(b"\xff\xfe{not json")


def _bin_garbage(tmp: Path, m: dict) -> list:
    (tmp / "pytorch_model.bin").write_bytes(b"PK\x03\x04" + b"\x00" * 100)
    return ["inspect", tmp / "pytorch_model.bin"]


def _gguf_garbage(tmp: Path, m: dict) -> list:
    (tmp / "model.gguf").write_bytes(b"GGUF" + struct.pack("<I", 3) + b"\xff" * 40)
    return ["inspect", tmp / "model.gguf"]


def _manifest_check_bad(tmp: Path, m: dict) -> list:
    model = copy_model(m["llama"], tmp / "model")
    (model / "weightops-manifest.json").write_text(json.dumps({"files": 5, "tensors": "x"}))
    return ["manifest", "check", model]


def _delta_nan(tmp: Path, m: dict) -> list:
    delta = copy_model(m["llama"], tmp / "delta")

    def poison(t: dict) -> dict:
        w = torch.zeros_like(t["model.layers.0.mlp.up_proj.weight"])
        w[3, 5] = float("nan")
        return {k: (w if k == "model.layers.0.mlp.up_proj.weight" else torch.zeros_like(v)) for k, v in t.items()}

    rewrite_tensors(delta, poison)
    return ["apply-delta", m["llama"], delta, tmp / "out"]


def _make_delta_overflow(tmp: Path, m: dict) -> list:
    """fp16 target - base overflows to inf in the fp16 delta."""
    base, target = copy_model(m["llama"], tmp / "base"), copy_model(m["llama"], tmp / "target")
    name = "model.layers.1.self_attn.o_proj.weight"
    rewrite_tensors(base, lambda t: {k: (torch.full_like(v, -60000) if k == name else v).half() for k, v in t.items()})
    rewrite_tensors(target, lambda t: {k: (torch.full_like(v, 60000) if k == name else v).half() for k, v in t.items()})
    return ["make-delta", base, target, tmp / "out"]


def _tp_config_zero_heads(tmp: Path, m: dict) -> list:
    (tmp / "cfg.json").write_text(json.dumps({"heads_num": 0}))
    tp = tmp / "tp"
    from click.testing import CliRunner

    from weightops.cli import main

    assert CliRunner().invoke(main, ["convert", str(m["llama"]), str(tp), "--to", "tencentpretrain"]).exit_code == 0
    return ["convert", tp, tmp / "hf", "--to", "hf", "--tp-config", tmp / "cfg.json"]


def _prompts_binary(tmp: Path, m: dict) -> list:
    (tmp / "prompts.jsonl").write_bytes(b'{"text": 5}\n{"text": ["x"]}\n')
    return ["verify", m["llama"], m["llama"], "--prompts", tmp / "prompts.jsonl", "--device", "cpu"]


def _job_wrong_types(tmp: Path, m: dict) -> list:
    (tmp / "job.toml").write_text('[job]\noutput = 5\n[[steps]]\nname = "x"\nop = 3\n')
    return ["run", tmp / "job.toml"]


def _job_garbage(tmp: Path, m: dict) -> list:
    (tmp / "job.toml").write_bytes(b"\x00\xff[[[ not toml")
    return ["run", tmp / "job.toml"]


def _tokens_evil(tmp: Path, m: dict) -> list:
    (tmp / "tokens.txt").write_bytes(b"\xff\xfe\x00bad utf8\n")
    return ["expand-vocab", m["llama"], tmp / "out", "--add-tokens", tmp / "tokens.txt"]


CASES = {
    # readers: garbage, truncation, wrong JSON shapes
    "inspect-garbage-safetensors": Case(_garbage_file("model.safetensors", b"\x07" * 5), ["model.safetensors"]),
    "inspect-huge-header-length": Case(
        _garbage_file("model.safetensors", struct.pack("<Q", 2**40) + b"{}"), ["model.safetensors"]
    ),
    "inspect-header-not-json": Case(
        _garbage_file("model.safetensors", struct.pack("<Q", 4) + b"\xff\xfe{["), ["model.safetensors"]
    ),
    "inspect-header-list": Case(_header_list, ["model.safetensors"]),
    "inspect-header-no-offsets": Case(_header_without_offsets, ["model.safetensors"]),
    "inspect-header-offsets-text": Case(_header_offsets_text, ["model.safetensors"]),
    "manifest-short-window": Case(_short_window, ["model.safetensors"]),
    "inspect-bin-garbage": Case(_bin_garbage, ["pytorch_model.bin"]),
    "inspect-gguf-garbage": Case(_gguf_garbage, ["model.gguf"]),
    "inspect-index-list": Case(_model_with(_index_weight_map_list, _inspect), ["model.safetensors.index.json"]),
    "inspect-index-evil-shard": Case(_model_with(_index_evil_shard, _inspect), ["model.safetensors.index.json"]),
    "inspect-config-list": Case(_model_with(_config_list, _inspect), ["config.json"]),
    "inspect-config-garbage": Case(_model_with(_config_garbage, _inspect), ["config.json"]),
    "manifest-check-wrong-types": Case(_manifest_check_bad, ["weightops-manifest.json"]),
    # configs that contradict arithmetic
    "gguf-zero-heads": Case(_model_with(lambda p: edit_config(p, num_attention_heads=0), _gguf), ["config.json"]),
    "gguf-heads-text": Case(_model_with(lambda p: edit_config(p, num_attention_heads="four"), _gguf), ["config.json"]),
    "gguf-zero-layers": Case(_model_with(lambda p: edit_config(p, num_hidden_layers=0), _gguf), ["config.json"]),
    "gguf-eps-text": Case(_model_with(lambda p: edit_config(p, rms_norm_eps="small"), _gguf), ["config.json"]),
    "convert-zero-heads": Case(_model_with(lambda p: edit_config(p, num_attention_heads=0), _to_tp), ["config.json"]),
    "convert-kv-heads-list": Case(
        _model_with(lambda p: edit_config(p, num_key_value_heads=[2]), _to_tp), ["config.json"]
    ),
    "convert-tp-config-zero-heads": Case(_tp_config_zero_heads, ["cfg.json"]),
    "bnb-dtype-number": Case(_model_with(lambda p: edit_config(p, dtype=5), _bnb), ["config.json"]),
    "expand-vocab-size-text": Case(_model_with(lambda p: edit_config(p, vocab_size="lots"), _expand), ["config.json"]),
    "expand-vocab-tokens-not-utf8": Case(_tokens_evil, ["tokens.txt"]),
    # tensors: hostile names, zero-sized, NaN/inf deltas
    "gguf-evil-name": Case(_model_with(lambda p: rewrite_tensors(p, _evil_names), _gguf), ["model"]),
    "apply-delta-evil-name": Case(
        _model_with(lambda p: rewrite_tensors(p, _evil_names), _apply_to_original), ["model.safetensors", "evil\\n"]
    ),
    "gguf-zero-sized": Case(
        _model_with(lambda p: rewrite_tensors(p, _zero_sized_linear), _gguf),
        ["config.json", "model.layers.1.mlp.down_proj.weight"],
    ),  # caught before writing
    "bnb-zero-sized": Case(
        _model_with(lambda p: rewrite_tensors(p, _zero_sized_linear), _bnb),
        ["config.json", "model.layers.1.mlp.down_proj.weight"],
    ),
    "apply-delta-nan": Case(_delta_nan, ["model.layers.0.mlp.up_proj.weight", "delta"]),
    "make-delta-overflow": Case(_make_delta_overflow, ["model.layers.1.self_attn.o_proj.weight", "--dtype float32"]),
    # options and other files
    "verify-max-tokens-negative": Case(
        lambda t, m: ["verify", m["llama"], m["llama"], "--max-tokens", "-5"], ["--max-tokens"], code=2
    ),
    "verify-max-tokens-zero": Case(
        lambda t, m: ["verify", m["llama"], m["llama"], "--max-tokens", "0"], ["--max-tokens"], code=2
    ),
    "verify-prompts-wrong-types": Case(_prompts_binary, ["prompts.jsonl"]),
    "run-wrong-types": Case(_job_wrong_types, ["job.toml"]),
    "run-garbage": Case(_job_garbage, ["job.toml"]),
}


@pytest.fixture(scope="module")
def models(tiny_llama) -> dict[str, Path]:
    return {"llama": tiny_llama}


def check_error(result, names: list[str], code: int) -> str:
    """The shared assertions; returns the error text."""
    err = result.stderr
    assert result.exit_code == code, f"exit {result.exit_code}, stderr:\n{err}\nexception: {result.exception!r}"
    assert "Traceback" not in result.output + err
    for ch in "\x1b\r\x00\x07":
        assert ch not in result.output + err, f"raw {ch!r} in output:\n{err!r}"
    assert "\nerror: forged" not in result.output + err
    if code == 1:
        lines = [line for line in err.splitlines() if line.startswith("error: ")]
        assert len(lines) == 1, err
        assert not _BARE.match(lines[0]), lines[0]
    for name in names:
        assert name in err, f"{name!r} not named in:\n{err}"
    return err


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_hostile_input_fails_cleanly(case: str, tmp_path: Path, models: dict[str, Path], cli) -> None:
    spec = CASES[case]
    args = spec.build(tmp_path, models)
    result = cli(*args)
    check_error(result, spec.names, spec.code)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert not leftovers, f"temporary files left behind: {leftovers}"


# --- outputs that cannot be written: one line naming the path and the system's reason ---------


@pytest.fixture
def read_only_dir(tmp_path: Path, models: dict[str, Path]):
    """A directory holding a copy of the model, bind-mounted read-only onto itself (EROFS).
    Tests run as root, where chmod 0o500 stops nothing; skipped where mounting is not allowed."""
    import subprocess

    ro = tmp_path / "ro"
    copy_model(models["llama"], ro / "model")
    steps = [["mount", "--bind", str(ro), str(ro)], ["mount", "-o", "remount,bind,ro", str(ro)]]
    for i, step in enumerate(steps):
        done = subprocess.run(step, capture_output=True, check=False)
        if done.returncode:
            if i:
                subprocess.run(["umount", str(ro)], check=False)
            pytest.skip(f"cannot make a read-only bind mount: {done.stderr.decode().strip()}")
    yield ro
    subprocess.run(["umount", str(ro)], check=True)


@pytest.mark.parametrize("command", ["gguf", "apply-delta", "convert", "manifest"])
def test_read_only_output(command: str, read_only_dir: Path, models: dict[str, Path], cli) -> None:
    model, out = models["llama"], read_only_dir / "out"
    args = {
        "gguf": ["gguf", model, out],
        "apply-delta": ["apply-delta", model, model, out, "--allow-suspicious-delta"],
        "convert": ["convert", model, out, "--to", "tencentpretrain"],
        "manifest": ["manifest", "create", read_only_dir / "model"],
    }[command]  # writes into the model
    err = check_error(cli(*args), [str(read_only_dir)], 1)
    assert "Read-only file system" in err
    assert sorted(p.name for p in read_only_dir.iterdir()) == ["model"]


@pytest.mark.parametrize("command", ["gguf", "bnb"])
def test_output_parent_is_a_file(command: str, tmp_path: Path, models: dict[str, Path], cli) -> None:
    (tmp_path / "file").write_text("not a directory")
    out = tmp_path / "file" / "out"
    args = {"gguf": ["gguf", models["llama"], out], "bnb": ["bnb", models["llama"], out, "--bits", "8"]}[command]
    err = check_error(cli(*args), [str(tmp_path / "file")], 1)
    assert "File exists" in err or "Not a directory" in err  # mkdir(parents=True) reports the former


def test_inspect_escapes_names_from_files(tmp_path: Path, models: dict[str, Path], cli) -> None:
    """A shard whose file name holds a newline and an ANSI sequence: listed, escaped, on one line."""
    from safetensors import safe_open

    model = copy_model(models["llama"], tmp_path / "model")
    shard = "w\x1b[31m\nfiles         forged.safetensors"
    (model / "model.safetensors").rename(model / shard)
    with safe_open(model / shard, "pt") as f:
        names = list(f.keys())
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {n: shard for n in names}}))
    result = cli("inspect", model)
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.output
    assert "w\\x1b[31m\\nfiles         forged.safetensors" in result.output
    assert not any(line.startswith("files         forged") for line in result.output.splitlines())
