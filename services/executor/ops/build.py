"""Builds the C++ (and, where CUDA is usable, CUDA) extension that registers torch.ops.openlora.

Built with torch.utils.cpp_extension.load and ninja into a cache directory keyed by a hash of
everything that changes the binary: the sources (contents and where they are: ninja rebuilds when a
path changes, so two checkouts must not share a directory), the flags, torch's version and location,
the Python interpreter (not the CPU: nothing is built for the CPU it is built on; see ISA_FLAGS), so an edit rebuilds and an unchanged tree loads in a
fraction of a second. The directory is the executor's --build-dir ($OPENLORA_BUILD_DIR), else
~/.cache/openlora.

build_cuda_emulation() builds the same CUDA sources as plain C++ over cpp/cuda/emulation.h, where
CPU threads play CUDA's blocks, warps and threads: torch.ops.openlora_emu.{paged_attention_decode,
paged_attention_decode_async, rms_norm, add_rms_norm, silu_mul, rotary, lora_paged_add_} run the CUDA kernels (and their host code) on CPU tensors, for the tests.

compile_cuda_check() compiles the CUDA sources with nvcc into objects (no link, no GPU, no CUDA build
of torch needed), so a machine that has nvcc but no GPU still checks that cpp/cuda builds:

    .venv/bin/python -m services.executor.ops.cuda_check
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import structlog
import torch
from torch.utils import cpp_extension

from services.cpp_sources import CPP_DIR  # the checkout's cpp/, or the copy a wheel ships

CPU_SOURCES = [CPP_DIR / "ops.cpp", CPP_DIR / "cpu_isa.cpp", CPP_DIR / "linear_packed.cpp",
               CPP_DIR / "paged_attention.cpp", CPP_DIR / "layer_ops.cpp", CPP_DIR / "lora_paged.cpp",
               CPP_DIR / "token_bitmask.cpp"]
# The served ops' hot loops (cpp/cpu_kernels_<isa>.cpp: lora_paged_add_, paged attention, the layer
# ops), one file per instruction set, each compiled with its own flags into the same binary; cpp/cpu_isa.cpp picks the best one this CPU
# supports at run time (set_cpu_isa forces one). Generic first, then each a superset of the one
# before: the linker keeps the first copy of an inline function several files share, and that one
# must run on every CPU that calls it.
ISA_FLAGS = {
    "generic": [],
    "avx2": ["-mavx2", "-mfma"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma"],
    "avx512_bf16": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mavx2", "-mfma"],
}
CUDA_SOURCES = [CPP_DIR / "cuda" / "paged_attention.cu", CPP_DIR / "cuda" / "layer_ops.cu",
                CPP_DIR / "cuda" / "lora_paged.cu"]
HEADERS = [CPP_DIR / "cpu_isa.h", CPP_DIR / "paged_attention_checks.h", CPP_DIR / "layer_ops_checks.h", CPP_DIR / "simd512.h", CPP_DIR / "cuda" / "compat.cuh",
           CPP_DIR / "cpu_kernels.h", CPP_DIR / "cpu_kernels_table.h", CPP_DIR / "simd_vec.h",
           CPP_DIR / "lora_paged_tiles.h", CPP_DIR / "paged_attention_tiles.h", CPP_DIR / "layer_ops_tiles.h"]
# The CUDA sources as plain C++ over a CPU emulation of CUDA's threads (build_cuda_emulation; tests only).
EMULATION_SOURCES = [CPP_DIR / "cuda" / "emulation_paged_attention.cpp",
                     CPP_DIR / "cuda" / "emulation_layer_ops.cpp",
                     CPP_DIR / "cuda" / "emulation_lora_paged.cpp"]
# No -march=native: the binary runs on any x86-64 CPU; the ISA-specific code is in the ISA_FLAGS files.
CFLAGS = ["-O3", "-fopenmp"]
CUDA_CFLAGS = ["-O3"]
# The architecture compile_cuda_check builds for (the real build targets the GPU it runs on): sm_90, the
# H100/H200 that sessions are lent; --cuda-arch ($OPENLORA_CUDA_ARCH) overrides it (e.g. 80 for an A100).
CUDA_CHECK_ARCH = "90"
# What a first build takes (seconds, low..high) on a small, busy machine, said in the log beforehand.
EXPECTED_BUILD_S = (20, 180)

log = structlog.get_logger(__name__)


class KernelBuildError(RuntimeError):
    """The extension failed to compile or load; the message holds the compiler's output."""


def cuda_buildable() -> bool:
    return torch.cuda.is_available() and cpp_extension.CUDA_HOME is not None


# Set once by ops.load from the executor's config (--build-dir, --cuda-arch); None -> $OPENLORA_BUILD_DIR
# / $OPENLORA_CUDA_ARCH (the same flags' environment variables, for tests and tools without a config).
BUILD_DIR: str | None = None
CUDA_ARCH: str | None = None


def build_dir() -> Path:
    return Path(BUILD_DIR or os.environ.get("OPENLORA_BUILD_DIR") or Path.home() / ".cache" / "openlora")


