"""weightops: streaming tensor operators for LLM release engineering.

The public library API: one function per command (see `weightops.pipelines`) plus the
checkpoint reader and writer they share. Names are resolved on first use, so that
`import weightops` (and every CLI start) stays free of torch, transformers and llama.cpp.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> the module that defines it
_API = {
    "Checkpoint": "io.checkpoint",
    "open_checkpoint": "io.checkpoint",
    "save_hf": "io.checkpoint",
    "hf_view": "io.remap",
    "TensorRef": "stream",
    "WeightopsError": "errors",
    "MismatchError": "errors",
    "apply_delta": "pipelines.deltas",
    "make_delta": "pipelines.deltas",
    "DeltaReport": "pipelines.deltas",
    "convert_checkpoint": "pipelines.convert",
    "ConvertReport": "pipelines.convert",
    "expand_vocab": "pipelines.expand_vocab",
    "VocabReport": "pipelines.expand_vocab",
    "export_gguf": "pipelines.gguf",
    "export_gguf_matrix": "pipelines.gguf",
    "GGUFVariant": "pipelines.gguf",
    "GGUFReport": "pipelines.gguf",
    "export_bnb": "pipelines.bnb",
    "BnbReport": "pipelines.bnb",
    "export_fused": "pipelines.fused",
    "FusedReport": "pipelines.fused",
    "verify_checkpoint": "pipelines.verify",
    "raise_if_failed": "pipelines.verify",
    "create_manifest": "pipelines.manifest",
    "check_manifest": "pipelines.manifest",
    "inspect_checkpoint": "pipelines.inspect",
    "run_job": "jobs",
    "run_demo": "jobs.demo",
}

__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'weightops' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_API[name]}"), name)
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
