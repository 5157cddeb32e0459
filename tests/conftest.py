"""Every shared fixture, in one place: tiny models and tokenizers made once per session (no
downloads), and the models each command's tests derive from them."""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).parent / "oracles"))

import llama_cpp_build  # noqa: E402  (tests/oracles: shared with the benchmarks)

from weightops import tiny  # noqa: E402
from weightops.cli import main  # noqa: E402
from weightops.pipelines.expand_vocab import expand_vocab  # noqa: E402


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
    return tiny.tiny_llama(
        tmp_path_factory.mktemp("llama_tied") / "model", spm_tokenizer, kv_heads=4, tied=True, seed=1
    )


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
    from weightops.io.checkpoint import open_checkpoint

    def load(path: Path) -> dict[str, torch.Tensor]:
        return {r.name: r.load().clone() for r in open_checkpoint(path).tensors}

    return load


def _vendored_llama_cpp(files: tuple[str, ...]) -> Path:
    """The vendored llama.cpp tree in the test cache holding `files`; skips without it."""
    try:
        return llama_cpp_build.vendored_llama_cpp(files)
    except llama_cpp_build.Unavailable as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def llama_cpp_source() -> Path:
    """llama.cpp's source tree at the pinned commit (the one vendored in the installed
    llama-cpp-python), for its own tools as oracles (convert_hf_to_gguf.py with its `conversion`
    package and gguf-py), cached outside the repository."""
    # the script imports its `conversion` package
    return _vendored_llama_cpp(("convert_hf_to_gguf.py", "conversion/__init__.py"))


# --- convert: an untied LLaMA without GQA, the shape TencentPretrain's own HF -> TP script handles ---


@pytest.fixture(scope="session")
def tiny_llama_mha(tmp_path_factory, spm_tokenizer) -> Path:
    """bf16 LLaMA, 4 heads = 4 key/value heads, untied lm_head."""
    return tiny.tiny_llama(tmp_path_factory.mktemp("llama_mha") / "model", spm_tokenizer, kv_heads=4, seed=2)


# --- expand-vocab: a second SentencePiece model trained on other text, a float32 LLaMA (exact init
# checks), and expanded models ---

_HANZI = "春夏秋冬山水花鸟风月云雨雪天地人和平安快乐书画诗词歌赋琴棋"
_WORDS = "hello world the model merge token river mountain poetry quick fox".split()


