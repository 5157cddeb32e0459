"""Reading a GGUF split set as one model (`io.gguf_split`): what llama.cpp's loader refuses is
refused first, naming the file; the split size reads as convert_hf_to_gguf.py reads it."""

from __future__ import annotations

import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from weightops.errors import WeightopsError
from weightops.io.checkpoint import open_checkpoint
from weightops.io.gguf_split import first_split, parse_split_size


@pytest.fixture(scope="module")
def split_set(tmp_path_factory, tiny_llama) -> list[Path]:
    from weightops.pipelines.gguf import export_gguf

    out = tmp_path_factory.mktemp("set") / "m.gguf"
    files = export_gguf(tiny_llama, out, split_max_tensors=5).files
    assert [p.name for p in files] == [f"m-{i:05d}-of-00005.gguf" for i in range(1, 6)]
    return files


def _copy(files: list[Path], directory: Path) -> list[Path]:
    """Copies without our attributes (as a download is): only the files' own bytes are checked."""
    directory.mkdir()
    for p in files:
        shutil.copyfile(p, directory / p.name)
    return [directory / p.name for p in files]


def _patch(path: Path, key: str, fmt: str, value: int, to: Path | None = None) -> None:
    """Rewrite the value of a scalar key in place (key string, u32 value type, value)."""
    data = bytearray(path.read_bytes())
    at = data.index(key.encode()) + len(key) + 4
    struct.pack_into(fmt, data, at, value)
    (to or path).write_bytes(bytes(data))


def test_the_set_opens_as_one_model(split_set, load_all):
    ckpt = open_checkpoint(split_set[0])
    assert ckpt.weight_files == split_set and len(ckpt.tensors) == 21
    assert ckpt.config["split.count"] == 5 and ckpt.architecture == "llama"
    assert open_checkpoint(split_set[0].with_name("m.gguf")).weight_files == split_set  # the name it was written to
    assert open_checkpoint(split_set[0].parent).weight_files == split_set  # a directory holding one set
    assert first_split(split_set[1]) == split_set[1]


def test_duplicated_tensor(split_set, tmp_path):
    files = _copy(split_set, tmp_path / "dup")
    _patch(files[1], "split.no", "<H", 2, to=files[2])  # file 2's tensors again, claiming to be file 3
    with pytest.raises(WeightopsError, match=r"m-00003-of-00005.gguf: tensor 'blk\.0\.\w+\.weight' is also in m-00002"):
        open_checkpoint(files[0])


def test_miscounted_tensors(split_set, tmp_path):
    files = _copy(split_set, tmp_path / "count")
    for p in files:
        _patch(p, "split.tensors.count", "<i", 22)
    with pytest.raises(WeightopsError, match="its 5 files hold 21 tensors, but split.tensors.count says 22"):
        open_checkpoint(files[0])


def test_a_file_that_disagrees_with_the_first(split_set, tmp_path):
    files = _copy(split_set, tmp_path / "other")
    _patch(files[3], "split.count", "<H", 6)
    with pytest.raises(WeightopsError) as e:
        open_checkpoint(files[0])
    assert str(e.value).startswith(f"{files[3]}: not split 4 of the set m-00001-of-00005.gguf opens")
    assert "split.count=6" in str(e.value)


def test_a_later_split_names_the_first(split_set):
    with pytest.raises(WeightopsError, match=f"split 3 of 5 .* open the first one: {split_set[0]}"):
        open_checkpoint(split_set[2])


def test_a_first_file_renamed(split_set, tmp_path):
    files = _copy(split_set, tmp_path / "renamed")
    files[0].rename(tmp_path / "renamed" / "m.gguf")
    with pytest.raises(WeightopsError, match="must be named PREFIX-00001-of-00005.gguf"):
        open_checkpoint(tmp_path / "renamed" / "m.gguf")


@pytest.mark.parametrize("text", ["60K", "5M", "2G", "123456", "0"])
def test_split_size_reads_as_convert_hf_to_gguf(text, llama_cpp_source):
    code = (
        "import sys; sys.path[:0] = [sys.argv[1], sys.argv[1] + '/gguf-py']\n"
        "from convert_hf_to_gguf import split_str_to_n_bytes; print(split_str_to_n_bytes(sys.argv[2]))"
    )
    done = subprocess.run([sys.executable, "-c", code, str(llama_cpp_source), text], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    theirs = int(done.stdout.split()[-1])
    if theirs == 0:  # their "no limit"; ours is "give no option"
        with pytest.raises(WeightopsError, match="must be more than 0 bytes"):
            parse_split_size(text)
    else:
        assert parse_split_size(text) == theirs


@pytest.mark.parametrize("text", ["1.5G", "5GB", "-1", "G", ""])
def test_split_size_refused(text):
    with pytest.raises(WeightopsError, match="--split-max-size"):
        parse_split_size(text)
