"""Shared fixtures: tiny models and tokenizers made once per session (no downloads)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from weightops import tiny  # noqa: E402
from weightops.cli import main  # noqa: E402


@pytest.fixture(scope="session")
def spm_tokenizer(tmp_path_factory) -> Path:
    """LLaMA-style SentencePiece tokenizer directory (tokenizer.model + HF files), 400 pieces."""
    return tiny.spm_tokenizer_dir(tmp_path_factory.mktemp("spm"))


@pytest.fixture(scope="session")
def bpe_tokenizer(tmp_path_factory) -> Path:
    """BLOOM-style byte-level BPE tokenizer directory, 400 tokens."""
    return tiny.bpe_tokenizer_dir(tmp_path_factory.mktemp("bpe"))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, spm_tokenizer) -> Path:
    """bf16 LLaMA, 2 layers, 4 heads / 2 key-value heads (GQA), untied lm_head."""
    return tiny.tiny_llama(tmp_path_factory.mktemp("llama") / "model", spm_tokenizer)


@pytest.fixture(scope="session")
def tiny_llama_tied(tmp_path_factory, spm_tokenizer) -> Path:
    """bf16 LLaMA with tied embeddings and no GQA."""
    return tiny.tiny_llama(tmp_path_factory.mktemp("llama_tied") / "model", spm_tokenizer, kv_heads=4, tied=True,
                           seed=1)


@pytest.fixture(scope="session")
def tiny_bloom(tmp_path_factory, bpe_tokenizer) -> Path:
    """bf16 BLOOM, 2 layers, 4 heads, tied output."""
    return tiny.tiny_bloom(tmp_path_factory.mktemp("bloom") / "model", bpe_tokenizer)


class CliResult:
    def __init__(self, result):
        self.exit_code = result.exit_code
        self.output = result.output
        self.stdout = result.stdout
        self.stderr = result.stderr
        self.exception = result.exception


@pytest.fixture
def cli():
    """Run `weightops ARGS...` in-process; returns exit code, stdout and stderr."""
    def run(*args: str | Path) -> CliResult:
        return CliResult(CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True))
    return run


@pytest.fixture(scope="session")
def load_all():
    """`load_all(path)`: every tensor of a checkpoint, loaded (tests only: tiny models)."""
    from weightops.checkpoint import open_checkpoint

    def load(path: Path) -> dict[str, torch.Tensor]:
        return {r.name: r.load().clone() for r in open_checkpoint(path).tensors}
    return load


@pytest.fixture(scope="session")
def llama_cpp_source() -> Path:
    """llama.cpp's source tree at the pinned commit (the one vendored in the installed
    llama-cpp-python), for its own tools as oracles (convert_hf_to_gguf.py with its `conversion`
    package and gguf-py).
    Fetched once from the package registry (the sdist) into a cache outside the repository;
    skips when neither the cache nor the registry is there."""
    import importlib.metadata
    import subprocess
    import sys
    import tarfile
    import tempfile

    version = importlib.metadata.version("llama-cpp-python")
    cache = Path(os.environ.get("WEIGHTOPS_TEST_CACHE", Path.home() / ".cache" / "weightops-tests"))
    root = cache / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    if not (root / "conversion" / "__init__.py").is_file():  # the script imports its `conversion` package
        with tempfile.TemporaryDirectory() as tmp:
            got = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-binary", ":all:", "--no-deps",
                                  f"llama-cpp-python=={version}", "-d", tmp], capture_output=True, text=True)
            sdists = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
            if got.returncode or not sdists:
                pytest.skip(f"llama-cpp-python {version} source not available: {got.stderr.strip()[-300:]}")
            prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
            with tarfile.open(sdists[0]) as tar:
                wanted = [m for m in tar.getmembers() if m.name.startswith(prefix) and (
                    m.name == prefix + "convert_hf_to_gguf.py" or m.name.startswith((prefix + "gguf-py/",
                                                                                      prefix + "conversion/")))]
                tar.extractall(cache, members=wanted, filter="data")
    return root
