"""Layering: importing a module that does not compute loads no torch, and nothing builds or loads a
kernel at import time (the engine builds the kernels at start-up, ops.ensure_built())."""

import subprocess
import sys

import pytest


def _imported_after(module: str) -> set[str]:
    code = (f"import sys, {module}; "
            "print(' '.join(m for m in sys.modules if m == 'torch' or m.startswith('torch.ops')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return set(out.stdout.split())


@pytest.mark.parametrize("module", ["services.executor.registry_source", "services.executor.adapters.source",
                                    "services.executor.adapters.policy", "services.router.placement",
                                    "services.registry.core"])
def test_modules_that_do_not_compute_do_not_import_torch(module):
    assert "torch" not in _imported_after(module)


def test_importing_the_ops_or_the_scheduler_builds_nothing():
    code = ("import services.executor.scheduler, services.executor.ops as ops, torch; "
            "print(ops._backend, hasattr(torch.ops.openlora, 'lora_paged_add_'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["None", "False"]     # not built, no op registered yet
