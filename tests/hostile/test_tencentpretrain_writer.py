"""`convert --to tencentpretrain` when the write fails: a tensor that cannot be loaded,
Ctrl-C, a full disk. torch's zip writer used to be left unclosed on the error path and
aborted the process from its destructor (`terminate called ...`, exit 134) with the
temporary output left behind. Each case runs the real CLI in a subprocess."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

# Runs `weightops ARGS` after arranging one failure. argv: MODE ARG -- weightops args.
DRIVER = r"""
import builtins, errno, os, signal, sys
import weightops.io.torchbin as torchbin
import weightops.stream as stream

# Ctrl-C as a terminal delivers it, even when this test runs in a background job (which
# starts children with SIGINT ignored, so Python would never raise KeyboardInterrupt)
signal.signal(signal.SIGINT, signal.default_int_handler)
mode, arg = sys.argv[1], sys.argv[2]
if mode == "fail-load":  # reading the ARG-th tensor from its safetensors file fails
    import weightops.io.safetensors as st
    original, calls = st._Mapping.tensor, []
    def tensor(self, info):
        calls.append(info)
        if len(calls) == int(arg):
            raise RuntimeError("simulated read error")
        return original(self, info)
    st._Mapping.tensor = tensor
elif mode == "sigint-load":  # Ctrl-C arrives while tensor ARG is being loaded
    original = stream.TensorRef.load
    def load(self):
        if self.name == arg:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self)
    stream.TensorRef.load = load
else:  # Ctrl-C or a full disk at the ARG-th write the zip writer makes to its file
    class File:
        def __init__(self, f):
            self.f, self.writes = f, 0
        def write(self, data):
            self.writes += 1
            if self.writes == int(arg):
                if mode == "sigint-write":
                    os.kill(os.getpid(), signal.SIGINT)
                else:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.f.write(data)
        def __getattr__(self, name):
            return getattr(self.f, name)
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            return self.f.__exit__(*exc)
    torchbin.open = lambda *a, **k: File(builtins.open(*a, **k))

from weightops.cli import run
sys.argv = ["weightops", *sys.argv[4:]]
run()
"""


def convert_to_tp(
    model: Path, output: Path, mode: str = "none", arg: str = "-", *extra: str, driver: Path | None = None
) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(driver), mode, arg, "--"] if driver else [sys.executable, "-m", "weightops"]
    return subprocess.run(
        [*cmd, "convert", str(model), str(output), "--to", "tencentpretrain", *extra],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


@pytest.fixture
def driver(tmp_path: Path) -> Path:
    path = tmp_path / "driver.py"
    path.write_text(DRIVER)
    return path


def assert_clean_failure(result: subprocess.CompletedProcess, code: int, out_parent: Path, *named: str) -> None:
    err = result.stderr
    assert result.returncode == code, f"exit {result.returncode}:\n{err}"
    assert "terminate called" not in err and "Traceback" not in err, err
    for name in named:
        assert name in err, f"{name!r} not in:\n{err}"
    leftovers = sorted(p.name for p in out_parent.iterdir() if p.name not in ("driver.py", "model"))
    assert leftovers == [], f"left behind: {leftovers}"


TENSOR = "encoder.transformer.1.feed_forward.linear_gate.weight"  # TencentPretrain name of layer 1 gate_proj


def test_tensor_that_fails_to_load(tiny_llama: Path, tmp_path: Path, driver: Path) -> None:
    result = convert_to_tp(tiny_llama, tmp_path / "tp", "fail-load", "10", driver=driver)
    assert_clean_failure(result, 1, tmp_path, "model.safetensors: tensor 'model.layers.", "simulated read error")


def test_tensor_whose_data_is_short(tiny_llama: Path, tmp_path: Path) -> None:
    """A real damaged file: the header promises a 4x4 float32 tensor, the data holds 8 bytes."""
    model = tmp_path / "model"
    model.mkdir()
    header = json.dumps({"model.embed_tokens.weight": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 8]}})
    (model / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header.encode() + bytes(8))
    (model / "config.json").write_text((tiny_llama / "config.json").read_text())
    result = convert_to_tp(model, tmp_path / "tp")
    assert_clean_failure(result, 1, tmp_path, "model.safetensors")


def test_ctrl_c_while_loading(tiny_llama: Path, tmp_path: Path, driver: Path) -> None:
    result = convert_to_tp(tiny_llama, tmp_path / "tp", "sigint-load", TENSOR, driver=driver)
    assert_clean_failure(result, 130, tmp_path, "interrupted")


@pytest.mark.parametrize("write", [3, 12])  # inside the zip's first records / inside a tensor's data
def test_ctrl_c_inside_the_zip_writer(tiny_llama: Path, tmp_path: Path, driver: Path, write: int) -> None:
    result = convert_to_tp(tiny_llama, tmp_path / "tp", "sigint-write", str(write), driver=driver)
    assert_clean_failure(result, 130, tmp_path, "interrupted")


def test_disk_full_inside_the_zip_writer(tiny_llama: Path, tmp_path: Path, driver: Path) -> None:
    """ENOSPC raised by the file object the zip writer writes through (simulated in the child)."""
    result = convert_to_tp(tiny_llama, tmp_path / "tp", "enospc-write", "12", driver=driver)
    assert_clean_failure(result, 1, tmp_path, "tencentpretrain_model.bin", "No space left on device")


def test_disk_full_on_a_real_file_system(tiny_llama: Path, tmp_path: Path) -> None:
    """A 256 KiB tmpfs (needs root and mount; skipped otherwise) and a float32 model of ~1 MB."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], capture_output=True, check=False
    )
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        result = convert_to_tp(tiny_llama, disk / "tp", "none", "-", "--dtype", "float32")
        assert_clean_failure(result, 1, disk, "No space left on device", str(disk))
    finally:
        subprocess.run(["umount", str(disk)], check=True)