def _other_lines(n: int = 300, seed: int = 7) -> list[str]:
    """Text unlike `tiny.corpus()`: other Chinese characters, partly other English words."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        out.append("".join(rng.choice(_HANZI) for _ in range(18)) + "。")
        out.append(" ".join(rng.choice(_WORDS) for _ in range(8)))
    return out


@pytest.fixture(scope="session")
def other_lines():
    """`other_lines(n, seed)`: the other text, for encoding checks."""
    return _other_lines


@pytest.fixture(scope="session")
def other_spm(tmp_path_factory) -> Path:
    """A second LLaMA-style SentencePiece model (400 pieces) to merge into the base."""
    return tiny.train_spm(tmp_path_factory.mktemp("other_spm") / "other.model", 400, lines=_other_lines())


@pytest.fixture(scope="session")
def other_tokenizer(tmp_path_factory) -> Path:
    """An HF tokenizer directory trained on the other text (for --new-tokenizer remaps)."""
    return tiny.spm_tokenizer_dir(tmp_path_factory.mktemp("other_tok"), 400, lines=_other_lines())


@pytest.fixture(scope="session")
def small_tokenizer(tmp_path_factory) -> Path:
    """A 360-token tokenizer: remapping to it would shrink the embedding."""
    return tiny.spm_tokenizer_dir(tmp_path_factory.mktemp("small_tok"), 360)


@pytest.fixture(scope="session")
def llama_f32(tmp_path_factory, spm_tokenizer) -> Path:
    """float32 LLaMA (untied), so init values can be checked without bf16 rounding."""
    return tiny.tiny_llama(tmp_path_factory.mktemp("llama_f32") / "model", spm_tokenizer, dtype=torch.float32, seed=3)


@pytest.fixture(scope="session")
def merged_llama(tmp_path_factory, tiny_llama, other_spm) -> Path:
    """tiny_llama with `other_spm` merged in and normal + special tokens added (default init)."""
    out = tmp_path_factory.mktemp("merged") / "model"
    expand_vocab(
        tiny_llama,
        out,
        merge_spm=other_spm,
        add_tokens=["weightops", "hello there"],
        special_tokens=["<|End|>", "<|Human|>"],
    )
    return out


# --- gguf: tiny models whose BPE tokenizers split text the way a llama.cpp pre-tokenizer can (BLOOM's
# regex, GPT-2's), an expanded BLOOM vocabulary with YaYi's special tokens, and helpers to run
# llama.cpp and transformers on the same ids ---

# BLOOM's tokenizer.json pre-tokenizer: split words (with a leading space) from whitespace and punctuation.
BLOOM_SPLIT = " ?[^(\\s|[.,!?\u2026\u3002\uff0c\u3001\u0964\u06d4\u060c])]+"
YAYI_SPECIAL = ["<|System|>", "<|Human|>", "<|YaYi|>", "<|End|>"]
CHAT_TEMPLATE = "{% for m in messages %}<|Human|>{{ m['content'] }}<|End|>{% endfor %}<|YaYi|>"


def _bpe(directory: Path, pre_tokenizer) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tiny.corpus(), trainer)
    PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    ).save_pretrained(directory)
    return Path(directory)


@pytest.fixture(scope="session")
def bloom_tokenizer(tmp_path_factory) -> Path:
    """Byte-level BPE with BLOOM's pre-tokenizer (its own vocabulary, so llama.cpp's hash does not know it)."""
    from tokenizers import Regex, pre_tokenizers

    pre = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(BLOOM_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    return _bpe(tmp_path_factory.mktemp("bloom_tok"), pre)


@pytest.fixture(scope="session")
def gpt2_tokenizer(tmp_path_factory) -> Path:
    """Byte-level BPE with GPT-2's pre-tokenizer regex (what a BPE LLaMA such as SmolLM uses)."""
    from tokenizers import pre_tokenizers

    return _bpe(tmp_path_factory.mktemp("gpt2_tok"), pre_tokenizers.ByteLevel(add_prefix_space=False))


@pytest.fixture(scope="session")
def llama_bpe(tmp_path_factory, gpt2_tokenizer) -> Path:
    """bf16 LLaMA (GQA 4/2) with a byte-level BPE tokenizer instead of SentencePiece."""
    return tiny.tiny_llama(tmp_path_factory.mktemp("llama_bpe") / "model", gpt2_tokenizer, seed=3)


@pytest.fixture(scope="session")
def bloom(tmp_path_factory, bloom_tokenizer) -> Path:
    return tiny.tiny_bloom(tmp_path_factory.mktemp("bloom_gguf") / "model", bloom_tokenizer)


@pytest.fixture(scope="session")
def yayi_bloom(tmp_path_factory, bloom, bloom_tokenizer) -> Path:
    """A YaYi-style BLOOM: 4 added special tokens, one added normal token, a chat template, and an
    embedding padded to 416 rows (more rows than the tokenizer has ids)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("yayi") / "model"
    tok = AutoTokenizer.from_pretrained(bloom_tokenizer)
    tok.add_special_tokens({"additional_special_tokens": YAYI_SPECIAL})
    tok.add_tokens(["weightops"])
    tok.chat_template = CHAT_TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(bloom)
    torch.manual_seed(5)
    model.resize_token_embeddings(416, mean_resizing=False)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def llama_cpp_run():
    """`run(gguf_path, ids)` -> (llama.cpp float32 logits for every position, the Llama object).

    The KV cache is float32 and flash attention off, so that llama.cpp's arithmetic is as
    close to transformers' float32 as it gets."""
    llama_cpp = pytest.importorskip("llama_cpp")

    def run(path: Path, ids: list[int]):
        llm = llama_cpp.Llama(
            model_path=str(path),
            logits_all=True,
            n_ctx=128,
            verbose=False,
            type_k=0,
            type_v=0,
            flash_attn=False,
            n_threads=2,
        )
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32), llm

    return run


