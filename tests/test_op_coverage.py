"""Every op the extension registers (cpp/ops.cpp) has a caller in the engine: a kernel nobody serves
cannot linger. Two engine runs (start-up, then steps of mixed adapter and base-only requests) record
every call into torch.ops.openlora:

  cpu   the CPU engine as served: fp32 with prepacked weights, adapters read in place from the arena;
  cuda  the CUDA model-runner path on a machine without a GPU: every op that has a CUDA kernel runs
        that kernel through the CUDA emulation (cpp/cuda over emulation.h, registered in place of the
        CPU kernels), weights not prepacked (as on CUDA) and adapters read from a device-tier page
        pool (--device-cache-bytes), as the CUDA engine reads its device pages.

The union must cover every registered op. Both runs must also give the same greedy tokens: the CUDA
kernels, in the engine, answer as the CPU ones do.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import TINY

from services.executor import ops
from services.executor.ops.schemas import parse_schemas
from services.synthetic import ALL_MODULES, AdapterSpec, write_adapter

# Registered ops an engine does not call, each with the reason it stays. Keep this short: an op that
# gains a caller must leave it (checked below), and an op with no caller and no reason is deleted.
NO_ENGINE_CALLER = {
    "paged_attention_decode": "the checked form of paged_attention_decode_async (the same kernels, plus "
                              "host-side value checks) for callers whose block tables are not the engine's",
}

RUN = textwrap.dedent("""
    import json, sys, threading
    import torch
    from services.executor import ops
    from services.executor.adapters.source import LocalDirSource
    from services.executor.config import ExecutorConfig
    from services.executor.engine import Engine, GenerationRequest, SamplingOptions

    model_dir, root, mode = sys.argv[1:4]
    ops.ensure_built("cpp")
    if mode == "cuda":
        from services.executor.ops import build
        build.build_cuda_emulation()
        lib = torch.library.Library("openlora", "IMPL")
        for name in json.loads(sys.argv[4]):
            if hasattr(torch.ops.openlora_emu, name):   # the ops with a CUDA kernel
                emu = getattr(torch.ops.openlora_emu, name).default
                lib.impl(name, lambda *a, _emu=emu: _emu(*a), "CPU")
        try:  # the CUDA kernels serve now: their host code's own message
            torch.ops.openlora.silu_mul(torch.ones(2, dtype=torch.int32), torch.ones(2, dtype=torch.int32))
        except RuntimeError as exc:
            assert "on CUDA" in str(exc), exc

    called = set()

    class Recorder:  # stands in for torch.ops.openlora.<name>: records, then calls the op
        def __init__(self, name, packet):
            self.name, self.packet = name, packet
        def __call__(self, *a, **k):
            called.add(self.name)
            return self.packet(*a, **k)
        def __getattr__(self, attr):
            target = getattr(self.packet, attr)
            if not callable(target):
                return target
            def call(*a, **k):
                called.add(self.name)
                return target(*a, **k)
            return call

    for name in json.loads(sys.argv[4]):
        setattr(torch.ops.openlora, name, Recorder(name, getattr(torch.ops.openlora, name)))

    cfg = dict(base_model=model_dir, device="cpu", dtype="float32", kv_block_size=4, max_prefill_tokens=32,
               max_lora_rank=16)
    if mode == "cuda":
        cfg.update(prepack_weights=False, device_cache_bytes=4 << 20)
    engine = Engine(ExecutorConfig(**cfg), LocalDirSource(root))
    out, done, lock = {}, threading.Event(), threading.Lock()
    from services.executor.structured import StructuredOutput
    reqs = [("a", [5, 9, 3, 17, 2], None), ("b", [7, 7, 1], None), ("", [4, 11, 6, 8], None),
            ("a", [6, 2, 9], StructuredOutput("regex", "[0-9]{3}")),   # a grammar row: token masks
            ("", [6, 2, 9], StructuredOutput("regex", "[a-c]{3}"))]    # sampled (seeded): masks in place
    def on_event(ev):
        with lock:
            o = out.setdefault(ev.request_id, [])
            o += ev.token_ids
            if ev.error:
                raise SystemExit(ev.error)
            if ev.finish_reason:
                out[ev.request_id + "/done"] = True
                if sum(k.endswith("/done") for k in out) == len(reqs):
                    done.set()
    for i, (adapter, prompt, structured) in enumerate(reqs):
        sampled = structured is not None and structured.value == "[a-c]{3}"
        engine.submit(GenerationRequest(f"r{i}", prompt_token_ids=prompt, adapter_id=adapter,
                                        sampling=SamplingOptions(max_new_tokens=3, ignore_eos=True,
                                                                 structured=structured,
                                                                 temperature=1.0 if sampled else 0.0,
                                                                 seed=7 if sampled else None)), on_event)
    engine.start()
    assert done.wait(600), "requests did not finish"
    engine.stop()
    print("RESULT " + json.dumps({"called": sorted(called),
                                  "tokens": {k: v for k, v in out.items() if not k.endswith("/done")}}))
""")


def _run(modes: tuple[str, ...], model_dir: Path, root: Path, names: list[str]) -> dict[str, dict]:
    """mode -> that engine run's result; the runs go at once (separate processes, one thread each)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = {mode: subprocess.Popen([sys.executable, "-c", RUN, str(model_dir), str(root), mode, json.dumps(names)],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                    cwd=Path(__file__).resolve().parents[1]) for mode in modes}
    results = {}
    try:
        for mode, proc in procs.items():
            stdout, stderr = proc.communicate(timeout=900)
            assert proc.returncode == 0, stderr[-4000:]
            line = next(x for x in stdout.splitlines() if x.startswith("RESULT "))
            results[mode] = json.loads(line[len("RESULT "):])
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("coverage")
    for name, rank in (("a", 4), ("b", 8)):
        write_adapter(root / name, TINY["llama"], AdapterSpec(rank=rank, alpha=2 * rank, targets=ALL_MODULES,
                                                              seed=40 + rank))
    return root


def test_every_registered_op_is_called_by_an_engine_on_cpu_or_on_the_cuda_path(llama_dir, adapters):
    if ops.ensure_built() != "cpp":
        pytest.skip("the extension is not built (reference backend)")
    registered = sorted(parse_schemas())
    runs = _run(("cpu", "cuda"), llama_dir, adapters, registered)
    cpu, cuda = runs["cpu"], runs["cuda"]
    called = set(cpu["called"]) | set(cuda["called"])
    assert {"lora_paged_add_", "paged_attention_decode_async", "add_rms_norm", "rotary"} <= set(cuda["called"])
    assert {"lora_paged_add_", "linear_packed", "pack_weight", "token_bitmask_fill",
            "token_bitmask_fill_"} <= set(cpu["called"])
    uncalled = set(registered) - called - set(NO_ENGINE_CALLER)
    assert not uncalled, f"registered ops no engine calls (delete them, or say why they stay): {sorted(uncalled)}"
    assert not called & set(NO_ENGINE_CALLER), "an op with an engine caller is still listed as having none"
    assert cpu["tokens"] == cuda["tokens"] and all(len(v) == 3 for v in cpu["tokens"].values())
