"""Engine behaviour through its public API: validation, adapter errors, cancellation, seeds, stops."""

from __future__ import annotations

import threading
import time

import pytest
from conftest import TINY

from services.common.errors import (
    AdapterMismatch,
    AdapterNotFound,
    Cancelled,
    InvalidAdapter,
    InvalidArgument,
    QueueFull,
)
from services.executor.adapters.source import LocalDirSource
from services.executor.config import ExecutorConfig
from services.executor.engine import Engine, GenerationRequest, SamplingOptions
from services.synthetic import AdapterSpec, ModelSpec, write_adapter


class Collector:
    def __init__(self):
        self.out, self.lock, self.cond = {}, threading.Lock(), threading.Condition()

    def __call__(self, ev):
        with self.cond:
            o = self.out.setdefault(ev.request_id, {"tokens": [], "logprobs": [], "text": "",
                                                    "finish": None, "error": None, "events": 0})
            o["tokens"] += ev.token_ids
            o["logprobs"] += ev.logprobs
            o["text"] += ev.text
            o["events"] += 1
            o["usage"] = (ev.prompt_tokens, ev.completion_tokens)
            if ev.finish_reason or ev.error:
                o["finish"], o["error"], o["done"] = ev.finish_reason, ev.error, True
            self.cond.notify_all()

    def wait(self, ids, timeout=60):
        with self.cond:
            ok = self.cond.wait_for(lambda: all(self.out.get(i, {}).get("done") for i in ids), timeout)
        assert ok, f"not finished: {[i for i in ids if not self.out.get(i, {}).get('done')]}"
        return {i: self.out[i] for i in ids}


@pytest.fixture(scope="module")
def adapter_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("api-adapters")
    spec = TINY["llama"]
    write_adapter(root / "good", spec, AdapterSpec(rank=8, seed=3))
    write_adapter(root / "good2", spec, AdapterSpec(rank=4, targets=("o_proj",), seed=4))
    write_adapter(root / "good3", spec, AdapterSpec(rank=6, seed=9))
    write_adapter(root / "big-rank", spec, AdapterSpec(rank=32, seed=5))
    write_adapter(root / "other-model", ModelSpec(hidden=96, heads=4, kv_heads=2), AdapterSpec(seed=6))
    write_adapter(root / "bad-json", spec, AdapterSpec(seed=7))
    (root / "bad-json" / "adapter_config.json").write_text("{not json")
    write_adapter(root / "bad-layer", ModelSpec(layers=4), AdapterSpec(seed=8))
    return root


@pytest.fixture(scope="module")
def engine(llama_dir, adapter_root):
    e = Engine(ExecutorConfig(base_model=str(llama_dir), device="cpu", dtype="float32",
                              max_device_adapters=2, max_lora_rank=16, kv_block_size=4,
                              max_queue=64, max_model_len=64),
               LocalDirSource(adapter_root))
    e.start()
    yield e
    e.stop()


def gen(rid, prompt=(5, 6, 7, 8), adapter="", **sampling):
    sampling.setdefault("max_new_tokens", 6)
    return GenerationRequest(rid, prompt_token_ids=list(prompt), adapter_id=adapter,
                             sampling=SamplingOptions(**sampling))


@pytest.mark.parametrize("req, match", [
    (GenerationRequest("e1"), "empty"),
    (gen("e2", prompt=(1, 512)), "outside the vocabulary"),
    (gen("e3", prompt=(-1,)), "outside the vocabulary"),
    (gen("e4", prompt=range(2, 66)), "context"),
    (gen("e5", temperature=-0.5), "temperature"),
    (gen("e6", temperature=float("nan")), "temperature"),
    (gen("e7", top_p=1.5), "top_p"),
    (gen("e8", top_k=-1), "top_k"),
    (gen("e9", repetition_penalty=-1.0), "repetition_penalty"),
    (gen("e10", max_new_tokens=-3), "max_new_tokens"),
    (gen("e11", stop=("",)), "stop"),
    (gen("", ), "request_id"),
])
def test_bad_requests_raise_invalid_argument(engine, req, match):
    with pytest.raises(InvalidArgument, match=match):
        engine.submit(req, lambda ev: None)


def test_text_prompt_and_streamed_text(engine):
    c = Collector()
    engine.submit(GenerationRequest("text", prompt="hello world",
                                    sampling=SamplingOptions(max_new_tokens=12, ignore_eos=True)), c)
    o = c.wait(["text"])["text"]
    assert o["finish"] == "length" and len(o["tokens"]) == 12 and o["events"] == 12
    prompt = engine.tokenizer.encode("hello world")
    full = engine.tokenizer.decode(prompt + o["tokens"])
    assert engine.tokenizer.decode(prompt) + o["text"] == full
    assert o["usage"] == (len(prompt), 12)