@pytest.fixture(scope="session")
def hf_logits():
    """`hf_logits(model_dir, ids)` -> transformers' float32 logits."""
    from transformers import AutoModelForCausalLM

    def run(directory: Path, ids: list[int]) -> np.ndarray:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0].numpy()

    return run


# --- verify: a short prompt file, and candidates made from the tiny LLaMA (perturbed, calmed,
# converted to TencentPretrain, exported to GGUF Q8_0 and bitsandbytes int8, with a foreign
# tokenizer, with a smaller vocabulary) ---

PROMPTS = [
    {"name": "english", "text": "the quick brown fox jumps over the lazy dog, then the model weights merge."},
    {"name": "chinese", "text": "我们发布了中文模型的权重和词表扩展。"},
    {"name": "chat", "text": "用户：今天天气很好吗？\n小元：今天天气很好，大家一起学习。"},
]
SCALED = "model.layers.1.mlp.down_proj.weight"


@pytest.fixture(scope="session")
def prompts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in PROMPTS), encoding="utf-8")
    return path


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def scaled_copy(src: Path, dst: Path, names: Callable[[str], bool], factor: float) -> Path:
    """A copy of the model in `src` with the tensors whose names match scaled by `factor`."""
    out = copy_model(src, dst)
    weights = out / "model.safetensors"
    tensors = load_file(weights)
    for name, t in tensors.items():
        if names(name):
            tensors[name] = (t.float() * factor).to(t.dtype)
    save_file(tensors, weights, metadata={"format": "pt"})
    return out


@pytest.fixture(scope="session")
def perturbed_llama(tmp_path_factory, tiny_llama) -> Path:
    """The tiny LLaMA with one layer's down projection scaled by 1.5."""
    return scaled_copy(tiny_llama, tmp_path_factory.mktemp("perturbed") / "model", lambda n: n == SCALED, 1.5)


@pytest.fixture(scope="session")
def calm_llama(tmp_path_factory, tiny_llama) -> Path:
    """The tiny LLaMA with its attention and MLP weights scaled by 0.3. The shared one (initializer
    range 0.2 at hidden 64) is chaotic: Q8_0's weight noise flips ~7 % of its top-1 tokens, in
    transformers running the dequantized weights as much as in llama.cpp. Calmed like this it
    reacts to quantization as trained checkpoints do (Q8_0: KLD ~2e-4, top-1 ~98 %), so the
    default gates apply to it unchanged."""
    return scaled_copy(
        tiny_llama,
        tmp_path_factory.mktemp("calm") / "model",
        lambda n: n.startswith("model.layers.") and "norm" not in n,
        0.3,
    )


@pytest.fixture(scope="session")
def tp_llama(tmp_path_factory, tiny_llama) -> Path:
    """The tiny LLaMA converted to TencentPretrain by `weightops convert`'s library function."""
    from weightops.pipelines.convert import convert_checkpoint

    out = tmp_path_factory.mktemp("tp") / "model"
    convert_checkpoint(tiny_llama, out, to="tencentpretrain")
    return out


@pytest.fixture(scope="session")
def q8_gguf(tmp_path_factory, calm_llama) -> Path:
    """`calm_llama` as GGUF Q8_0, written by `weightops gguf`'s library function."""
    from weightops.pipelines.gguf import export_gguf

    out = tmp_path_factory.mktemp("gguf") / "calm-q8_0.gguf"
    export_gguf(calm_llama, out, type="q8_0")
    return out


@pytest.fixture(scope="session")
def int8_llama(tmp_path_factory, calm_llama) -> Path:
    """`calm_llama` as bitsandbytes int8, written by `weightops bnb`'s library function."""
    pytest.importorskip("bitsandbytes")
    from weightops.pipelines.bnb import export_bnb

    out = tmp_path_factory.mktemp("int8") / "model"
    export_bnb(calm_llama, out, bits=8)
    return out