def cuda_arch() -> str | None:
    return CUDA_ARCH or os.environ.get("OPENLORA_CUDA_ARCH") or None


def _load(prefix: str, sources: list[Path], key_extra: tuple, verbose: bool, included: tuple[Path, ...] = (),
          isa_objects: dict[Path, list[str]] | None = None, **load_args) -> Path:
    """Compile (if needed) and load `sources` as extension `prefix`_<hash of the sources, the files
    they include (HEADERS and `included`) and key_extra>, in its own directory under build_dir();
    returns the .so's path. isa_objects: more sources, each compiled on its own with its own flags
    (added to the common ones) and linked in. A failure raises KernelBuildError with the compiler's output."""
    isa_objects = isa_objects or {}
    included = (*included, *isa_objects)
    key_extra = (*key_extra, [(path.name, flags) for path, flags in isa_objects.items()])
    key = hashlib.sha256(build_key(sources, key_extra, included).encode())
    name = f"{prefix}_{key.hexdigest()[:16]}"
    directory = build_dir() / name
    directory.mkdir(parents=True, exist_ok=True)
    cached = (directory / f"{name}.so").exists()
    if not cached:
        log.info("kernel_build_started", extension=prefix, directory=str(directory),
                 expected_seconds=f"{EXPECTED_BUILD_S[0]}-{EXPECTED_BUILD_S[1]}",
                 detail="compiling the C++ kernels once for this checkout, interpreter and torch; "
                        "later starts load them in well under a second")
    t0 = time.monotonic()
    try:
        with _build_lock(directory):
            objects = _compile_objects(directory, isa_objects, load_args, verbose)
            if objects:
                load_args["extra_ldflags"] = [*load_args.get("extra_ldflags", []), *map(str, objects)]
            cpp_extension.load(name=name, sources=[str(p) for p in sources],
                               build_directory=str(directory), is_python_module=False, verbose=verbose,
                               **load_args)
    except Exception as exc:  # the compiler's output is in the message (and its __cause__)
        cause = exc if isinstance(exc, _CompileError) else exc.__cause__
        detail = getattr(cause, "output", None)
        if isinstance(detail, bytes):
            detail = detail.decode(errors="replace")
        message = f"building {name} in {directory} failed: {exc}"
        if detail and detail not in message:
            message += "\n" + detail
        raise KernelBuildError(message) from exc
    if not cached:
        log.info("kernel_build_done", extension=prefix, seconds=round(time.monotonic() - t0, 1))
    return directory / f"{name}.so"


class _CompileError(Exception):
    def __init__(self, message: str, output: str):
        super().__init__(message)
        self.output = output


def _compile_objects(directory: Path, isa_objects: dict[Path, list[str]], load_args: dict,
                     verbose: bool) -> list[Path]:
    """Compiles each source of isa_objects to an object in directory (in parallel; ones already there
    are kept: the directory's name is the hash of them all), with the flags torch's extension build
    gives the others plus its own; returns the objects in isa_objects' order."""
    cxx = os.environ.get("CXX", "c++")
    common = ["-std=c++17", "-fPIC", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
              *load_args.get("extra_cflags", []),
              *(f"-I{p}" for p in [*load_args.get("extra_include_paths", []), *cpp_extension.include_paths()])]
    objects, running = [], []
    for source, flags in isa_objects.items():
        obj = directory / f"{source.stem}.o"
        objects.append(obj)
        if obj.exists():
            continue
        cmd = [cxx, "-c", str(source), "-o", f"{obj}.tmp", *common, *flags]
        if verbose:
            print(" ".join(cmd), file=sys.stderr)
        running.append((source, obj, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                      text=True)))
    failed = []
    for source, obj, proc in running:
        output = proc.communicate()[0]
        if proc.returncode != 0:
            failed.append(f"{source} (exit {proc.returncode}):\n{output}")
        else:
            os.replace(f"{obj}.tmp", obj)
    if failed:
        raise _CompileError(f"compiling {len(failed)} file(s) failed", "\n".join(failed))
    return objects