def test_adapter_errors_fail_only_their_request(engine):
    c = Collector()
    ids = {"ok-base": "", "ok-ad": "good", "missing": "nope", "big": "big-rank",
           "mismatch": "other-model", "badjson": "bad-json", "badlayer": "bad-layer"}
    for rid, adapter in ids.items():
        engine.submit(gen(rid, adapter=adapter, ignore_eos=True), c)
    out = c.wait(list(ids))
    assert out["ok-base"]["finish"] == "length" and out["ok-ad"]["finish"] == "length"
    assert isinstance(out["missing"]["error"], AdapterNotFound)
    assert isinstance(out["big"]["error"], AdapterMismatch) and "max_lora_rank" in str(out["big"]["error"])
    assert isinstance(out["mismatch"]["error"], AdapterMismatch)
    assert isinstance(out["badjson"]["error"], InvalidAdapter)
    assert isinstance(out["badlayer"]["error"], AdapterMismatch)
    assert out["ok-ad"]["tokens"] != out["ok-base"]["tokens"]


def test_cancel_frees_kv_blocks(engine):
    c = Collector()
    free0 = engine.allocator.num_free
    seen = []

    def on_event(ev):           # runs on the engine thread: cancel right after the first token
        if not seen:
            seen.append(engine.allocator.num_free)
            engine.cancel("long")
        c(ev)

    engine.submit(gen("long", prompt=range(2, 30), max_new_tokens=30, ignore_eos=True), on_event)
    o = c.wait(["long"])["long"]
    assert seen[0] < free0                                 # it held blocks while running
    assert isinstance(o["error"], Cancelled) and len(o["tokens"]) == 1
    assert engine.allocator.num_free == free0
    engine.cancel("no-such-request")                       # unknown ids are ignored


def test_seeded_sampling_same_across_batch_compositions(engine):
    opts = dict(temperature=0.9, top_k=50, top_p=0.95, seed=1234, max_new_tokens=10, ignore_eos=True)
    c1 = Collector()
    engine.submit(gen("seed-alone", **opts), c1)
    alone = c1.wait(["seed-alone"])["seed-alone"]["tokens"]
    c2 = Collector()
    mates = [gen(f"mate{i}", prompt=range(3 + i, 12 + 2 * i), temperature=1.0, max_new_tokens=8 + i)
             for i in range(5)]
    for m in mates[:2]:
        engine.submit(m, c2)
    engine.submit(gen("seed-crowd", adapter="", **opts), c2)
    for m in mates[2:]:
        engine.submit(m, c2)
    crowd = c2.wait(["seed-crowd"] + [m.request_id for m in mates])["seed-crowd"]["tokens"]
    assert alone == crowd
    c3 = Collector()
    engine.submit(gen("seed-other", **{**opts, "seed": 99}), c3)
    assert c3.wait(["seed-other"])["seed-other"]["tokens"] != alone


def test_context_limit_finishes_with_length(engine):
    c = Collector()
    engine.submit(gen("ctx", prompt=range(2, 60), max_new_tokens=50, ignore_eos=True), c)
    o = c.wait(["ctx"])["ctx"]
    assert o["finish"] == "length" and len(o["tokens"]) == 64 - 58


def test_eos_and_ignore_eos(engine):
    c = Collector()
    engine.submit(gen("probe", max_new_tokens=3, ignore_eos=True), c)
    first = c.wait(["probe"])["probe"]["tokens"][0]
    engine.eos_token_ids = frozenset({first})      # make the first greedy token the EOS
    try:
        engine.submit(gen("eos", max_new_tokens=5), c)
        engine.submit(gen("no-eos", max_new_tokens=5, ignore_eos=True), c)
        out = c.wait(["eos", "no-eos"])
    finally:
        engine.eos_token_ids = frozenset({1})
    assert out["eos"]["finish"] == "eos" and out["eos"]["tokens"] == [first]
    assert out["no-eos"]["finish"] == "length" and len(out["no-eos"]["tokens"]) == 5


