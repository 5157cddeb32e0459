"""The registry's own rules: detection by tensor names, aliases, and what an alias changes
(Mistral's sliding window: carried as llama.cpp's converter carries it, refused by TencentPretrain)."""

from __future__ import annotations

from weightops import arch, tiny
from weightops.arch import Role


def test_detect_prefers_the_architecture_that_names_every_tensor():
    qwen2, llama = arch.get("qwen2"), arch.get("llama")
    names = set(qwen2.expected("hf", 2))
    assert arch.detect(names, "hf") is qwen2
    assert arch.detect(set(llama.expected("hf", 2)), "hf") is llama  # an alias never answers for its original
    assert arch.detect(set(llama.expected("tp", 2)), "tp") is llama
    assert arch.detect({"unrelated.weight"}, "hf") is None


def test_gguf_names_come_from_gguf_py_and_gguf_architecture_names_resolve():
    import gguf

    q = arch.get("qwen2").tensor(Role.ATTN_Q, "bias")
    assert q.gguf == gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ATTN_Q].format(bid="{n}") + ".bias"
    assert arch.get("mistral").gguf_name == "llama" and arch.get("mistral").alias_of == "llama"
    assert arch.get("qwen2").tensor(Role.ATTN_Q).to_gguf is arch.Transform.NONE  # rotate-half kept (NEOX)


def test_mistral_sliding_window_shorter_than_the_context(tmp_path, cli, spm_tokenizer):
    model = tiny.tiny_mistral(tmp_path / "m", spm_tokenizer, layers=1, sliding_window=64)
    result = cli("gguf", model, tmp_path / "m.gguf", "--type", "f32")
    assert result.exit_code == 0 and "sliding_window" in result.output and "beyond 64 tokens" in result.output
    result = cli("convert", model, tmp_path / "tp", "--to", "tencentpretrain")
    assert result.exit_code == 1 and "attends to the last 64 positions only" in result.output
    assert not (tmp_path / "tp").exists()


def test_every_spec_names_only_tensors_its_llama_cpp_architecture_has():
    assert {name: arch.get(name).gguf_problems() for name in arch.supported()} == {
        name: [] for name in arch.supported()
    }