@contextlib.contextmanager
def _build_lock(directory: Path):
    """One builder per build directory at a time, through an flock the kernel releases when its
    holder dies. torch's own lock (a `lock` file it polls for forever) outlives a build killed
    mid-way (a SIGTERM during start-up), and would hang every later build of this tree; under the
    flock no live builder holds it, so a leftover one is stale and removed."""
    with open(directory / ".openlora-build.flock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            (directory / "lock").unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_key(sources: list[Path], key_extra: tuple, included: tuple[Path, ...] = ()) -> str:
    """Everything the binary depends on, as one string to hash: each source's and header's absolute
    path and contents, the flags (key_extra), torch's version and install location and the Python
    interpreter (path and version). Not the CPU: nothing is built for the CPU it is built on."""
    parts = []
    for path in [*sources, *HEADERS, *included]:
        parts.append(f"{path.resolve()}:{hashlib.sha256(path.read_bytes()).hexdigest()}")
    parts.append(repr((key_extra, torch.__version__, str(Path(torch.__file__).resolve().parent),
                       sys.executable, sys.version)))
    return "\n".join(parts)


def build(verbose: bool = False) -> Path:
    """Compile (if needed) and load the extension into this process; returns the .so's path."""
    with_cuda = cuda_buildable()
    sources = CPU_SOURCES + (CUDA_SOURCES if with_cuda else [])
    arch = cuda_arch()  # None: torch builds for the GPU present
    cuda_cflags = CUDA_CFLAGS + ([f"-gencode=arch=compute_{arch},code=sm_{arch}"] if arch else [])
    isa_objects = {CPP_DIR / f"cpu_kernels_{isa}.cpp": flags for isa, flags in ISA_FLAGS.items()}  # in order
    return _load("openlora_ops", sources, (CFLAGS, cuda_cflags, with_cuda), verbose, isa_objects=isa_objects,
                 extra_cflags=CFLAGS, extra_cuda_cflags=cuda_cflags if with_cuda else None,
                 extra_ldflags=["-fopenmp"], extra_include_paths=[str(CPP_DIR)])


def build_cuda_emulation(verbose: bool = False) -> Path:
    """Compile (if needed) and load the CUDA sources over the CPU emulation of CUDA's thread model
    (cpp/cuda/emulation.h) into this process: registers torch.ops.openlora_emu.* (every CUDA op) for
    CPU tensors. Slow by design (a thread per CUDA thread); tests only."""
    flags = ["-O2", "-pthread"]
    return _load("openlora_cuda_emulation", EMULATION_SOURCES, (flags,), verbose,
                 included=(*CUDA_SOURCES, CPP_DIR / "cuda" / "emulation.h"), extra_cflags=flags,
                 extra_ldflags=["-pthread"], extra_include_paths=[str(CPP_DIR), str(CPP_DIR / "cuda")])


def find_nvcc() -> str | None:
    """nvcc from CUDA_HOME (as torch finds it), else from PATH; None where there is none."""
    if cpp_extension.CUDA_HOME is not None:
        candidate = Path(cpp_extension.CUDA_HOME) / "bin" / "nvcc"
        if candidate.exists():
            return str(candidate)
    return shutil.which("nvcc")


# c10's CUDA headers include this generated header, which only CUDA builds of torch ship.
_CMAKE_MACROS = "c10/cuda/impl/cuda_cmake_macros.h"


def _shim_includes(directory: Path) -> list[str]:
    """An include dir with the one generated c10 header a CPU build of torch lacks (as a CUDA build
    generates it), or nothing where torch has its own."""
    if any((Path(p) / _CMAKE_MACROS).exists() for p in cpp_extension.include_paths()):
        return []
    shim = directory / "shim"
    (shim / _CMAKE_MACROS).parent.mkdir(parents=True, exist_ok=True)
    (shim / _CMAKE_MACROS).write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    return [str(shim)]


def compile_cuda_check(sources: list[Path] | None = None, arch: str | None = None,
                       verbose: bool = False) -> list[Path]:
    """Compile CUDA sources (default: cpp/cuda) with nvcc to objects, with the flags torch's
    extension builds use, against this torch's headers; returns the objects' paths. Cached by a hash
    of the sources, flags and nvcc's version. Raises KernelBuildError with nvcc's output if one fails
    to compile, or if there is no nvcc."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise KernelBuildError("no nvcc: set CUDA_HOME or put nvcc on PATH to compile cpp/cuda")
    sources = list(sources or CUDA_SOURCES)
    arch = arch or cuda_arch() or CUDA_CHECK_ARCH
    version = subprocess.run([nvcc, "--version"], check=False, capture_output=True, text=True).stdout
    flags = (["-std=c++20", "-Xcompiler", "-fPIC", f"-gencode=arch=compute_{arch},code=sm_{arch}",
              f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
              "-DTORCH_EXTENSION_NAME=openlora_cuda_check"]
             + cpp_extension.COMMON_NVCC_FLAGS + CUDA_CFLAGS)
    key = hashlib.sha256(repr((flags, version, torch.__version__)).encode())
    for path in sources + HEADERS:
        key.update(path.name.encode() + path.read_bytes())
    directory = build_dir() / f"cuda_check_{key.hexdigest()[:16]}"
    directory.mkdir(parents=True, exist_ok=True)
    includes = (_shim_includes(directory) + cpp_extension.include_paths()
                + [sysconfig.get_paths()["include"], str(CPP_DIR)])
    objects = []
    for source in sources:
        obj = directory / f"{source.stem}.o"
        if not obj.exists():
            cmd = [nvcc, "-c", str(source), "-o", str(obj) + ".tmp", *flags,
                   *(f"-I{p}" for p in includes)]
            if verbose:
                print(" ".join(cmd), file=sys.stderr)
            done = subprocess.run(cmd, check=False, capture_output=True, text=True)
            if done.returncode != 0:
                raise KernelBuildError(f"nvcc failed to compile {source} (exit {done.returncode}):\n"
                                       f"{done.stdout}{done.stderr}")
            os.replace(str(obj) + ".tmp", obj)
        objects.append(obj)
    return objects