def test_stop_string_not_in_output(engine):
    c = Collector()
    engine.submit(gen("probe-stop", max_new_tokens=12, ignore_eos=True), c)
    text = c.wait(["probe-stop"])["probe-stop"]["text"]
    stop = text[len(text) // 2: len(text) // 2 + 2]
    assert stop
    engine.submit(gen("stop", max_new_tokens=12, ignore_eos=True, stop=(stop,)), c)
    o = c.wait(["stop"])["stop"]
    assert o["finish"] == "stop" and o["text"] == text[:text.index(stop)]


def test_queue_full(llama_dir, adapter_root):
    e = Engine(ExecutorConfig(base_model=str(llama_dir), device="cpu", dtype="float32", max_queue=2),
               LocalDirSource(adapter_root))
    e.submit(gen("q1"), lambda ev: None)
    e.submit(gen("q2"), lambda ev: None)
    with pytest.raises(QueueFull):
        e.submit(gen("q3"), lambda ev: None)
    with pytest.raises(InvalidArgument, match="in flight"):
        e.submit(gen("q1"), lambda ev: None)
    e.stop()


def test_arena_eviction_pinning_and_status(llama_dir, adapter_root):
    """Three adapters through an arena with room for two: requests for the third wait for room
    (adapters in use are never evicted), all finish, and the status reports the arena as HOST."""
    e = Engine(ExecutorConfig(base_model=str(llama_dir), device="cpu", dtype="float32",
                              max_lora_rank=16), LocalDirSource(adapter_root))
    sizes = {}
    for name in ("good", "good2", "good3"):
        assert e.load_adapter(name, 0) == (1, "host")
        sizes[name] = e.adapters._held[(name, 1)].entry.nbytes
    e.stop()
    room = sizes["good"] + sizes["good3"]          # the two largest
    e = Engine(ExecutorConfig(base_model=str(llama_dir), device="cpu", dtype="float32",
                              max_lora_rank=16, host_cache_bytes=room), LocalDirSource(adapter_root))
    e.start()
    try:
        assert e.load_adapter("good", 0) == (1, "host")
        st = e.status()
        assert [(a.adapter_id, a.version, a.tier) for a in st.adapters] == [("good", 1, "host")]
        assert st.device_adapter_slots == 0 and st.kv_blocks_free == st.kv_blocks_total
        c = Collector()
        ids = []
        for i, name in enumerate(["good", "good2", "good3"] * 3):
            ids.append(f"lru{i}")
            e.submit(gen(ids[-1], adapter=name, max_new_tokens=4, ignore_eos=True), c)
        out = c.wait(ids)
        assert all(o["finish"] == "length" for o in out.values()), out
        st = e.status()
        assert all(a.active_requests == 0 for a in st.adapters)
        host = next(t for t in st.tier_stats if t.tier == "host")
        assert host.evictions >= 1 and host.bytes_used <= host.bytes_capacity
        e.unload_adapter("good")
        assert "good" not in [a.adapter_id for a in e.status().adapters]
    finally:
        e.stop()


def test_single_flight_load(llama_dir, adapter_root):
    calls = []

    class CountingSource(LocalDirSource):
        def resolve(self, adapter_id, version):
            calls.append(adapter_id)
            time.sleep(0.05)
            return super().resolve(adapter_id, version)

    e = Engine(ExecutorConfig(base_model=str(llama_dir), device="cpu", dtype="float32"),
               CountingSource(adapter_root))
    futs = [e.adapters.acquire("good", 1) for _ in range(5)]
    leases = [f.result(10) for f in futs]
    assert calls == ["good"] and len({lease.slot for lease in leases}) == 1
    assert e.adapters.residency() == [("good", 1, 5)]
    for lease in leases:
        e.adapters.release(lease)
    e.stop()


def test_forward_failure_fails_the_step_and_engine_goes_on(engine):
    c = Collector()
    orig = engine.model.forward
    engine.model.forward = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom"))
    try:
        engine.submit(gen("boom"), c)
        o = c.wait(["boom"])["boom"]
    finally:
        engine.model.forward = orig
    assert "boom" in str(o["error"])
    engine.submit(gen("after-boom", ignore_eos=True), c)
    assert c.wait(["after-boom"])["after-boom"]["finish"] == "length"
    assert engine.allocator.num_free == engine.allocator.num_blocks


def test_bad_callback_does_not_disturb_others(engine):
    c = Collector()

    def bad(ev):
        raise ValueError("client bug")

    engine.submit(gen("bad-cb", ignore_eos=True), bad)
    engine.submit(gen("good-cb", ignore_eos=True), c)
    assert c.wait(["good-cb"])["good-cb"]["finish"] == "length"
