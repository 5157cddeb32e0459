"""merge-lora refuses what does not fit, lists every problem at once, writes nothing, and never
touches its inputs."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from weightops.errors import WeightopsError
from weightops.pipelines.merge_lora import merge_lora

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore")


def _adapter(base: Path, out: Path, **config) -> Path:
    from transformers import AutoModelForCausalLM

    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base), peft.LoraConfig(**config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def llama_adapter(tmp_path_factory, tiny_llama) -> Path:
    return _adapter(tiny_llama, tmp_path_factory.mktemp("a") / "llama", r=4, lora_alpha=8, target_modules=["q_proj"])


@pytest.fixture(scope="module")
def bloom_adapter(tmp_path_factory, tiny_bloom) -> Path:
    out = tmp_path_factory.mktemp("b") / "bloom"
    return _adapter(tiny_bloom, out, r=4, lora_alpha=8, target_modules=["query_key_value"])


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(adapter: Path, **changes) -> None:
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg.update(changes)
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))


def _refused(*args, **kwargs) -> str:
    with pytest.raises(WeightopsError) as e:
        merge_lora(*args, **kwargs)
    return str(e.value)


def test_every_problem_is_listed_at_once_and_nothing_written(tiny_llama, llama_adapter, tmp_path) -> None:
    bad = _copy(llama_adapter, tmp_path / "bad")
    _edit_config(bad, layer_replication=[[0, 2]], trainable_token_indices=[5, 6])
    tensors = load_file(bad / "adapter_model.safetensors")
    a = tensors.pop("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] = torch.cat([a, a], dim=1)  # in 128
    tensors["base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight"] = a
    tensors["base_model.model.model.layers.7.self_attn.q_proj.lora_B.weight"] = torch.zeros(64, 4)
    save_file(tensors, bad / "adapter_model.safetensors")
    out = tmp_path / "out"
    message = _refused(tiny_llama, [bad], out)
    assert "nothing was written" in message
    assert "layer_replication" in message and "trainable_token_indices" in message
    assert "model.layers.7.self_attn.q_proj" in message and "is not in BASE" in message
    assert "(64, 128)" in message  # the shape mismatch, with both shapes
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


@pytest.mark.parametrize(
    "change, words",
    [
        ({"peft_type": "IA3"}, "only LoRA adapters"),
        ({"init_lora_weights": "pissa"}, "changes the base weights"),
        ({"target_parameters": ["mlp.experts.gate_up_proj"]}, "target_parameters"),
        ({"r": 8}, "config gives rank r=8"),
    ],
)
def test_unsupported_features_are_named(tiny_llama, llama_adapter, tmp_path, change, words) -> None:
    bad = _copy(llama_adapter, tmp_path / "bad")
    _edit_config(bad, **change)
    assert words in _refused(tiny_llama, [bad], tmp_path / "out")


def test_adapter_for_another_architecture(tiny_llama, bloom_adapter, tmp_path) -> None:
    message = _refused(tiny_llama, [bloom_adapter], tmp_path / "out")
    assert "is for a bloom model" in message and "a llama" in message


def test_peft_directory_without_config(tiny_llama, llama_adapter, tmp_path) -> None:
    bad = _copy(llama_adapter, tmp_path / "bad")
    (bad / "adapter_config.json").unlink()
    assert "no adapter_config.json" in _refused(tiny_llama, [bad], tmp_path / "out")


def test_tencentpretrain_adapter_needs_r_and_alpha(tiny_llama_mha, tmp_path) -> None:
    lora = tmp_path / "lora.bin"
    torch.save(
        {
            "encoder.transformer.0.self_attn.linear_layers.0.lora_A": torch.zeros(4, 64),
            "encoder.transformer.0.self_attn.linear_layers.0.lora_B": torch.zeros(64, 4),
        },
        lora,
    )
    assert "--tp-lora-r and --tp-lora-alpha" in _refused(tiny_llama_mha, [lora], tmp_path / "out")
    assert "--tp-lora-r is 8" in _refused(tiny_llama_mha, [lora], tmp_path / "out", tp_lora_r=8, tp_lora_alpha=16)


def test_vocabulary_rows_without_a_tokenizer(tiny_llama, llama_adapter, tmp_path) -> None:
    """modules_to_save rows beyond the base's vocabulary need the adapter's tokenizer; an output
    head left with the old row count is refused too."""
    bad = _copy(llama_adapter, tmp_path / "bad")
    tensors = load_file(bad / "adapter_model.safetensors")
    tensors["base_model.model.model.embed_tokens.weight"] = torch.zeros(420, 64, dtype=torch.bfloat16)
    save_file(tensors, bad / "adapter_model.safetensors")
    message = _refused(tiny_llama, [bad], tmp_path / "out")
    assert "no adapter directory has tokenizer files" in message
    assert "output head 'lm_head.weight' 400" in message


def test_inputs_untouched_and_foreign_output_refused(tiny_llama, llama_adapter, tmp_path) -> None:
    def digest(d: Path) -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.is_file()}

    before = digest(tiny_llama), digest(llama_adapter)
    merge_lora(tiny_llama, [llama_adapter], tmp_path / "out")
    assert (digest(tiny_llama), digest(llama_adapter)) == before
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(WeightopsError, match="did not write"):
        merge_lora(tiny_llama, [llama_adapter], foreign, force=True)
    assert (foreign / "notes.txt").read_text() == "mine"
    with pytest.raises(WeightopsError, match="inside the input"):
        merge_lora(tiny_llama, [llama_adapter], llama_adapter / "merged")


def test_other_base_name_warns(tiny_llama, llama_adapter, tmp_path) -> None:
    other = _copy(llama_adapter, tmp_path / "other")
    _edit_config(other, base_model_name_or_path="huggyllama/llama-7b")
    report = merge_lora(tiny_llama, [other], tmp_path / "out")
    assert any("huggyllama/llama-7b" in w for w in report.warnings)


def test_cli_refusal_exit_code(tiny_llama, bloom_adapter, cli, tmp_path) -> None:
    result = cli("merge-lora", tiny_llama, bloom_adapter, tmp_path / "out")
    assert result.exit_code == 1 and "is for a bloom model" in result.stderr
    assert "Traceback" not in result.output
