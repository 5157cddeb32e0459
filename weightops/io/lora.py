"""LoRA adapters on disk, read lazily into one description whatever wrote them.

* PEFT: a directory with `adapter_config.json` and `adapter_model.safetensors` (or the
  `adapter_model.bin` of `safe_serialization=False`, read with weights_only). Tensors are
  named `base_model.model.<module>.lora_A.weight` / `lora_B.weight` (`lora_B.bias` with
  lora_bias), `lora_embedding_A` / `lora_embedding_B` on embeddings and
  `lora_magnitude_vector` for DoRA, all without `.weight`; any other tensor
  (modules_to_save, `bias="all"` biases, an embedding's `base_layer.weight`) replaces the
  model's parameter of that name when PEFT loads the adapter.
* TencentPretrain: `torch.save(lora_state_dict(model))`, bare `lora_A` / `lora_B`
  parameters on TencentPretrain names (Q and V only) and no config, so r and alpha must be
  given.

Nothing here is merged or checked against a base; what PEFT would refuse or silently do
differently is collected in `problems` so that a command can list every one at once.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import WeightopsError, shown
from ..stream import TensorRef
from .paths import member, members
from .safetensors import read_safetensors
from .tokenizer_files import read_tokenizer_files
from .torchbin import read_torch_bin

CONFIG = "adapter_config.json"
WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PREFIX = "base_model.model."
# LoRA tensors by suffix: what each is, and whether it is an embedding's
_PEFT_PARTS = (
    (".lora_A.weight", "a", False),
    (".lora_B.weight", "b", False),
    (".lora_B.bias", "bias", False),
    (".lora_embedding_A", "a", True),
    (".lora_embedding_B", "b", True),
    (".lora_magnitude_vector.weight", "magnitude", False),  # the in-memory name, in older files
    (".lora_magnitude_vector", "magnitude", False),
)
# Config keys of features whose merge is not `W + scaling · B @ A` (or that change the base
# at initialisation, so the factors only make sense against a modified base): key -> why
_UNSUPPORTED = {
    "layer_replication": "layers duplicated from others (layer_replication)",
    "trainable_token_indices": "trained rows of the embedding (trainable_token_indices)",
    "target_parameters": "LoRA on bare parameters (target_parameters)",
    "use_qalora": "QA-LoRA (use_qalora)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens), which cannot be merged",
    "arrow_config": "Arrow routing (arrow_config), which cannot be merged",
    "velora_config": "VeLoRA (velora_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "kasa_config": "KaSA (kasa_config)",
}
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga", "mica")


@dataclass(frozen=True)
class LoraModule:
    """One module's factors: `path` is its name in the model (`model.layers.0.self_attn.q_proj`,
    or a TencentPretrain name), A [r, in] and B [out, r] (an embedding: A [r, rows], B [dim, r])."""

    path: str
    a: TensorRef
    b: TensorRef
    r: int
    alpha: float
    scaling: float
    fan_in_fan_out: bool = False
    embedding: bool = False
    bias: TensorRef | None = None  # lora_B.bias (lora_bias)
    magnitude: TensorRef | None = None  # DoRA


@dataclass
class LoraAdapter:
    """An adapter as PEFT (or TencentPretrain) would apply it. `tensors`: whole parameters that
    replace the model's, by parameter name. `ignored`: saved modules its config does not
    target (PEFT loads them into nothing). `keep_tied`: ensure_weight_tying."""

    path: Path
    kind: str  # "peft" or "tencentpretrain"
    modules: list[LoraModule] = field(default_factory=list)
    tensors: dict[str, TensorRef] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    base_model: str | None = None
    keep_tied: bool = False
    tokenizer_dir: Path | None = None

    @property
    def label(self) -> str:
        return f"adapter {self.path}"


def read_adapter(path: str | Path, *, tp_r: int | None = None, tp_alpha: float | None = None) -> LoraAdapter:
    """A PEFT directory, or a TencentPretrain LoRA file (or a directory holding one such .bin)."""
    path = Path(path)
    if not path.exists():
        raise WeightopsError(f"adapter {path}: no such file or directory")
    if path.is_file():
        return _read_tp(path, path, tp_r, tp_alpha)
    if member(path, CONFIG):
        return _read_peft(path)
    weights = [w for n in WEIGHTS if (w := member(path, n))]
    bins = members(path, "*.bin")
    if not weights and len(bins) == 1 and _tp_names(read_torch_bin(bins[0])):
        return _read_tp(bins[0], path, tp_r, tp_alpha)
    what = f"its weights ({', '.join(w.name for w in weights)})" if weights else "no adapter weights either"
    return LoraAdapter(
        path,
        "peft",
        problems=[
            f"adapter {path}: no {CONFIG} (a PEFT adapter directory has one, with r, lora_alpha and the "
            f"targeted modules; {what}); for a TencentPretrain LoRA file pass the .bin itself"
        ],
    )


# --- PEFT ----------------------------------------------------------------------------------------


def _read_peft(directory: Path) -> LoraAdapter:
    cfg_path = member(directory, CONFIG)
    assert cfg_path is not None
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise WeightopsError(f"{cfg_path}: not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise WeightopsError(f"{cfg_path}: holds a {type(config).__name__}, not a PEFT config object")
    adapter = LoraAdapter(
        directory,
        "peft",
        base_model=config.get("base_model_name_or_path"),
        keep_tied=bool(config.get("ensure_weight_tying")),
        tokenizer_dir=directory if read_tokenizer_files(directory).sizes else None,
    )
    adapter.problems += _config_problems(config, cfg_path)
    weights = next((w for n in WEIGHTS if (w := member(directory, n))), None)
    if weights is None:
        adapter.problems.append(f"adapter {directory}: no {' or '.join(WEIGHTS)} beside {CONFIG}")
        return adapter
    refs = read_safetensors(weights) if weights.suffix == ".safetensors" else read_torch_bin(weights)
    parts: dict[str, dict[str, Any]] = {}
    whole: dict[str, tuple[TensorRef, int]] = {}
    for ref in refs:
        if not ref.name.startswith(PREFIX):
            adapter.problems.append(
                f"{shown(weights)}: tensor {shown(ref.name)!r} is not named {PREFIX}<module>…, as PEFT saves them"
            )
            continue
        rest = ref.name[len(PREFIX) :]
        hit = next((p for p in _PEFT_PARTS if rest.endswith(p[0])), None)
        if hit is not None:
            entry = parts.setdefault(rest[: -len(hit[0])], {"embedding": False})
            entry[hit[1]] = ref
            entry["embedding"] |= hit[2]
        elif "lora_" in rest:
            adapter.problems.append(f"{shown(weights)}: tensor {shown(ref.name)!r} is no LoRA tensor weightops knows")
        else:
            name, rank = _parameter_name(rest)
            if rank < whole.get(name, (None, 3))[1]:
                whole[name] = (ref, rank)
    adapter.tensors = {name: ref for name, (ref, _) in whole.items()}
    for module, entry in parts.items():
        _add_peft_module(adapter, config, module, entry, weights)
    return adapter


# PEFT wrapper infixes of whole tensors, by precedence: the trained copy of a modules_to_save
# module is saved both as `X.weight` and `X.modules_to_save.weight`, with the (resized) base
# copy as `X.original_module.weight`, which merge_and_unload then drops
_INFIXES = ((".base_layer.", 0), (".modules_to_save.", 1), (".original_module.", 2))


def _parameter_name(rest: str) -> tuple[str, int]:
    """(the model's parameter name, precedence) of a saved whole tensor."""
    for infix, rank in _INFIXES:
        if infix in rest:
            return rest.replace(infix, "."), rank
    return rest, 0


def _config_problems(config: dict, where: Path) -> list[str]:
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        return [f"{where}: peft_type is {peft_type!r}; only LoRA adapters (LORA) can be merged"]
    found = [why for key, why in _UNSUPPORTED.items() if config.get(key)]
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        found.append(
            f"init_lora_weights {init!r}, which changes the base weights when the adapter is created "
            "(convert the adapter to a plain LoRA with PEFT's path_initial_model_for_weight_conversion first)"
        )
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key, 8), (int, float)) or config.get(key, 8) <= 0:
            found.append(f"{key} is {config.get(key)!r}, not a positive number")
    return [f"{where}: unsupported PEFT feature: {why}" for why in found]


