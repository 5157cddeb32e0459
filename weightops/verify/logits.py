"""Run one model at a time on fixed token ids and give back its logits.

A model is whatever `open_checkpoint` reads, run by the runtime users will run it with:
HF checkpoints by transformers (`from_pretrained`), TencentPretrain checkpoints streamed
through the remap view into the same transformers model, GGUF files by llama.cpp itself
(llama-cpp-python) or, as a second independent reader, by transformers' GGUF loader.

The reference's logits are kept per prompt in a `LogitStore` (RAM up to a limit, then a
temporary file) while its model is freed, so that the candidate runs in the memory the
reference had: a pair of models fits where one fits.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np
import torch

from .. import dtypes
from ..devices import resolve_device
from ..errors import WeightopsError
from ..io.checkpoint import Checkpoint, Format, open_checkpoint
from ..io.vocabulary import embedding_name

if TYPE_CHECKING:
    from transformers import PreTrainedModel

GGUF_RUNTIMES = ("llama.cpp", "transformers")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


@dataclass
class Model:
    """A checkpoint as the verification sees it, read from headers only."""

    path: Path
    ckpt: Checkpoint
    vocab: int | None  # rows of the output distribution (embedding rows)
    context: int | None  # longest input the model was built for, when it says
    tokenizer: Path | None  # its own HF tokenizer directory (None for GGUF: llama.cpp's)
    tensor_types: set[str] = field(default_factory=set)  # dtypes / GGML types / bnb-* of its matrices

    @property
    def format(self) -> Format:
        return self.ckpt.format


def describe(path: str | Path, tp_config: str | Path | None = None) -> Model:
    """What the verification must know before running anything (vocabulary, context, tokenizer,
    matrix types), from headers and config files only."""
    ckpt = open_checkpoint(path)
    if ckpt.format is Format.TENCENTPRETRAIN and tp_config is not None:  # --tp-config is for whichever side is TP
        ckpt = open_checkpoint(path, tp_config)
    emb = embedding_name(ckpt)
    cfg = ckpt.config or {}
    vocab = ckpt.tensor(emb).shape[0] if emb else cfg.get("vocab_size")
    if ckpt.format is Format.GGUF:
        context = cfg.get(f"{ckpt.architecture}.context_length")
        tokenizer = None
    else:
        context = _hf_config(ckpt).get("max_position_embeddings")
        d = ckpt.directory
        tokenizer = d if any((d / f).is_file() for f in _TOKENIZER_FILES) else None
    types = {r.stored_type for r in ckpt.tensors if len(r.shape) >= 2}
    if bnb := _bnb_type(cfg if ckpt.format is not Format.GGUF else {}):
        types = {bnb}  # packed bytes: the quantization says what the weights are
    return Model(Path(path), ckpt, vocab, context, tokenizer, types)


def _bnb_type(config: dict) -> str | None:
    """`bnb-int8`, `bnb-nf4` or `bnb-fp4` for a checkpoint saved by bitsandbytes (`weightops bnb`)."""
    q = config.get("quantization_config") or {}
    if q.get("quant_method") != "bitsandbytes":
        return None
    return "bnb-int8" if q.get("load_in_8bit") else f"bnb-{q.get('bnb_4bit_quant_type', 'fp4')}"


def _hf_config(ckpt: Checkpoint) -> dict:
    if ckpt.format is Format.TENCENTPRETRAIN:
        from ..io.remap import hf_view

        return hf_view(ckpt)[1]
    return dict(ckpt.config or {})


def compute_dtype(device: torch.device, dtype: str | None) -> torch.dtype:
    """`auto`: bf16 on a CUDA device that has it (else fp16), fp32 on CPU."""
    chosen = dtypes.from_choice(dtype)
    if chosen is not None:
        return chosen
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


class Runner:
    """A loaded model: `logits(ids)` is float32 [len(ids), vocab] for the ids fed as one sequence."""

    info: dict[str, Any]

    def logits(self, ids: list[int]) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        """Free the model now (before the next one loads)."""


class TorchRunner(Runner):
    def __init__(self, model: torch.nn.Module, device: torch.device, info: dict[str, Any]):
        self.model, self.device, self.info = model.eval(), device, info

    def logits(self, ids: list[int]) -> np.ndarray:
        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([ids], device=self.device)).logits[0]
            return out.float().cpu().numpy()

    def close(self) -> None:
        del self.model
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


class LlamaCppRunner(Runner):
    """llama.cpp evaluating exactly the given ids (KV cache cleared per prompt). The KV cache is
    float32 and flash attention off, so what is measured is the file, not a runtime setting."""

    def __init__(self, path: Path, n_ctx: int, device: torch.device):
        try:
            import llama_cpp
        except ImportError:
            raise WeightopsError(
                f"{path}: running a GGUF file needs llama-cpp-python (pip install llama-cpp-python), "
                "or use --gguf-runtime transformers"
            ) from None
        gpu = device.type == "cuda" and llama_cpp.llama_supports_gpu_offload()
        self.llm = llama_cpp.Llama(
            model_path=str(path),
            logits_all=True,
            n_ctx=n_ctx,
            n_batch=min(n_ctx, 512),
            verbose=False,
            type_k=0,
            type_v=0,
            flash_attn=False,
            n_gpu_layers=-1 if gpu else 0,
            n_threads=_cpu_threads(),
        )
        self.info = {
            "runtime": f"llama.cpp (llama-cpp-python {llama_cpp.__version__})",
            "device": "cuda" if gpu else "cpu",
            "dtype": "as stored (F32 KV cache)",
        }

    def logits(self, ids: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def close(self) -> None:
        self.llm.close()
        del self.llm
        gc.collect()


def _cpu_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def load_runner(
    model: Model, *, device: str = "auto", dtype: str | None = "auto", gguf_runtime: str = "llama.cpp", n_ctx: int = 512
) -> Runner:
    """Load `model` for inference; `n_ctx` is the longest sequence it will be fed."""
    dev = resolve_device(device)
    if model.format is Format.GGUF:
        if gguf_runtime not in GGUF_RUNTIMES:
            raise WeightopsError(f"--gguf-runtime {gguf_runtime!r}: choose one of {', '.join(GGUF_RUNTIMES)}")
        if gguf_runtime == "llama.cpp":
            return LlamaCppRunner(model.ckpt.path, n_ctx, dev)  # the first split: llama.cpp finds the rest
        if len(model.ckpt.weight_files) > 1:
            raise WeightopsError(
                f"{model.path}: transformers' GGUF loader reads one file, not a split set of "
                f"{len(model.ckpt.weight_files)}; use --gguf-runtime llama.cpp"
            )
    dt = compute_dtype(dev, dtype)
    _quiet_transformers()
    if model.format is Format.TENCENTPRETRAIN:
        net, runtime = _tp_model(model.ckpt, dev, dt), "transformers (TencentPretrain streamed through the remap)"
    elif model.format is Format.GGUF:
        net, runtime = _gguf_transformers(model.ckpt.path, dev, dt), "transformers (GGUF loader)"
    else:
        net, runtime = _hf_model(model.ckpt.directory, dev, dt), "transformers"
    import transformers

    return TorchRunner(
        net,
        dev,
        {
            "runtime": f"{runtime} {transformers.__version__}",
            "device": dev.type,
            "dtype": str(dt).removeprefix("torch."),
        },
    )


def _quiet_transformers() -> None:
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def _device_map(dev: torch.device) -> dict | None:
    return {"": dev} if dev.type == "cuda" else None


def _hf_model(directory: Path, dev: torch.device, dt: torch.dtype) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(str(directory), dtype=dt, device_map=_device_map(dev))
    except Exception as e:  # transformers raises many types for unloadable checkpoints
        raise WeightopsError(f"{directory}: transformers cannot load it ({type(e).__name__}: {e})") from None


def _gguf_transformers(path: Path, dev: torch.device, dt: torch.dtype) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=dt, device_map=_device_map(dev)
        )
    except Exception as e:
        raise WeightopsError(f"{path}: transformers cannot load this GGUF file ({type(e).__name__}: {e})") from None


def _tp_model(ckpt: Checkpoint, dev: torch.device, dt: torch.dtype) -> torch.nn.Module:
    """A transformers model built from the remap view's config, its weights read one tensor at
    a time (each cast and moved as it is read, so the peak is the model in its compute dtype)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    from ..io.remap import hf_view

    refs, cfg = hf_view(ckpt)
    config = AutoConfig.for_model(cfg["model_type"], **{k: v for k, v in cfg.items() if k != "model_type"})
    state = {}
    for ref in refs:
        state[ref.name] = ref.load().to(device=dev, dtype=dt if ref.dtype.is_floating_point else None)
        ref.release()
    # Any: transformers annotates every auto mapping's values as the tokenizer mapping's (slow, fast)
    # pair, and from_pretrained as returning the model alone even with output_loading_info
    model_class: Any = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    model, info = model_class.from_pretrained(None, config=config, state_dict=state, dtype=dt, output_loading_info=True)
    del state
    missing = [k for k in info.get("missing_keys", ()) if not _tied(model, k)]
    if missing or info.get("unexpected_keys"):
        raise WeightopsError(
            f"{ckpt.path}: the remapped tensors do not fit {type(model).__name__}: missing "
            f"{sorted(missing)}, unexpected {sorted(info.get('unexpected_keys', ()))}"
        )
    return model.to(dev)


