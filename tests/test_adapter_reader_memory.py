"""Reading adapter weights thousands of times keeps nothing: register/delete churn loads a new
version again and again, and safetensors' default mmap loading left memory behind per load
(safetensors 0.8.0, its issue #369; benchmarks/churn.py measured the executor's RSS growing)."""

from __future__ import annotations

import tracemalloc

import torch
from safetensors.torch import save_file

from services.executor.adapters.reader import _load_tensors


def test_loading_an_adapter_file_three_thousand_times_keeps_no_memory(tmp_path):
    path = tmp_path / "adapter_model.safetensors"
    want = {f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_{p}.weight": torch.randn(8, 64)
            for i in range(4) for p in "AB"}
    save_file(want, str(path))
    got = _load_tensors(path)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    del got
    for _ in range(200):                                   # warm: caches fill once
        _load_tensors(path)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(3000):
            _load_tensors(path)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 64 * 1024, f"{grown} bytes kept over 3000 loads"   # the mmap path kept ~4.5 MB
