"""cpp/cuda compiles: nvcc builds its objects against this torch's headers, with or without a GPU.

Running the CUDA kernels needs a GPU (tests/test_kernel.py's *_cuda tests); compiling them needs only
nvcc, so on a machine with nvcc and no GPU this is what checks the CUDA sources. The objects are
cached by build.compile_cuda_check (the first compile takes about a minute).
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from services.executor.ops import build

needs_nvcc = pytest.mark.skipif(build.find_nvcc() is None, reason="needs nvcc (CUDA_HOME or PATH)")


@needs_nvcc
def test_cuda_sources_compile_with_every_kernel_instantiated():
    objects = build.compile_cuda_check()
    assert [o.name for o in objects] == [f"{s.stem}.o" for s in build.CUDA_SOURCES]
    assert all(o.stat().st_size > 0 for o in objects)
    if shutil.which("nm") is None:
        pytest.skip("no nm to list the kernels")
    symbols = subprocess.run(["nm", "-C", str(objects[0])], capture_output=True, text=True,
                             check=True).stdout
    # fp32, fp16 and bf16 each get the 16-byte-load kernels and the scalar fallback
    for kernel in ("shrink_kernel", "expand_kernel"):
        for dtype, vec in (("float", 4), ("c10::Half", 8), ("c10::BFloat16", 8)):
            assert f"{kernel}<{dtype}, {vec}>" in symbols, (kernel, dtype)
            assert f"{kernel}<{dtype}, 1>" in symbols, (kernel, dtype)
    assert "lora_linear_entry<true>" in symbols and "lora_linear_entry<false>" in symbols
    symbols = subprocess.run(["nm", "-C", str(objects[1])], capture_output=True, text=True,
                             check=True).stdout
    for dtype in ("float", "c10::Half", "c10::BFloat16"):
        assert f"paged_decode_kernel<{dtype}>" in symbols, dtype
    assert "paged_attention_entry<true>" in symbols and "paged_attention_entry<false>" in symbols
    symbols = subprocess.run(["nm", "-C", str(objects[2])], capture_output=True, text=True,
                             check=True).stdout
    for kernel in ("norm_kernel", "silu_mul_kernel", "rotary_kernel"):
        for dtype in ("float", "c10::Half", "c10::BFloat16"):
            assert f"{kernel}<{dtype}>" in symbols, (kernel, dtype)
    symbols = subprocess.run(["nm", "-C", str(objects[3])], capture_output=True, text=True,
                             check=True).stdout
    for dtype in ("float", "c10::Half", "c10::BFloat16"):
        assert f"lora_paged_kernel<{dtype}>" in symbols, dtype


@needs_nvcc
def test_a_cuda_compile_error_carries_nvccs_message(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENLORA_BUILD_DIR", str(tmp_path / "build"))
    broken = tmp_path / "broken.cu"
    broken.write_text("__global__ void k(float* p) { p[0] = undeclared_name_43; }\n")
    with pytest.raises(build.KernelBuildError, match="undeclared_name_43") as info:
        build.compile_cuda_check([broken])
    assert "broken.cu" in str(info.value)
    assert not list((tmp_path / "build").rglob("*.o"))  # nothing half-made is left as an object


def test_no_nvcc_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(build, "find_nvcc", lambda: None)
    with pytest.raises(build.KernelBuildError, match="no nvcc"):
        build.compile_cuda_check()