def _tied(model: PreTrainedModel, key: str) -> bool:
    out = model.get_output_embeddings()
    return key.startswith("lm_head") and out is not None and out.weight is model.get_input_embeddings().weight


class LogitStore:
    """The reference's logits per prompt: in RAM until `ram_bytes` are held, then appended to a
    temporary file and read back memory-mapped (so a large vocabulary costs disk, not RAM)."""

    def __init__(self, ram_bytes: int = 1 << 30, spill_dir: str | Path | None = None):
        self.ram_bytes, self.spill_dir = ram_bytes, spill_dir
        self._items: list[np.ndarray | tuple[int, tuple[int, ...]]] = []
        self._held = 0
        self._file: IO[bytes] | None = None
        self.spilled = 0

    def add(self, logits: np.ndarray) -> int:
        logits = np.ascontiguousarray(logits, dtype=np.float32)
        if self._held + logits.nbytes <= self.ram_bytes:
            self._items.append(logits)
            self._held += logits.nbytes
        else:
            if self._file is None:
                self._file = tempfile.NamedTemporaryFile(
                    prefix="weightops-verify-", suffix=".logits", dir=self.spill_dir
                )
            self._items.append((self.spilled, logits.shape))
            logits.tofile(self._file)
            self._file.flush()
            self.spilled += logits.nbytes
        return len(self._items) - 1

    def get(self, index: int) -> np.ndarray:
        item = self._items[index]
        if isinstance(item, np.ndarray):
            return item
        offset, shape = item
        assert self._file is not None  # spilled items are in the file
        # copy-on-write: a writable view (torch wraps it without a warning), the file never changes
        return np.memmap(self._file.name, dtype=np.float32, mode="c", offset=offset, shape=shape)

    def close(self) -> None:
        self._items.clear()
        if self._file is not None:
            self._file.close()  # deletes it
            self._file = None

    def __enter__(self) -> LogitStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class CachedLogits:
    """A reference's logits read back from a `LogitCache` entry: `get(i)` as `LogitStore.get`."""

    def __init__(self, file: Path, shapes: list[tuple[int, ...]], info: dict[str, Any]):
        self.file, self.info = file, info
        self._where: list[tuple[int, tuple[int, ...]]] = []
        offset = 0
        for shape in shapes:
            self._where.append((offset, shape))
            offset += int(np.prod(shape)) * 4

    def get(self, index: int) -> np.ndarray:
        offset, shape = self._where[index]
        return np.memmap(self.file, dtype=np.float32, mode="c", offset=offset, shape=shape)


