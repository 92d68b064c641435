"""cpp/cuda compiles: nvcc builds its objects against this torch's headers, with or without a GPU.

Running the CUDA kernels needs a GPU (the *_cuda tests of test_lora_paged.py, test_paged_attention.py
and test_layer_ops.py); compiling them needs only
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
    def symbols(source):
        obj = objects[[s.name for s in build.CUDA_SOURCES].index(source)]
        return subprocess.run(["nm", "-C", str(obj)], capture_output=True, text=True, check=True).stdout

    attention = symbols("paged_attention.cu")
    for dtype in ("float", "c10::Half", "c10::BFloat16"):
        assert f"paged_decode_kernel<{dtype}>" in attention, dtype
    assert "paged_attention_entry<true>" in attention and "paged_attention_entry<false>" in attention
    layer = symbols("layer_ops.cu")
    for kernel in ("norm_kernel", "silu_mul_kernel", "rotary_kernel"):
        for dtype in ("float", "c10::Half", "c10::BFloat16"):
            assert f"{kernel}<{dtype}>" in layer, (kernel, dtype)
    paged = symbols("lora_paged.cu")
    for dtype in ("float", "c10::Half", "c10::BFloat16"):
        assert f"lora_paged_kernel<{dtype}, {dtype}>" in paged, dtype
    assert "lora_paged_kernel<float, c10::BFloat16>" in paged      # bf16 pages under fp32 (--lora-dtype)


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
