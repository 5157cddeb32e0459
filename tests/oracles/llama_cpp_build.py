"""llama.cpp's own tools, built from the source package of the installed llama-cpp-python (its
pinned llama.cpp commit) against that package's libllama/libggml, and cached outside the
repository. Shared by the test oracles (tests/conftest.py) and the benchmarks' peers, so both run
the same llama.cpp as the one the library calls. Nothing here imports pytest: callers turn
`Unavailable` into a skip or an error message."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent

# what is extracted from the source package: single files, and whole folders (paths inside llama.cpp/)
VENDORED_FILES = ("convert_hf_to_gguf.py", "src/llama-ext.h")
VENDORED_DIRS = (
    "gguf-py",
    "conversion",
    "tools/quantize",
    "tools/imatrix",
    "common",
    "include",
    "ggml/include",
    "vendor/nlohmann",
)

# common/ sources each tool links with (the linker drops what a tool does not use)
QUANTIZE_COMMON = ("common/imatrix-loader.cpp", "common/common.cpp", "common/log.cpp", "common/json.cpp")
# llama-imatrix also creates a context (common_init_from_params), which reaches the sampler,
# speculative decoding's parameters and device fitting
IMATRIX_COMMON = (
    *QUANTIZE_COMMON,
    "common/fit.cpp",
    "common/sampling.cpp",
    "common/speculative.cpp",
    "common/reasoning-budget.cpp",
    "common/trie.cpp",
    "common/unicode.cpp",
)
# what our sources and the common ones include beyond the folders they sit in
INCLUDED = ("tools/imatrix/imatrix.cpp", "src/llama-ext.h")
# tool -> its own sources: paths inside llama.cpp/, or absolute (ours, in this folder)
LLAMA_QUANTIZE = {"llama-quantize": ("tools/quantize/main.cpp", "tools/quantize/quantize.cpp")}
IMATRIX_COMBINE = {"imatrix-combine": (str(HERE / "imatrix_combine.cpp"),)}
LLAMA_IMATRIX = {"llama-imatrix": (str(HERE / "llama_imatrix.cpp"),)}


class Unavailable(Exception):
    """The source, the compiler or llama-cpp-python is missing, or the tools do not build here."""


def cache_dir() -> Path:
    return Path(os.environ.get("WEIGHTOPS_TEST_CACHE", Path.home() / ".cache" / "weightops-tests"))


def vendored_llama_cpp(files: Iterable[str]) -> Path:
    """The vendored llama.cpp tree in the cache, holding `files` (paths inside llama.cpp/).
    Fetched from the package registry (the sdist, by pip) when one is missing, with everything
    every oracle uses."""
    version = importlib.metadata.version("llama-cpp-python")
    root = cache_dir() / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    if all((root / f).is_file() for f in files):
        return root
    with tempfile.TemporaryDirectory() as tmp:
        got = subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-binary", ":all:", "--no-deps"]
            + [f"llama-cpp-python=={version}", "-d", tmp],
            capture_output=True,
            text=True,
        )
        sdists = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if got.returncode or not sdists:
            raise Unavailable(f"llama-cpp-python {version} source not available: {got.stderr.strip()[-300:]}")
        prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
        dirs = tuple(prefix + d + "/" for d in VENDORED_DIRS)
        with tarfile.open(sdists[0]) as tar:
            wanted = [
                m
                for m in tar.getmembers()
                if m.name.startswith(prefix) and (m.name[len(prefix) :] in VENDORED_FILES or m.name.startswith(dirs))
            ]
            tar.extractall(cache_dir(), members=wanted, filter="data")
    return root


def build_tools(
    tools: Mapping[str, tuple[str, ...]], common: tuple[str, ...], optimize: tuple[str, ...] = ("-O0",)
) -> dict[str, Path]:
    """Each tool of `tools` compiled from its own sources plus `common` (and build-info) and
    linked against llama-cpp-python's shared libraries; built once per source set, flags and
    library folder. Tool name -> executable. Raises Unavailable.

    `optimize`: -O0 builds fastest (the test oracles run on tiny models); a timed peer wants
    llama.cpp's Release flags (-O3 -DNDEBUG), though its heavy work runs in libggml either way."""
    try:
        import llama_cpp
    except ImportError as e:
        raise Unavailable(f"llama-cpp-python is not installed: {e}") from e
    compiler = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if compiler is None:
        raise Unavailable("no C++ compiler to build llama.cpp's tools")
    ours = [s for srcs in tools.values() for s in srcs if Path(s).is_absolute()]
    theirs = [s for srcs in tools.values() for s in srcs if not Path(s).is_absolute()]
    root = vendored_llama_cpp([*common, *theirs, *INCLUDED, "common/build-info.cpp.in"])
    libdir = Path(llama_cpp.__file__).parent / "lib"
    key = hashlib.sha256(
        f"{root}\n{libdir.resolve()}\n{optimize}\n{common}\n{sorted(tools.items())}\n".encode()
        + b"".join(Path(s).read_bytes() for s in ours)
    ).hexdigest()[:12]
    out = cache_dir() / f"llama-cpp-tools-{key}"
    built = {name: out / name for name in tools}
    if all(t.is_file() for t in built.values()):
        return built
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out) as tmp_name:
        tmp = Path(tmp_name)
        info = (root / "common" / "build-info.cpp.in").read_text()
        for k, v in {"NUMBER": "0", "COMMIT": "vendored"}.items():
            info = info.replace(f"@LLAMA_BUILD_{k}@", v)
        info = info.replace("@BUILD_COMPILER@", "c++").replace("@BUILD_TARGET@", "weightops-tests")
        (tmp / "build-info.cpp").write_text(info)
        sources = [root / s for s in common] + [tmp / "build-info.cpp"]
        sources += [root / s for srcs in tools.values() for s in srcs]  # an absolute s stays as it is
        flags = ["-std=c++17", *optimize, "-ffunction-sections", "-fdata-sections"]
        flags += [f"-I{root / d}" for d in ("", "common", "include", "ggml/include", "vendor")]

        def compile_one(i: int) -> subprocess.CompletedProcess:
            obj = tmp / f"{i}.o"
            return subprocess.run(
                [compiler, *flags, "-c", str(sources[i]), "-o", str(obj)], capture_output=True, text=True
            )

        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            done = list(pool.map(compile_one, range(len(sources))))
        failed = [d for d in done if d.returncode]
        if failed:
            raise Unavailable(f"llama.cpp's tools do not build here: {failed[0].stderr.strip()[-600:]}")
        shared = [str(tmp / f"{i}.o") for i in range(len(common) + 1)]
        i = len(shared)
        for name, srcs in tools.items():
            objs = [str(tmp / f"{j}.o") for j in range(i, i + len(srcs))]
            i += len(srcs)
            linked = subprocess.run(
                [compiler, *objs, *shared, "-Wl,--gc-sections", f"-L{libdir}", f"-Wl,-rpath,{libdir}"]
                + ["-lllama", "-lggml", "-lggml-base", "-pthread", "-o", str(tmp / name)],
                capture_output=True,
                text=True,
            )
            if linked.returncode:
                raise Unavailable(f"{name} does not link here: {linked.stderr.strip()[-600:]}")
        for name, path in built.items():
            os.replace(tmp / name, path)
    return built
