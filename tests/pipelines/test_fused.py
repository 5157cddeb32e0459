"""One read of a checkpoint for GGUF and bitsandbytes outputs together: every file is the
bytes of that output's own run (`export_gguf`, `export_bnb`), and each source tensor is
loaded once (a double-quant output's sizing pass apart)."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest

pytest.importorskip("bitsandbytes")

from weightops.errors import WeightopsError  # noqa: E402
from weightops.io.checkpoint import open_checkpoint  # noqa: E402
from weightops.pipelines import fused as fused_lib  # noqa: E402
from weightops.pipelines.bnb import export_bnb  # noqa: E402
from weightops.pipelines.gguf import export_gguf  # noqa: E402

GGUF = ["q8_0", "q4_k_m"]
BNB = {"int8": dict(bits=8), "nf4-dq": dict(bits=4, quant_type="nf4", double_quant=True)}


def _files(path: Path) -> dict[str, bytes]:
    """Every file of an output (a directory's, its ownership marker included), by relative name."""
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture
def loads(monkeypatch) -> Counter:
    """How often each tensor of the checkpoint the fused pass opens is loaded from it."""
    counts: Counter = Counter()

    def counting(path):
        ckpt = open_checkpoint(path)

        def loader(ref):
            def load():
                counts[ref.name] += 1
                return ref.loader()

            return load

        return replace(ckpt, tensors=[replace(r, loader=loader(r)) for r in ckpt.tensors])

    monkeypatch.setattr(fused_lib, "open_checkpoint", counting)
    return counts


@pytest.fixture(scope="module")
def single(tmp_path_factory, tiny_llama) -> dict[str, dict[str, bytes]]:
    """The oracle: each output written by its own run."""
    out = tmp_path_factory.mktemp("single")
    files = {}
    for t in GGUF:
        export_gguf(tiny_llama, out / f"{t}.gguf", type=t, device="cpu")
        files[t] = _files(out / f"{t}.gguf")
    for label, options in BNB.items():
        export_bnb(tiny_llama, out / label, device="cpu", **options)
        files[label] = _files(out / label)
    return files


def test_every_output_is_its_own_runs_bytes_from_one_read(tiny_llama, tmp_path, single, loads):
    report = fused_lib.export_fused(
        tiny_llama,
        [tmp_path / f"{t}.gguf" for t in GGUF],
        GGUF,
        {"device": "cpu"},
        bnb=[dict(output=tmp_path / label, device="cpu", **options) for label, options in BNB.items()],
    )
    for label in [*GGUF, *BNB]:
        path = tmp_path / (f"{label}.gguf" if label in GGUF else label)
        ours = _files(path)
        assert sorted(ours) == sorted(single[label]), label
        for name, data in single[label].items():
            assert ours[name] == data, f"{label}: {name}"
    assert [r.output for r in report.gguf] == [tmp_path / f"{t}.gguf" for t in GGUF]
    assert [sorted(p.name for p in r.files) for r in report.bnb] == [
        sorted(n for n in single[label] if not n.startswith(".")) for label in BNB
    ]
    # one load per tensor, plus one for each weight the double-quant output sized first
    sized = set(report.bnb[1].quantized)
    names = open_checkpoint(tiny_llama).names()
    assert sized and dict(loads) == {n: 1 + (n in sized) for n in names}


def test_a_sharded_bnb_output_is_its_own_runs_bytes(tiny_llama, tmp_path, loads):
    export_bnb(tiny_llama, tmp_path / "alone", bits=8, device="cpu", max_shard_size="40KB")
    alone = _files(tmp_path / "alone")
    loads.clear()
    fused_lib.export_fused(
        tiny_llama,
        [tmp_path / "q8_0.gguf"],
        ["q8_0"],
        {"device": "cpu"},
        bnb=[dict(output=tmp_path / "fused", bits=8, device="cpu", max_shard_size="40KB")],
    )
    assert sum(n.endswith(".safetensors") for n in alone) > 2  # sharded, with an index
    assert _files(tmp_path / "fused") == alone
    assert set(loads.values()) == {1} and set(loads) == set(open_checkpoint(tiny_llama).names())


def test_bnb_outputs_alone_share_the_read(tiny_llama, tmp_path, single, loads):
    fused_lib.export_fused(tiny_llama, bnb=[dict(output=tmp_path / "int8", bits=8, device="cpu")])
    assert _files(tmp_path / "int8") == single["int8"]
    assert set(loads.values()) == {1}


def test_options_that_change_the_gguf_read_are_refused(tiny_llama, tmp_path):
    with pytest.raises(WeightopsError, match="--lora"):
        fused_lib.export_fused(
            tiny_llama, [tmp_path / "a.gguf"], ["q8_0"], {"lora": [tmp_path]}, bnb=[dict(output=tmp_path / "b", bits=8)]
        )
    assert not (tmp_path / "a.gguf").exists() and not (tmp_path / "b").exists()
