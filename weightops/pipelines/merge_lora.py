"""`weightops merge-lora`: a base checkpoint and LoRA adapters in, the merged HF checkpoint out,
in one streaming pass (`ops.lora` holds the arithmetic; this module matches the adapters'
modules to the base's tensors and refuses, all problems at once, what does not line up).

`lora_stage` is the part other commands compose: it turns an HF-named stream and its config
into the merged stream, so `weightops gguf --lora` writes the merged model's GGUF without a
merged checkpoint in between.

Conventions:
* adapters apply in the order given, each to the result of the ones before (Chinese-Alpaca-Plus
  is LLaMA-Plus's LoRA, then Alpaca-Plus's);
* whole tensors an adapter carries (modules_to_save) replace the base's and may add
  vocabulary rows; config.json's vocab_size follows, and the tokenizer comes from the last
  adapter directory that has one (it must cover the embedding's rows);
* a tied output head stays tied unless an adapter changes the embedding or the head: then the
  output is untied (the head keeps the weights it was trained with) and config.json says so;
* a TencentPretrain adapter (Q and V of each layer, rows in TencentPretrain's interleaved
  rotary order) lands on the matching Hugging Face rows, whether the base is HF or
  TencentPretrain; the output is an HF checkpoint either way.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from .. import arch
from ..arch import VOCAB_ROLES, ArchSpec, Hparams, Role, Transform
from ..arch.transforms import interleaved_rows, qkv_rows, rotary_heads
from ..errors import WeightopsError, shown
from ..io.checkpoint import open_checkpoint, save_hf
from ..io.hf import aux_files
from ..io.lora import LoraAdapter, LoraModule, read_adapter
from ..io.outputs import Output
from ..io.remap import complete_hf_config, hf_view
from ..io.tokenizer_edit import TOKENIZER_FILES
from ..io.tokenizer_files import read_tokenizer_files
from ..ops.lora import ROUNDINGS, LowRank, Shift, Step, Update
from ..ops.lora import merge_lora as merge_stream
from ..stream import TensorRef

__all__ = ["ROUNDINGS", "LoraReport", "lora_stage", "merge_lora"]

_MAX_LISTED = 30


@dataclass
class LoraReport:
    """What a merge did, for the CLI summary and for callers."""

    adapters: list[str] = field(default_factory=list)
    merged: list[str] = field(default_factory=list)  # tensors an adapter changed
    replaced: list[str] = field(default_factory=list)  # tensors an adapter carried whole
    untied: bool = False
    vocab: tuple[int, int] | None = None  # (rows before, rows after) when the embedding grew
    tokenizer: Path | None = None  # adapter directory the tokenizer comes from (None: the base's)
    config_update: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)


def merge_lora(
    base: str | Path,
    adapters: Sequence[str | Path],
    output: str | Path,
    *,
    dtype: torch.dtype | None = None,
    rounding: str = "once",
    tp_lora_r: int | None = None,
    tp_lora_alpha: float | None = None,
    max_shard_size: str | int = "5GB",
    force: bool = False,
) -> LoraReport:
    """Merge `adapters` (in order) into `base` and write the result to `output` (an HF
    safetensors directory with the base's config and the right tokenizer). Every problem with
    the adapters is refused before anything is written."""
    if not adapters:
        raise WeightopsError("merge-lora needs at least one ADAPTER")
    ckpt = open_checkpoint(base)
    if ckpt.format == "gguf":
        raise WeightopsError(f"BASE {ckpt.path} is a GGUF file; merge into the HF or TencentPretrain checkpoint")
    target = Output(output, [ckpt.path, *adapters], kind="dir", force=force)
    refs, config = hf_view(ckpt)
    merged, report = lora_stage(
        refs,
        config,
        adapters,
        base=ckpt.path,
        rounding=rounding,
        dtype=dtype,
        tp_lora_r=tp_lora_r,
        tp_lora_alpha=tp_lora_alpha,
    )
    update = dict(report.config_update)
    tokenizer = report.tokenizer or ckpt.directory
    tok_files = [f for f in aux_files(tokenizer) if f.name in TOKENIZER_FILES]  # no links out of the directory
    extra: dict[str, str | bytes] = {}
    if ckpt.format.startswith("hf-"):
        aux = [f for f in ckpt.aux_files if f.name not in TOKENIZER_FILES] + tok_files
    else:  # a TencentPretrain base: config.json from its translated config
        aux = tok_files
        extra["config.json"] = json.dumps({**config, **update}, indent=2, sort_keys=True) + "\n"
    report.files = save_hf(
        merged,
        target,
        aux_files=aux,
        extra_files=extra,
        max_shard_size=max_shard_size,
        config_update=update or None,
        desc="merging LoRA",
    )
    return report


def lora_stage(
    refs: Sequence[TensorRef],
    config: dict,
    adapters: Sequence[str | Path],
    *,
    base: Path,
    rounding: str = "once",
    dtype: torch.dtype | None = None,
    tp_lora_r: int | None = None,
    tp_lora_alpha: float | None = None,
) -> tuple[list[TensorRef], LoraReport]:
    """The merged stream of HF-named `refs` (with `config`, the base's HF config dict), and a
    report whose `config_update` the caller applies to the config. Raises, listing every
    problem, when the adapters do not fit the base."""
    if rounding not in ROUNDINGS:
        raise WeightopsError(f"--rounding {rounding!r}: choose one of {', '.join(ROUNDINGS)}")
    plan = _Plan(list(refs), config, Path(base))
    for path in adapters:
        plan.add(read_adapter(path, tp_r=tp_lora_r, tp_alpha=tp_lora_alpha))
    stream = plan.finish()
    if dtype is not None:
        name = str(dtype).removeprefix("torch.")
        plan.report.config_update.update({k: name for k in ("dtype", "torch_dtype") if k in config})
    return list(merge_stream(stream, plan.steps, rounding=rounding, dtype=dtype)), plan.report


# --- matching adapters to the base ---------------------------------------------------------------


class _Plan:
    """The steps per base tensor, built adapter by adapter while the shapes each adapter leaves
    behind are tracked; problems are collected and raised together by `finish`."""

    def __init__(self, refs: list[TensorRef], config: dict, base: Path):
        self.base, self.refs = base, refs
        names = {r.name for r in refs}
        model_type = config.get("model_type")
        self.spec: ArchSpec | None = arch.get(model_type) if arch.is_supported(model_type) else arch.detect(names, "hf")
        self.key = self.spec.normalize_hf if self.spec else (lambda n: n)
        self.by_key = {self.key(r.name): r for r in refs}
        self.shapes = {k: r.shape for k, r in self.by_key.items()}
        self.config = config
        self.embedding = self._role_key(Role.EMBEDDING)
        self.output = self._role_key(Role.OUTPUT)
        self.tied = self.embedding in self.by_key and self.output is not None and self.output not in self.by_key
        if self.tied:
            assert self.output is not None and self.embedding is not None
            self.shapes[self.output] = self.shapes[self.embedding]
        self.rows = self.shapes.get(self.embedding or "", (0,))[0]
        self.steps: dict[str, list[Step]] = {}
        self.changed: set[str] = set()
        self.keep_tied = False
        self.problems: list[str] = []
        self.report = LoraReport()

    @functools.cached_property
    def hp(self) -> Hparams:
        """Head counts, for TencentPretrain adapters' row orders (transformers' config defaults: a slow import)."""
        if self.spec is None or not self.config:
            raise WeightopsError(f"BASE {self.base}: no config.json; its head counts are needed to place the rows")
        return self.spec.config.hparams(complete_hf_config(self.config))

    def _role_key(self, role: Role) -> str | None:
        row = self.spec.tensor(role) if self.spec else None
        return self.key(row.hf) if row else None

    # one adapter

    def add(self, adapter: LoraAdapter) -> None:
        self.report.adapters.append(str(adapter.path))
        self.problems += adapter.problems
        self.keep_tied |= adapter.keep_tied
        if adapter.ignored:
            self.report.warnings.append(
                f"{adapter.label}: {len(adapter.ignored)} saved module(s) its adapter_config.json does not target "
                f"(PEFT loads them into nothing, so they are not merged): {', '.join(adapter.ignored[:8])}"
                + (" ..." if len(adapter.ignored) > 8 else "")
            )
        self._check_base_name(adapter)
        if adapter.tokenizer_dir is not None:
            self.report.tokenizer = adapter.tokenizer_dir
        before = len(self.problems)
        found = 0
        pending: dict[str, tuple[TensorRef | None, list[Update]]] = {}
        for name, ref in adapter.tensors.items():
            found += self._replacement(adapter, name, ref, pending)
        for module in adapter.modules:
            found += self._module(adapter, module, pending)
        if not found and (adapter.modules or adapter.tensors) and len(self.problems) > before:
            other = self._foreign_arch(adapter)
            if other:
                del self.problems[before:]
                self.problems.append(other)
        for key, (replace, updates) in pending.items():
            self.steps.setdefault(key, []).append(Step(str(adapter.path), replace, tuple(updates)))
            self.changed.add(key)

    def _check_base_name(self, adapter: LoraAdapter) -> None:
        trained = adapter.base_model
        if not trained:
            return
        if Path(trained).name.lower() not in (self.base.name.lower(), self.base.resolve().name.lower()):
            self.report.warnings.append(
                f"{adapter.label} was trained on {shown(trained)!r} (base_model_name_or_path), "
                f"and BASE is {shown(str(self.base))}: make sure it is the same model"
            )

    def _foreign_arch(self, adapter: LoraAdapter) -> str | None:
        scheme = "tp" if adapter.kind == "tencentpretrain" else "hf"
        names = {f"{m.path}.weight" for m in adapter.modules} | set(adapter.tensors)
        other = arch.detect(names, scheme)
        if other is None or (self.spec is not None and other.name == self.spec.name):
            return None
        return (
            f"{adapter.label} is for a {other.name} model (none of its modules is in BASE {self.base}, "
            f"a {self.spec.name if self.spec else 'model of unknown architecture'})"
        )

    def _resolve(self, adapter: LoraAdapter, name: str) -> tuple[str | None, Callable | None]:
        """(stream key of a parameter named by the adapter, the view its rows land on)."""
        if adapter.kind != "tencentpretrain":
            return self.key(name), None
        hit = self.spec.lookup(name, "tp") if self.spec else None
        if hit is None:
            return None, None
        row, layer, pos = hit
        key = self.key(row.hf.format(n=layer))
        if row.to_tp in (Transform.ROTARY_Q, Transform.ROTARY_K):
            return key, partial(interleaved_rows, heads=rotary_heads(row.to_tp, self.hp))
        if row.to_tp is Transform.QKV_SPLIT:
            return key, partial(qkv_rows, heads=self.hp.heads, index=pos)
        return key, None

    def _missing(self, adapter: LoraAdapter, what: str, name: str, key: str | None) -> int:
        self.problems.append(
            f"{adapter.label}: {what} {shown(name)!r} is not in BASE {self.base}"
            + (f" (no tensor {key!r})" if key and key != name else "")
        )
        return 0

    def _replacement(self, adapter: LoraAdapter, name: str, ref: TensorRef, pending: dict) -> int:
        key, rows = self._resolve(adapter, name)
        if key is None or key not in self.shapes:
            return self._missing(adapter, "tensor", name, key)
        if rows is not None:
            self.problems.append(f"{adapter.label}: whole tensor {name!r} lies in a fused or permuted base tensor")
            return 1
        have = self.shapes[key]
        vocab = self._is_vocab(key)
        if ref.shape != have and not (vocab and len(ref.shape) == 2 and ref.shape[1:] == have[1:]):
            self.problems.append(
                f"{adapter.label}: tensor {name!r} is {ref.shape}, BASE's {key!r} is {have} ({ref.source})"
            )
            return 1
        if not ref.is_float:
            self.problems.append(f"{adapter.label}: tensor {name!r} is {ref.dtype_name}, not a float")
            return 1
        self.shapes[key] = ref.shape
        pending.setdefault(key, (None, []))
        pending[key] = (ref, pending[key][1])
        self.report.replaced.append(key)
        return 1

    def _is_vocab(self, key: str) -> bool:
        return self.spec is not None and self.spec.role(key, "hf") in VOCAB_ROLES

    def _module(self, adapter: LoraAdapter, m: LoraModule, pending: dict) -> int:
        key, rows = self._resolve(adapter, f"{m.path}.weight")
        if key is None or key not in self.shapes:
            return self._missing(adapter, "module", m.path, key)
        shape = self.shapes[key]
        where = f"{adapter.label}: module {shown(m.path)!r}"
        out_rows, in_cols = m.b.shape[0], m.a.shape[1]
        want = (in_cols, out_rows) if (m.fan_in_fan_out or m.embedding) else (out_rows, in_cols)
        view = rows(torch.empty(shape, device="meta")) if rows is not None else None
        fits = view.numel() == out_rows * in_cols and view.shape[-1] == in_cols if view is not None else shape == want
        if not fits:
            self.problems.append(
                f"{where}: lora_B @ lora_A is {want} ({m.b.shape} @ {m.a.shape}) but BASE's {key!r} is {shape}"
            )
            return 1
        if m.embedding and not (self.spec is not None and self.spec.role(key, "hf") is Role.EMBEDDING):
            self.problems.append(f"{where}: an embedding LoRA on {key!r}, which is not the embedding")
            return 1
        if m.magnitude is not None and m.magnitude.shape != (out_rows,):
            self.problems.append(f"{where}: lora_magnitude_vector is {m.magnitude.shape}, its output has {out_rows}")
            return 1
        update = LowRank(
            m.a,
            m.b,
            m.scaling,
            transpose=m.fan_in_fan_out or m.embedding,
            embedding=m.embedding,
            magnitude=m.magnitude,
            rows=rows,
        )
        pending.setdefault(key, (None, []))[1].append(update)
        if m.bias is not None:
            bias_key = key.removesuffix("weight") + "bias"
            if bias_key not in self.shapes:
                self.problems.append(f"{where}: has lora_B.bias (lora_bias) but BASE has no {bias_key!r} to add it to")
            elif self.shapes[bias_key] != m.bias.shape:
                self.problems.append(
                    f"{where}: lora_B.bias is {m.bias.shape}, BASE's {bias_key!r} is {self.shapes[bias_key]}"
                )
            else:
                pending.setdefault(bias_key, (None, []))[1].append(Shift(m.bias, m.scaling))
        return 1

    # all adapters

    def finish(self) -> list[TensorRef]:
        """The base stream (with an untied output head added when one is needed); raises on problems."""
        stream = list(self.refs)
        emb, out = self.embedding, self.output
        if self.tied and emb is not None and out is not None:
            if self.keep_tied:
                if out in self.changed:
                    self.problems.append(
                        "ensure_weight_tying is set, but an adapter changes the tied output head; "
                        "merging that is not supported"
                    )
            elif emb in self.changed or out in self.changed:
                head = self.by_key[emb].renamed(self.spec.tensor(Role.OUTPUT).hf if self.spec else out)  # type: ignore[union-attr]
                self.by_key[out] = head
                stream.append(head)
                self.report.untied = True
                self.report.config_update["tie_word_embeddings"] = False
        self._check_vocab()
        if self.problems:
            listed = self.problems[:_MAX_LISTED]
            if len(self.problems) > _MAX_LISTED:
                listed.append(f"... and {len(self.problems) - _MAX_LISTED} more")
            raise WeightopsError(
                f"the adapters do not fit BASE {self.base}; nothing was written:\n  " + "\n  ".join(listed)
            )
        self.steps = {self.by_key[k].name: v for k, v in self.steps.items()}
        self.report.merged = sorted(self.steps)
        return stream

    def _check_vocab(self) -> None:
        emb, out = self.embedding, self.output
        if emb is None or emb not in self.shapes:
            return
        rows = self.shapes[emb][0]
        heads = [out] if out is not None and (out in self.by_key or self.report.untied) else []
        for head in heads:
            if self.shapes[head][0] != rows:
                self.problems.append(
                    f"after the adapters, the embedding {emb!r} has {rows} rows but the output head {head!r} "
                    f"{self.shapes[head][0]}: both must cover the same vocabulary"
                    + (" (the head was tied to the base's embedding)" if self.tied and self.report.untied else "")
                )
        if rows != self.rows:
            self.report.vocab = (self.rows, rows)
            self.report.config_update["vocab_size"] = rows
            if self.report.tokenizer is None:
                self.problems.append(
                    f"the adapters change the vocabulary from {self.rows} to {rows} rows, but no adapter "
                    "directory has tokenizer files for the new tokens"
                )
        if self.report.tokenizer is not None:
            files = read_tokenizer_files(self.report.tokenizer)
            self.problems += files.problems(rows=rows, embedding=f"{emb!r} after the adapters")