@pytest.fixture(scope="session")
def foreign_tokenizer_llama(tmp_path_factory, tiny_llama) -> Path:
    """The tiny LLaMA's weights shipped with another SentencePiece tokenizer of the same size
    (trained on other text): every id is valid, but the ids mean other pieces."""
    out = copy_model(tiny_llama, tmp_path_factory.mktemp("foreign") / "model")
    other = tiny.spm_tokenizer_dir(tmp_path_factory.mktemp("foreign_tok"), lines=tiny.corpus(seed=7))
    for f in other.iterdir():
        shutil.copyfile(f, out / f.name)
    return out


@pytest.fixture(scope="session")
def small_vocab_llama(tmp_path_factory) -> Path:
    """A LLaMA whose tokenizer and embedding have 300 ids (the tiny LLaMA's prompts use more)."""
    english = tiny.corpus()[::2]  # fewer distinct characters, so 300 pieces suffice
    tok = tiny.spm_tokenizer_dir(tmp_path_factory.mktemp("tok300"), vocab_size=300, lines=english)
    return tiny.tiny_llama(tmp_path_factory.mktemp("llama300") / "model", tok)


@pytest.fixture
def scaled_tensor() -> str:
    """The tensor `perturbed_llama` changed."""
    return SCALED


@pytest.fixture
def gguf_available():
    pytest.importorskip("llama_cpp")
    return True


# --- bnb: KL divergences (`weightops verify`) of the quantized tiny models against the originals,
# printed after the run ---

_KLD: dict[str, tuple[float, float, float, int]] = {}


@pytest.fixture(scope="session")
def kld_report() -> dict[str, tuple[float, float, float, int]]:
    """`kld_report[label] = (mean KLD, max KLD, top-1 agreement, tokens)` from `weightops verify`;
    shown in the terminal summary."""
    return _KLD


def pytest_terminal_summary(terminalreporter) -> None:
    if _KLD:
        terminalreporter.section("bitsandbytes: weightops verify, original bf16 model vs quantized")
        for label, (mean, worst, top1, tokens) in sorted(_KLD.items()):
            terminalreporter.write_line(
                f"{label:<20} KLD mean {mean:.6f}  max {worst:.6f}  top-1 {top1:6.1%}  ({tokens} tokens)"
            )


@pytest.fixture(scope="session")
def libggml():
    """`quantize(a, qtype, imatrix=None)` -> the bytes libggml's `ggml_quantize_chunk` (what
    llama-quantize runs) writes for float32 rows `a` as GGML type `qtype` (our name, e.g. "q4_k");
    `imatrix` is one float32 weight per column. Skips where llama-cpp-python is not installed."""
    import ctypes

    from gguf import GGMLQuantizationType
    from gguf.quants import quant_shape_to_byte_shape

    llama_cpp = pytest.importorskip("llama_cpp")
    lib = ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so"))
    chunk = lib.ggml_quantize_chunk  # (type, src, dst, start, nrows, n_per_row, imatrix) -> bytes written
    chunk.restype = ctypes.c_size_t
    chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]
    chunk.argtypes += [ctypes.c_int64, ctypes.c_void_p]

    def quantize(a: np.ndarray, qtype: str, imatrix: np.ndarray | None = None) -> np.ndarray:
        ggml = GGMLQuantizationType[qtype.upper()]
        a = np.ascontiguousarray(a, dtype=np.float32)
        rows = a.reshape(-1, a.shape[-1])
        out = np.empty(quant_shape_to_byte_shape(a.shape, ggml), dtype=np.uint8)
        weights = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
        written = chunk(
            int(ggml),
            rows.ctypes.data,
            out.ctypes.data,
            0,
            rows.shape[0],
            rows.shape[1],
            None if weights is None else weights.ctypes.data,
        )
        assert written == out.nbytes
        return out

    return quantize


