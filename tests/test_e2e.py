"""End to end over real servers on loopback: registry + two executors + router, as subprocesses.

The oracle for outputs is transformers+peft on the same model directory and adapter files.
"""

from __future__ import annotations

import subprocess
import threading
import time

import grpc
import pytest
import torch

from services.common.gen.openlora.v1 import (
    common_pb2,
    executor_pb2,
    executor_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
    router_pb2,
    router_pb2_grpc,
)
from services.synthetic import AdapterSpec, write_adapter
from tests.conftest import TINY
from tests.servers import Service, register_adapters

ADAPTERS = {
    "org/qv": AdapterSpec(rank=4, alpha=8, targets=("q_proj", "v_proj"), seed=201),
    "org/all-rs": AdapterSpec(rank=8, alpha=16, use_rslora=True, seed=202,
                              targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                       "up_proj", "down_proj")),
    "org/mlp-l1": AdapterSpec(rank=2, alpha=4, targets=("gate_proj", "down_proj"),
                              layers_to_transform=(1,), seed=203),
}
PROMPT = [5, 17, 42, 99, 7, 3, 250, 31]


@pytest.fixture(scope="module")
def stack(llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    adapter_dirs = {aid: write_adapter(root / aid.replace("/", "_"), TINY["llama"], spec)
                    for aid, spec in ADAPTERS.items()}
    registry = Service("registry", "--data-dir", str(root / "registry"),
                       log_path=root / "registry.log").start()
    executors = [Service("executor", "--registry", registry.address, "--base-model", str(llama_dir),
                         "--disk-cache-dir", str(root / f"disk{i}"), "--executor-id", f"exec-{i}",
                         "--max-batch-size", "8", log_path=root / f"executor{i}.log")
                 for i in range(2)]
    for e in executors:
        e.start()
    router = Service("router", "--registry", registry.address, "--poll-interval-s", "0.2",
                     *[x for e in executors for x in ("--executor", e.address)],
                     log_path=root / "router.log").start()
    register_adapters(registry.address, adapter_dirs, timeout=30)
    yield {"registry": registry, "executors": executors, "router": router, "adapters": adapter_dirs,
           "root": root}
    for s in [router, *executors, registry]:
        s.stop()


def _req(adapter="", max_new=8, **sampling):
    return common_pb2.GenerateRequest(
        adapter_id=adapter, prompt_token_ids=PROMPT,
        sampling=common_pb2.SamplingParams(max_new_tokens=max_new, ignore_eos=True, **sampling))


def _oracle(model_dir, adapter_dir, n: int) -> tuple[list[int], list[float]]:
    """Greedy tokens and their logprobs from transformers (+peft)."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    if adapter_dir is not None:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, adapter_dir)
    ids = torch.tensor([PROMPT])
    out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         output_logits=True, return_dict_in_generate=True, pad_token_id=1)
    tokens = out.sequences[0, len(PROMPT):].tolist()
    lps = [torch.log_softmax(lg[0].float(), -1)[t].item() for lg, t in zip(out.logits, tokens, strict=False)]
    return tokens, lps


@pytest.mark.parametrize("adapter", ["", "org/qv", "org/all-rs", "org/mlp-l1"])
def test_router_matches_transformers_peft(stack, llama_dir, adapter):
    with grpc.insecure_channel(stack["router"].address) as ch:
        resp = router_pb2_grpc.RouterStub(ch).Generate(_req(adapter, 6), timeout=120)
    want_tokens, want_lps = _oracle(llama_dir, stack["adapters"].get(adapter), 6)
    assert list(resp.token_ids) == want_tokens
    assert resp.logprobs == pytest.approx(want_lps, abs=1e-4)
    assert resp.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert resp.usage.prompt_tokens == len(PROMPT) and resp.usage.completion_tokens == 6
    assert resp.executor_id in ("exec-0", "exec-1")


def test_stream_equals_unary(stack):
    with grpc.insecure_channel(stack["router"].address) as ch:
        stub = router_pb2_grpc.RouterStub(ch)
        unary = stub.Generate(_req("org/qv", 10), timeout=120)
        chunks = list(stub.GenerateStream(_req("org/qv", 10), timeout=120))
    assert [t for c in chunks for t in c.token_ids] == list(unary.token_ids)
    assert "".join(c.text for c in chunks) == unary.text
    assert chunks[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert chunks[-1].usage.completion_tokens == 10


def test_adapter_requests_stick_to_the_executor_holding_it(stack):
    with grpc.insecure_channel(stack["router"].address) as ch:
        stub = router_pb2_grpc.RouterStub(ch)
        stub.Generate(_req("org/all-rs", 2), timeout=120)
        time.sleep(0.6)  # a status poll sees the adapter resident
        later = {stub.Generate(_req("org/all-rs", 2), timeout=120).executor_id for _ in range(4)}
        listed = stub.ListExecutors(router_pb2.ListExecutorsRequest(), timeout=10)
    assert len(later) == 1          # one adapter, one executor (its home: placement partitions adapters)
    holders = [e.status.executor_id for e in listed.executors
               if any(a.adapter_id == "org/all-rs" for a in e.status.adapters)]
    assert later <= set(holders) and all(e.healthy for e in listed.executors)


@pytest.mark.parametrize("request_, code", [
    (common_pb2.GenerateRequest(adapter_id="org/missing", prompt_token_ids=PROMPT),
     grpc.StatusCode.NOT_FOUND),
    (common_pb2.GenerateRequest(adapter_id="org/qv", adapter_version=9, prompt_token_ids=PROMPT),
     grpc.StatusCode.NOT_FOUND),
    (common_pb2.GenerateRequest(prompt=""), grpc.StatusCode.INVALID_ARGUMENT),
    (common_pb2.GenerateRequest(adapter_id="../etc", prompt_token_ids=PROMPT),
     grpc.StatusCode.INVALID_ARGUMENT),
    (common_pb2.GenerateRequest(prompt_token_ids=[5] * 100_000), grpc.StatusCode.INVALID_ARGUMENT),
    (common_pb2.GenerateRequest(prompt_token_ids=PROMPT,
                                sampling=common_pb2.SamplingParams(temperature=-1)),
     grpc.StatusCode.INVALID_ARGUMENT),
])
def test_bad_requests_get_their_code(stack, request_, code):
    with grpc.insecure_channel(stack["router"].address) as ch:
        with pytest.raises(grpc.RpcError) as info:
            router_pb2_grpc.RouterStub(ch).Generate(request_, timeout=60)
    assert info.value.code() == code, info.value.details()
    assert info.value.details()


def test_load_unload_and_status(stack):
    with grpc.insecure_channel(stack["executors"][1].address) as ch:
        stub = executor_pb2_grpc.ExecutorStub(ch)
        # on CPU the host arena is what the kernel reads: DEVICE (the default) reaches HOST
        resp = stub.LoadAdapter(executor_pb2.LoadAdapterRequest(adapter_id="org/mlp-l1"), timeout=60)
        assert resp.tier == executor_pb2.ADAPTER_TIER_HOST and resp.load_ms > 0
        st = stub.GetStatus(executor_pb2.GetStatusRequest(), timeout=10)
        held = {a.adapter_id: a for a in st.adapters}
        assert held["org/mlp-l1"].tier == executor_pb2.ADAPTER_TIER_HOST
        assert held["org/mlp-l1"].version == 1
        assert st.device_adapter_slots == 0 and 0 < st.host_cache_used_bytes <= st.host_cache_bytes
        tiers = {t.tier: t for t in st.tier_stats}
        assert set(tiers) == {executor_pb2.ADAPTER_TIER_DEVICE, executor_pb2.ADAPTER_TIER_HOST,
                              executor_pb2.ADAPTER_TIER_DISK}
        host, disk = tiers[executor_pb2.ADAPTER_TIER_HOST], tiers[executor_pb2.ADAPTER_TIER_DISK]
        assert host.adapters >= 1 and host.loads >= 1 and host.bytes_used == st.host_cache_used_bytes
        assert host.bytes_capacity == st.host_cache_bytes and disk.adapters >= 1 and disk.loads >= 1
        assert st.executor_id == "exec-1" and st.kv_blocks_total > 0 and st.max_batch_size == 8
        assert (st.dtype, st.lora_dtype) == ("float32", "float32")     # --lora-dtype auto: the model's
        stub.UnloadAdapter(executor_pb2.UnloadAdapterRequest(adapter_id="org/mlp-l1"), timeout=60)
        st = stub.GetStatus(executor_pb2.GetStatusRequest(), timeout=10)
        assert "org/mlp-l1" not in {a.adapter_id for a in st.adapters}
        with pytest.raises(grpc.RpcError) as info:
            stub.LoadAdapter(executor_pb2.LoadAdapterRequest(adapter_id="org/nope"), timeout=60)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        # the disk tier: fetched from the registry, not loaded into a slot
        resp = stub.LoadAdapter(executor_pb2.LoadAdapterRequest(
            adapter_id="org/qv", tier=executor_pb2.ADAPTER_TIER_DISK), timeout=60)
        assert resp.tier == executor_pb2.ADAPTER_TIER_DISK
        st = stub.GetStatus(executor_pb2.GetStatusRequest(), timeout=10)
        held = {a.adapter_id: a.tier for a in st.adapters}
        assert held["org/qv"] in (executor_pb2.ADAPTER_TIER_DISK, executor_pb2.ADAPTER_TIER_HOST)
        stub.UnloadAdapter(executor_pb2.UnloadAdapterRequest(adapter_id="org/qv"), timeout=60)
        st = stub.GetStatus(executor_pb2.GetStatusRequest(), timeout=10)
        assert "org/qv" not in {a.adapter_id for a in st.adapters}   # gone from every tier


def test_cancelled_stream_frees_kv_blocks(stack):
    with grpc.insecure_channel(stack["executors"][0].address) as ch:
        stub = executor_pb2_grpc.ExecutorStub(ch)
        total = stub.GetStatus(executor_pb2.GetStatusRequest(), timeout=10).kv_blocks_total
        call = stub.GenerateStream(_req("org/qv", 400), timeout=120)
        next(call)  # the request is running and holds blocks
        assert stub.GetStatus(executor_pb2.GetStatusRequest(), timeout=10).kv_blocks_free < total
        call.cancel()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            st = stub.GetStatus(executor_pb2.GetStatusRequest(), timeout=10)
            if st.kv_blocks_free == total and st.running_requests == 0:
                break
            time.sleep(0.05)
        assert st.kv_blocks_free == total and st.running_requests == 0


def test_a_repeated_prompt_is_served_from_the_prefix_cache(stack):
    """The same 40-token prompt twice on one adapter: the second takes the first's two full KV
    blocks (16 tokens each) and answers the same; GetStatus counts it."""
    prompt = [(7 * i + 3) % 500 + 2 for i in range(40)]
    req = common_pb2.GenerateRequest(adapter_id="org/qv", prompt_token_ids=prompt,
                                     sampling=common_pb2.SamplingParams(max_new_tokens=6, ignore_eos=True))
    with grpc.insecure_channel(stack["executors"][0].address) as ch:
        stub = executor_pb2_grpc.ExecutorStub(ch)
        first = stub.Generate(req, timeout=120)
        before = stub.GetStatus(executor_pb2.GetStatusRequest(), timeout=10)
        assert before.kv_blocks_cached >= 2
        second = stub.Generate(req, timeout=120)
        after = stub.GetStatus(executor_pb2.GetStatusRequest(), timeout=10)
    assert list(second.token_ids) == list(first.token_ids)
    assert second.logprobs == pytest.approx(first.logprobs, abs=1e-4)
    assert after.prefix_cache_hit_tokens - before.prefix_cache_hit_tokens == 32
    assert after.prefill_tokens_computed - before.prefill_tokens_computed == 8
    assert after.kv_blocks_free == after.kv_blocks_total


def test_router_sends_a_shared_prompt_prefix_where_it_is_cached(stack):
    """Base-only prompts sharing their first 48 tokens (3 KV blocks) with different endings, through
    the router: every one lands on the executor that served the first, and each later one takes the
    3 blocks from that executor's prefix cache."""
    prefix = [(11 * i + 5) % 500 + 2 for i in range(48)]

    def req(i):
        return common_pb2.GenerateRequest(
            prompt_token_ids=prefix + [100 + i] * 8,
            sampling=common_pb2.SamplingParams(max_new_tokens=2, ignore_eos=True))

    with grpc.insecure_channel(stack["router"].address) as ch:
        router = router_pb2_grpc.RouterStub(ch)
        served = [router.Generate(req(0), timeout=120).executor_id]
        listed = router.ListExecutors(router_pb2.ListExecutorsRequest(), timeout=10)
        address = {e.status.executor_id: e.address for e in listed.executors}[served[0]]
        with grpc.insecure_channel(address) as ex:
            status = executor_pb2_grpc.ExecutorStub(ex).GetStatus
            before = status(executor_pb2.GetStatusRequest(), timeout=10).prefix_cache_hit_tokens
            served += [router.Generate(req(i), timeout=120).executor_id for i in range(1, 4)]
            after = status(executor_pb2.GetStatusRequest(), timeout=10).prefix_cache_hit_tokens
    assert set(served) == {served[0]}
    assert after - before == 3 * 48


def test_vllm_style_sampling_fields_over_grpc(stack):
    """stop_token_ids, min_new_tokens, the presence/frequency penalties and top_logprobs, both ways."""
    with grpc.insecure_channel(stack["router"].address) as ch:
        stub = router_pb2_grpc.RouterStub(ch)
        free = list(stub.Generate(_req(max_new=8), timeout=120).token_ids)
        stopped = stub.Generate(_req(max_new=8, stop_token_ids=[free[2]]), timeout=120)
        held = stub.Generate(_req(max_new=8, stop_token_ids=[free[0]], min_new_tokens=3), timeout=120)
        penalised = stub.Generate(_req(max_new=8, presence_penalty=-2, frequency_penalty=-2), timeout=120)
        tops = stub.Generate(_req(max_new=4, top_logprobs=3), timeout=120)
        streamed = [t for c in stub.GenerateStream(_req(max_new=4, top_logprobs=3), timeout=120)
                    for t in c.top_logprobs]
        with pytest.raises(grpc.RpcError) as bad:
            stub.Generate(_req(max_new=8, presence_penalty=3), timeout=120)
    assert stopped.finish_reason == common_pb2.FINISH_REASON_STOP
    assert list(stopped.token_ids) == free[:free.index(free[2]) + 1]
    assert free[0] not in list(held.token_ids)[:3]
    assert list(penalised.token_ids) != free
    assert [list(t.token_ids)[0] for t in tops.top_logprobs] == free[:4]        # greedy: the best
    assert all(len(t.token_ids) == len(t.logprobs) == 3 for t in tops.top_logprobs)
    assert [list(t.token_ids) for t in streamed] == [list(t.token_ids) for t in tops.top_logprobs]
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "presence_penalty" in bad.value.details()


def test_deadline_exceeded_frees_the_request(stack):
    with grpc.insecure_channel(stack["executors"][0].address) as ch:
        stub = executor_pb2_grpc.ExecutorStub(ch)
        with pytest.raises(grpc.RpcError) as info:
            stub.Generate(_req("", 500), timeout=0.1)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        deadline = time.monotonic() + 10
        while stub.GetStatus(executor_pb2.GetStatusRequest(), timeout=10).running_requests:
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_one_bad_request_does_not_disturb_its_batch(stack):
    """Good requests running beside failing ones finish with the tokens they get alone."""
    with grpc.insecure_channel(stack["executors"][0].address) as ch:
        stub = executor_pb2_grpc.ExecutorStub(ch)
        alone = stub.Generate(_req("org/qv", 12), timeout=120).token_ids
        results, errors = [], []

        def good():
            results.append(list(stub.Generate(_req("org/qv", 12), timeout=120).token_ids))

        def bad():
            try:
                stub.Generate(_req("org/missing", 12), timeout=120)
            except grpc.RpcError as exc:
                errors.append(exc.code())

        threads = [threading.Thread(target=f) for f in (good, bad, good, bad, good)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert results == [list(alone)] * 3
    assert errors == [grpc.StatusCode.NOT_FOUND] * 2


def test_registry_down_serves_latest_held_version(stack, llama_dir, tmp_path):
    """Without the registry, version 0 is served from the executor's disk; unheld -> UNAVAILABLE."""
    dead = Service("registry", "--data-dir", str(tmp_path / "r")).start()
    dead_address = dead.address
    with grpc.insecure_channel(dead_address) as ch:
        registry_pb2_grpc.AdapterRegistryStub(ch).RegisterAdapter(registry_pb2.RegisterAdapterRequest(
            adapter_id="org/qv", source=f"file://{stack['adapters']['org/qv']}"), timeout=30)
    ex = Service("executor", "--registry", dead_address, "--base-model", str(llama_dir),
                 "--disk-cache-dir", str(tmp_path / "disk"), "--adapter-latest-ttl-s", "0",
                 log_path=tmp_path / "ex.log").start()
    try:
        with grpc.insecure_channel(ex.address) as ch:
            stub = executor_pb2_grpc.ExecutorStub(ch)
            before = stub.Generate(_req("org/qv", 4), timeout=120).token_ids
            dead.kill()   # "latest" is asked of the registry every time (ttl 0): now it cannot answer
            after = stub.Generate(_req("org/qv", 4), timeout=120).token_ids
            assert after == before
            with pytest.raises(grpc.RpcError) as info:   # within a second (the deadline), not a hang
                stub.Generate(_req("org/all-rs", 4), timeout=1.0)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        ex.stop()
        dead.stop()


def test_router_fails_over_when_an_executor_dies(stack, llama_dir, tmp_path):
    reg = stack["registry"].address
    a = Service("executor", "--registry", reg, "--base-model", str(llama_dir),
                "--disk-cache-dir", str(tmp_path / "a")).start()
    b = Service("executor", "--registry", reg, "--base-model", str(llama_dir),
                "--disk-cache-dir", str(tmp_path / "b")).start()
    router = Service("router", "--executor", a.address, "--executor", b.address,
                     "--poll-interval-s", "5").start()
    try:
        with grpc.insecure_channel(router.address) as ch:
            stub = router_pb2_grpc.RouterStub(ch)
            first = stub.Generate(_req("org/qv", 3), timeout=120)
            victim = a if first.executor_id == a.address else b
            victim.kill()   # the router's view is stale for up to 5 s: failover must cover it
            again = [stub.Generate(_req("org/qv", 3), timeout=120) for _ in range(3)]
        survivor = b if victim is a else a
        assert {r.executor_id for r in again} == {survivor.address}
        assert all(r.token_ids == first.token_ids for r in again)
    finally:
        for s in (router, a, b):
            s.stop()


def test_sigterm_exits_zero(stack):
    r = Service("router", "--executor", stack["executors"][0].address).start()
    assert r.terminate() == 0


def test_router_serves_only_with_a_healthy_executor(stack, llama_dir, tmp_path):
    from tests.servers import free_port, health
    ex = Service("executor", "--base-model", str(llama_dir),
                 "--disk-cache-dir", str(tmp_path / "d")).start()
    router = Service("router", "--executor", ex.address, "--poll-interval-s", "0.2").start()
    try:
        ex.kill()
        deadline = time.monotonic() + 10
        while health(router.address) == 1 and time.monotonic() < deadline:   # 1 = SERVING
            time.sleep(0.1)
        assert health(router.address) == 2                                    # NOT_SERVING
    finally:
        router.stop()
        ex.stop()
    assert free_port()


def test_sigterm_while_the_model_loads_exits_zero(llama_dir, tmp_path):
    import signal
    import subprocess
    import sys
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", "executor", "--port", "0",
                             "--base-model", str(llama_dir),
                             "--disk-cache-dir", str(tmp_path / "d")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)   # imports done, model loading (or just loaded)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err


def test_router_answers_unknown_adapters_from_the_registry(stack):
    """NOT_FOUND comes from the registry check, before any executor (here: none reachable)."""
    from tests.servers import free_port
    dead = f"127.0.0.1:{free_port()}"
    router = Service("router", "--registry", stack["registry"].address, "--executor", dead)
    router.proc = subprocess.Popen(router.args, env=router.env)   # never SERVING: no executor
    try:
        with grpc.insecure_channel(router.address) as ch:
            grpc.channel_ready_future(ch).result(timeout=60)
            stub = router_pb2_grpc.RouterStub(ch)
            with pytest.raises(grpc.RpcError) as info:
                stub.Generate(_req("org/missing"), timeout=30)
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
            with pytest.raises(grpc.RpcError) as info:   # known adapter: on to the (dead) executor
                stub.Generate(_req("org/qv"), timeout=30)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        router.stop()