class LogitCache:
    """Reference logits kept on disk so that several verifications against one reference run it
    once (the job runner's verify steps). The directory must belong to one reference content:
    the runner names it by the sha256 of the reference's files. Within it an entry is keyed by
    the token ids and the run settings (device, dtype, runtime, library versions), so a
    different prompt set or setting computes again. An entry is written whole (logits, then
    the index that commits it) under a lock, so a verification that starts while another
    computes the same entry waits for it instead of computing it twice."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)

    @staticmethod
    def key(ids: list[tuple[int, ...]] | list[list[int]], settings: dict[str, Any]) -> str:
        versions: dict[str, str | None] = {}
        for package in ("torch", "transformers", "llama_cpp_python"):
            try:
                versions[package] = metadata.version(package)
            except metadata.PackageNotFoundError:
                versions[package] = None
        doc = {"ids": [list(i) for i in ids], "settings": settings, "versions": versions}
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()

    @contextlib.contextmanager
    def locked(self, key: str) -> Iterator[None]:
        """This process alone computes or reads entry `key` inside."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.directory / f"{key}.lock", "wb") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def load(self, key: str) -> CachedLogits | None:
        """The entry when it is whole (its index written, its logits file the size the index says)."""

        index, data = self.directory / f"{key}.json", self.directory / f"{key}.logits"
        try:
            doc = json.loads(index.read_text())
            shapes = [tuple(int(n) for n in s) for s in doc["shapes"]]
            if data.stat().st_size != sum(int(np.prod(s)) for s in shapes) * 4:
                return None
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return CachedLogits(data, shapes, dict(doc.get("info") or {}))

    def save(self, key: str, store: LogitStore, count: int, info: dict[str, Any]) -> None:
        """Write the first `count` logits of `store` as entry `key` (logits first, index last)."""

        self.directory.mkdir(parents=True, exist_ok=True)
        shapes = []
        tmp = self.directory / f".{key}.logits.tmp"
        with open(tmp, "wb") as f:
            for i in range(count):
                logits = np.ascontiguousarray(store.get(i), dtype=np.float32)
                shapes.append(list(logits.shape))
                logits.tofile(f)
        os.replace(tmp, self.directory / f"{key}.logits")
        index_tmp = self.directory / f".{key}.json.tmp"
        index_tmp.write_text(json.dumps({"shapes": shapes, "info": info}))
        os.replace(index_tmp, self.directory / f"{key}.json")