@pytest.fixture(scope="session")
def llama_cpp_tools() -> dict[str, Path]:
    """llama.cpp's own tools as oracles, built once against the installed llama-cpp-python's
    libllama/libggml from its vendored source (the pinned commit) and cached outside the
    repository (about 15-30 s of compiling; tests/oracles/llama_cpp_build.py): `llama-quantize`
    (tools/quantize, with the few common/ sources it needs: imatrix loader, logging, argument
    helpers) and `imatrix-combine` (llama-imatrix's --in-file combine path,
    tests/oracles/imatrix_combine.cpp). Tool name -> executable. Skips without llama-cpp-python,
    the source or a C++ compiler."""
    try:
        return llama_cpp_build.build_tools(
            {**llama_cpp_build.LLAMA_QUANTIZE, **llama_cpp_build.IMATRIX_COMBINE}, llama_cpp_build.QUANTIZE_COMMON
        )
    except llama_cpp_build.Unavailable as e:
        pytest.skip(str(e))


def _runner(exe: Path):
    import subprocess

    def run(*args: str | Path, check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        done = subprocess.run(
            [str(exe), *map(str, args)], capture_output=True, text=True, env={**os.environ, **(env or {})}
        )
        if check and done.returncode:
            raise AssertionError(f"{exe.name} {' '.join(map(str, args))} failed:\n{done.stdout}\n{done.stderr}")
        return done

    return run


@pytest.fixture(scope="session")
def llama_quantize(llama_cpp_tools):
    """`llama_quantize(*args, check=True, env=None)` runs llama.cpp's own llama-quantize with
    these arguments (see `llama_cpp_tools`); returns the CompletedProcess (text). With
    env={"LLAMA_TRACE": "1"} it logs every imatrix entry it loads."""
    return _runner(llama_cpp_tools["llama-quantize"])


@pytest.fixture(scope="session")
def llama_imatrix_combine(llama_cpp_tools):
    """`llama_imatrix_combine(OUT, "gguf"|"dat", CTX, *IN, check=True)`: what
    `llama-imatrix --in-file IN... -c CTX -o OUT [--output-format dat]` writes, by its own code."""
    return _runner(llama_cpp_tools["imatrix-combine"])


@pytest.fixture(scope="session")
def gguf_differences():
    """`gguf_differences(ours, theirs)`: what differs between two GGUF files, most telling
    first (KV and its order, tensor order, each tensor's type and bytes, then anything else);
    empty when they are byte-identical."""
    from gguf import GGUFReader

    def kv(reader: GGUFReader) -> list[tuple[str, object]]:
        return [(name, field.contents()) for name, field in reader.fields.items() if not name.startswith("GGUF.")]

    def differences(ours: Path, theirs: Path) -> list[str]:
        a, b = GGUFReader(ours), GGUFReader(theirs)
        out = []
        if kv(a) != kv(b):
            mine, yours = dict(kv(a)), dict(kv(b))
            keys = mine.keys() | yours.keys()
            changed = {k: (mine.get(k), yours.get(k)) for k in keys if mine.get(k) != yours.get(k)}
            out.append(f"KV: ours {list(mine)} != theirs {list(yours)}; (ours, theirs) where they differ: {changed}")
        if [t.name for t in a.tensors] != [t.name for t in b.tensors]:
            out.append(f"tensor order: {[t.name for t in a.tensors]} != {[t.name for t in b.tensors]}")
        theirs_by_name = {t.name: t for t in b.tensors}
        for t in a.tensors:
            u = theirs_by_name.get(t.name)
            if u is None or t.tensor_type != u.tensor_type:
                out.append(f"{t.name}: {t.tensor_type.name} != {u.tensor_type.name if u else 'missing'}")
            elif not np.array_equal(np.array(t.data), np.array(u.data)):
                out.append(f"{t.name} ({t.tensor_type.name}): different bytes")
        if not out and Path(ours).read_bytes() != Path(theirs).read_bytes():
            out.append("bytes differ outside KV and tensor data (header, offsets or padding)")
        return out

    return differences
