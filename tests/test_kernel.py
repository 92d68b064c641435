"""The extension's build: it is built (or loaded from cache) with the served ops, a failed build says
why, a build killed mid-way blocks nothing; and the served LoRA op traces under torch.compile.
(The ops themselves: test_lora_paged.py, test_cpu_isa.py, test_paged_attention.py, test_layer_ops.py,
test_cuda_emulation.py; which of them an engine step calls: test_op_coverage.py.)
"""

from __future__ import annotations

import os

import pytest
import torch

from services.executor import ops
from services.executor.ops import kernel_backend


def test_extension_is_built():
    if os.environ.get("OPENLORA_KERNEL") != "reference":
        assert kernel_backend() == "cpp"
        assert not hasattr(torch.ops.openlora, "lora_linear")  # retired with the slot path


def test_torch_compile_traces_lora_paged_add_():
    """The in-place op under torch.compile (fullgraph): its fake kernel and schema's alias annotation."""
    g = torch.Generator().manual_seed(0)
    T, d_in, d_out, P, r = 5, 24, 40, 16, 3
    ca, cb = -(-d_in // P), -(-d_out // P)
    arena = torch.randn(r * (ca + cb), P, generator=g)
    args = (torch.randn(T, d_in, generator=g), arena, torch.arange(r * (ca + cb), dtype=torch.int32),
            torch.tensor([[[0, r]], [[0, 0]]], dtype=torch.int32), torch.tensor([[0.5], [1.0]]), 0,
            torch.tensor([0, 3, 5], dtype=torch.int32))

    def step(y, *rest):
        y = y * 2
        ops.lora_paged_add_(y, *rest)
        return y + 1

    y0 = torch.randn(T, d_out, generator=g)
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    want = y0 * 2
    ops.lora_paged_add_ref(want, *args)
    torch.testing.assert_close(compiled(y0, *args), want + 1)


def test_failed_build_raises_with_compiler_message(tmp_path, monkeypatch):
    from services.executor.ops import build

    broken = tmp_path / "broken.cpp"
    broken.write_text("int main() { return undeclared_name_42; }\n")
    monkeypatch.setattr(build, "CPU_SOURCES", [broken])
    monkeypatch.setattr(build, "ISA_FLAGS", {})
    monkeypatch.setattr(build, "cuda_buildable", lambda: False)
    monkeypatch.setenv("OPENLORA_BUILD_DIR", str(tmp_path / "build"))
    with pytest.raises(build.KernelBuildError, match="undeclared_name_42"):
        build.build()


@pytest.mark.slow
def test_a_build_killed_midway_does_not_block_later_builds(tmp_path, monkeypatch):
    """torch's `lock` file left by a killed build is removed under our flock (no live builder holds
    it), so the next build (or cached load) goes on instead of waiting for it forever."""
    import threading

    from services.executor.ops import build
    monkeypatch.setenv("OPENLORA_BUILD_DIR", str(tmp_path / "builds"))
    src = tmp_path / "tiny.cpp"
    src.write_text('#include <torch/library.h>\nTORCH_LIBRARY(openlora_lock_test, m) {}\n')
    build._load("lock_test", [src], (), False)
    (directory,) = (tmp_path / "builds").iterdir()
    (directory / "lock").write_text("")             # what a build killed mid-way leaves behind
    done = threading.Event()
    t = threading.Thread(target=lambda: (build._load("lock_test", [src], (), False), done.set()),
                         daemon=True)
    t.start()
    assert done.wait(300), "the build waited on a stale lock"
    assert not (directory / "lock").exists()