def _pattern_value(patterns: Any, module: str, default: Any) -> Any:
    """PEFT's get_pattern_key: the first pattern that matches the end of the module's name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def targeted(config: dict, module: str) -> bool:
    """Whether PEFT puts a LoRA layer on `module` (check_target_module_exists): not excluded,
    not a modules_to_save module, in target_modules, and in layers_to_transform."""
    exclude = config.get("exclude_modules")
    if isinstance(exclude, str) and re.fullmatch(exclude, module):
        return False
    if isinstance(exclude, list) and (module in exclude or any(module.endswith(f".{e}") for e in exclude)):
        return False
    if any(re.match(rf"(^|.*\.){m}($|\..*)", module) for m in config.get("modules_to_save") or []):
        return False
    targets = config.get("target_modules")
    if targets is None or targets == "all-linear":
        return True  # PEFT filled in its default (or every linear layer): the saved modules are the targets
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    if module in targets:
        return True
    if not any(module.endswith(f".{t}") for t in targets):
        return False
    layers = config.get("layers_to_transform")
    if layers is None or layers == []:
        return True
    patterns = config.get("layers_pattern")
    if not patterns:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
    else:
        m = None
        for p in [patterns] if isinstance(patterns, str) else patterns:
            if m := re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", module):
                break
    if m is None:
        return False
    index = int(m.group("idx"))
    return index == layers if isinstance(layers, int) else index in layers


def _add_peft_module(adapter: LoraAdapter, config: dict, module: str, entry: dict, weights: Path) -> None:
    where = f"{shown(weights)}: module {shown(module)!r}"
    a, b = entry.get("a"), entry.get("b")
    if a is None or b is None:
        adapter.problems.append(
            f"{where} has {'lora_B' if a is None else 'lora_A'} but no {'lora_A' if a is None else 'lora_B'}"
        )
        return
    if not targeted(config, module):
        adapter.ignored.append(module)
        return
    r = _pattern_value(config.get("rank_pattern"), module, config.get("r", 8))
    alpha = _pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", 8))
    if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != r or b.shape[1] != r:
        adapter.problems.append(
            f"{where}: lora_A is {a.shape} and lora_B {b.shape}, but its config gives rank r={r} "
            "(lora_A is [r, in], lora_B [out, r])"
        )
        return
    magnitude = entry.get("magnitude")
    if bool(config.get("use_dora")) != (magnitude is not None):
        adapter.problems.append(
            f"{where}: use_dora is {bool(config.get('use_dora'))} but the module "
            f"{'has' if magnitude is not None else 'lacks'} a lora_magnitude_vector"
        )
        return
    if magnitude is not None and entry["embedding"]:
        adapter.problems.append(f"{where}: unsupported PEFT feature: DoRA on an embedding")
        return
    scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    adapter.modules.append(
        LoraModule(
            module,
            a,
            b,
            r,
            alpha,
            scaling,
            fan_in_fan_out=bool(config.get("fan_in_fan_out")) and not entry["embedding"],
            embedding=entry["embedding"],
            bias=entry.get("bias"),
            magnitude=magnitude,
        )
    )


# --- TencentPretrain -----------------------------------------------------------------------------


def _tp_names(refs: list[TensorRef]) -> bool:
    return bool(refs) and any(r.name.endswith((".lora_A", ".lora_B")) for r in refs)


def _read_tp(file: Path, path: Path, r: int | None, alpha: float | None) -> LoraAdapter:
    adapter = LoraAdapter(path, "tencentpretrain")
    if file.suffix != ".bin" and not file.name.endswith((".pt", ".pth")):
        adapter.problems.append(
            f"adapter {path}: a file adapter is a TencentPretrain LoRA .bin; a PEFT adapter is its directory"
        )
        return adapter
    refs = read_torch_bin(file)
    if any(ref.name.startswith(PREFIX) for ref in refs):
        adapter.problems.append(
            f"adapter {path}: holds PEFT tensors ({PREFIX}…); pass the PEFT adapter's directory, with its {CONFIG}"
        )
        return adapter
    if not _tp_names(refs):
        adapter.problems.append(f"adapter {path}: no TencentPretrain lora_A / lora_B tensors in it")
        return adapter
    if r is None or alpha is None:
        adapter.problems.append(
            f"adapter {path}: a TencentPretrain LoRA carries no config; pass --tp-lora-r and --tp-lora-alpha "
            "(TencentPretrain's --lora_r and --lora_alpha of the training run)"
        )
        return adapter
    parts: dict[str, dict[str, TensorRef]] = {}
    for ref in refs:
        if ref.name.endswith((".lora_A", ".lora_B")):
            parts.setdefault(ref.name[: -len(".lora_A")], {})[ref.name[-1].lower()] = ref
        else:
            adapter.tensors[ref.name] = ref  # bias="all" / "lora_only": trained biases
    for module, entry in parts.items():
        a, b = entry.get("a"), entry.get("b")
        where = f"{shown(file)}: module {shown(module)!r}"
        if a is None or b is None:
            adapter.problems.append(f"{where} has only one of lora_A and lora_B")
        elif len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != r or b.shape[1] != r:
            adapter.problems.append(f"{where}: lora_A is {a.shape} and lora_B {b.shape}, but --tp-lora-r is {r}")
        else:
            adapter.modules.append(LoraModule(module, a, b, r, alpha, alpha / r))
    return adapter
