"""Tiny, deterministic models and tokenizers made from nothing (no downloads).

The demo and the test suite share these builders: a LLaMA with GQA and a SentencePiece
tokenizer shaped like LLaMA's (BPE, byte fallback, <unk>/<s>/</s>), a BLOOM with a
byte-level BPE tokenizer, a Mistral (LLaMA's tensors, sliding-window config) and a
Qwen2 (q/k/v biases) with a byte-level BPE tokenizer split like Qwen2's. Sizes keep every
matrix row a multiple of 32 so that all GGML block types apply.
"""

from __future__ import annotations

import io
import random
import shutil
from pathlib import Path

import torch

from .io.outputs import content

_WORDS = (
    "the quick brown fox jumps over lazy dog model weights tensor stream merge delta quantize llama "
    "bloom release engineer checkpoint vocabulary token embedding layer norm attention head rotary "
    "shard index safetensors manifest checksum logits verify perplexity divergence"
).split()
_HANZI = "我们发布了中文模型的权重和词表扩展以及量化版本今天天气很好大家一起学习语言推理服务数据训练评估"


def corpus(lines: int = 400, seed: int = 0) -> list[str]:
    """A few KB of mixed English and Chinese text, the same on every machine."""
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        out.append(" ".join(rng.choice(_WORDS) for _ in range(12)) + f" {rng.randint(0, 9999)}.")
        out.append("".join(rng.choice(_HANZI) for _ in range(16)) + "。")
    return out


def train_spm(path: Path, vocab_size: int = 400, seed: int = 0, lines: list[str] | None = None) -> Path:
    """A LLaMA-style SentencePiece model (BPE, byte fallback, identity normalisation)."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines or corpus(seed=seed)),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        split_digits=True,
        num_threads=1,
        minloglevel=2,
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return path


def spm_tokenizer_dir(directory: Path, vocab_size: int = 400, lines: list[str] | None = None) -> Path:
    """HF tokenizer files (tokenizer.model, tokenizer.json, tokenizer_config.json) for LLaMA,
    trained on `corpus()` or on `lines`."""
    from .pipelines.convert import write_spm_tokenizer_files

    directory = Path(directory)
    model = train_spm(directory / "tokenizer.model", vocab_size, lines=lines)
    write_spm_tokenizer_files(directory)
    assert model.is_file()
    return directory


def bpe_tokenizer_dir(directory: Path, vocab_size: int = 400) -> Path:
    """A BLOOM-style byte-level BPE tokenizer (<unk> 0, <s> 1, </s> 2, <pad> 3)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from .io.gguf_tokenizer import BLOOM_SPLIT_REGEX

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [  # as BLOOM's own tokenizer.json
            pre_tokenizers.Split(Regex(BLOOM_SPLIT_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.save_pretrained(directory)
    return Path(directory)


def qwen2_tokenizer_dir(directory: Path, vocab_size: int = 400) -> Path:
    """A Qwen2-style byte-level BPE tokenizer: Qwen2's split regex, <|endoftext|> 0 (eos and
    pad), <|im_start|> 1, <|im_end|> 2, no BOS."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from .io.gguf_tokenizer import QWEN2_SPLIT_REGEX

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [  # as Qwen2's own tokenizer.json
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.save_pretrained(directory)
    return Path(directory)


def _save(model, directory: Path, tokenizer_dir: Path, dtype: torch.dtype) -> Path:
    directory = Path(directory)
    model.to(dtype).save_pretrained(directory)
    for f in content(tokenizer_dir):
        if f.is_file():
            shutil.copyfile(f, directory / f.name)
    return directory


def tiny_llama(
    directory: Path,
    tokenizer_dir: Path,
    *,
    layers: int = 2,
    kv_heads: int = 2,
    tied: bool = False,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    hidden: int = 64,
    intermediate: int = 128,
) -> Path:
    """A LLaMA with GQA (4 query heads, `kv_heads` key/value heads), saved with its tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
        rms_norm_eps=1e-5,
        initializer_range=0.2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    _jitter(model)
    return _save(model, directory, tokenizer_dir, dtype)


def tiny_bloom(
    directory: Path,
    tokenizer_dir: Path,
    *,
    layers: int = 2,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    hidden: int = 64,
) -> Path:
    """A BLOOM (4 heads, tied output), saved with its tokenizer."""
    from transformers import AutoTokenizer, BloomConfig, BloomForCausalLM

    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    cfg = BloomConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        n_layer=layers,
        n_head=4,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        initializer_range=0.2,
    )
    torch.manual_seed(seed)
    model = BloomForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name or "ln_f" in name:
                p.copy_((1 if name.endswith("weight") else 0) + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
    return _save(model, directory, tokenizer_dir, dtype)


def tiny_mistral(
    directory: Path,
    tokenizer_dir: Path,
    *,
    layers: int = 2,
    sliding_window: int | None = 512,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 2,
) -> Path:
    """A Mistral (4 query heads, 2 key/value heads, untied): LLaMA's tensors, with a
    sliding attention window in its config (by default the whole 512-token context)."""
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    cfg = MistralConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        sliding_window=sliding_window,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        rms_norm_eps=1e-5,
        initializer_range=0.2,
    )
    torch.manual_seed(seed)
    model = MistralForCausalLM(cfg)
    _jitter(model)
    return _save(model, directory, tokenizer_dir, dtype)


def tiny_qwen2(
    directory: Path,
    tokenizer_dir: Path,
    *,
    layers: int = 2,
    tied: bool = True,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 4,
) -> Path:
    """A Qwen2 (4 query heads, 2 key/value heads, q/k/v biases), tied embeddings by default
    (as the small Qwen2 models)."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=tied,
        bos_token_id=None,
        eos_token_id=tok.eos_token_id,
        rms_norm_eps=1e-6,
        initializer_range=0.2,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg)
    _jitter(model)
    return _save(model, directory, tokenizer_dir, dtype)


def _jitter(model) -> None:
    """Norms away from exactly 1 and biases away from 0, so that layout mistakes cannot hide."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))


_MORE_HANZI = "中华人民共和国北京上海广州深圳杭州南京成都重庆西安武汉长沙春夏秋冬山水花鸟风云雷电江河湖海"


def chinese_lines(lines: int = 300, seed: int = 1) -> list[str]:
    """Chinese text with characters the base corpus lacks: pieces for a vocabulary merge."""
    rng = random.Random(seed)
    return ["".join(rng.choice(_MORE_HANZI + _HANZI) for _ in range(20)) + "。" for _ in range(lines)]


def finetune(src: Path, dst: Path, *, scale: float = 0.02, seed: int = 1) -> Path:
    """A 'fine-tuned' copy of a tiny model (every weight nudged), streamed with save_hf."""
    from .io.checkpoint import open_checkpoint, save_hf

    ckpt = open_checkpoint(src)

    def nudge(i: int):
        def fn(t: torch.Tensor) -> torch.Tensor:
            g = torch.Generator().manual_seed(seed * 10_007 + i)
            return (t.float() + scale * torch.randn(t.shape, generator=g)).to(t.dtype)

        return fn

    refs = [r.derive(nudge(i)) for i, r in enumerate(ckpt.tensors)]
    save_hf(refs, dst, aux_files=ckpt.aux_files, inputs=[src])
    for f in content(src):  # tokenizer.model and friends that aux_files may not list
        if f.is_file() and not (Path(dst) / f.name).exists() and not f.suffix == ".safetensors":
            shutil.copyfile(f, Path(dst) / f.name)
    return Path(dst)
