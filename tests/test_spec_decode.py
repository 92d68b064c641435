"""Prompt-lookup (n-gram) speculative decoding: proposals, back-pressure, KV rollback, and the output
unchanged by it (greedy token for token, seeded sampling draw for draw, the distribution at a
position by chi-square), in mixed-adapter batches with preemption and prefix caching.

The engine tests use a model whose greedy output copies its context (synthetic.write_copy_model: an
induction circuit set by hand), so most drafts are accepted, beside adapters that break the copying
(their drafts are mostly rejected) and plain random prompts.
"""

from __future__ import annotations

import math

import pytest
import torch
from engine_runs import run_requests as run
from prometheus_client import generate_latest

from services.executor.adapters.source import LocalDirSource
from services.executor.config import ExecutorConfig
from services.executor.engine import Engine, GenerationRequest, SamplingOptions
from services.executor.kv_cache import KVBlockAllocator, block_hash
from services.executor.metrics import ExecutorMetrics
from services.executor.sampler import SamplingRow, _filter_rows, _penalise, make_generator, sample_draft
from services.executor.scheduler import Scheduler, Sequence
from services.executor.spec_decode import NgramIndex, Speculator, propose_ngram
from services.synthetic import ALL_MODULES, AdapterSpec, ModelSpec, write_adapter, write_copy_model

COPY = ModelSpec(arch="llama", hidden=128, intermediate=128, heads=2, kv_heads=2, vocab=384,
                 rope_theta=1e6, seed=5)
ADAPTERS = {  # small alpha: the model still copies; "strong": it no longer does
    "r2": AdapterSpec(rank=2, alpha=0.5, targets=("q_proj", "v_proj"), seed=21),
    "r8": AdapterSpec(rank=8, alpha=1.0, targets=ALL_MODULES, seed=22),
    "r16": AdapterSpec(rank=16, alpha=2.0, targets=("o_proj", "up_proj", "down_proj"), seed=23),
    "strong": AdapterSpec(rank=8, alpha=16.0, targets=ALL_MODULES, seed=24),
}


# -- proposals and back-pressure --------------------------------------------------------------------

@pytest.mark.parametrize("tokens, k, min_n, max_n, want", [
    ([1, 2, 3, 4, 1, 2], 3, 1, 3, [3, 4, 1]),            # the match continues into its own copy
    ([1, 2, 3, 4, 2, 3, 9, 1, 2, 3], 2, 1, 3, [4, 2]),   # longest (1 2 3), not the later (2 3)
    ([5, 6, 7, 5, 6, 8, 5, 6], 2, 2, 2, [8, 5]),         # equal lengths: the most recent
    ([7, 7], 4, 1, 2, [7, 7, 7, 7]),                     # a loop of one token, drafted k long
    ([1, 2, 3, 4], 3, 1, 3, []),                          # nothing repeats
    ([1, 2, 3, 1, 2], 3, 3, 3, []),                       # shorter than min_n matches only
])
def test_ngram_proposals(tokens, k, min_n, max_n, want):
    assert propose_ngram(tokens, NgramIndex(min_n), k, max_n) == want


def test_ngram_index_is_incremental():
    tokens, index = [3, 1, 4, 1, 5], NgramIndex(2)
    assert propose_ngram(tokens, index, 2, 4) == []
    tokens += [9, 2, 6, 1, 5]                 # (1 5) was seen: what followed it is drafted
    assert propose_ngram(tokens, index, 2, 4) == [9, 2]
    assert index.starts[(1, 5)] == [3, 8]


def test_low_acceptance_pauses_a_sequence_and_big_batches_get_no_room():
    sp = Speculator(k=4, min_n=1, max_n=2, min_acceptance=0.3, disable_by_batch_size=4,
                    max_batch_tokens=20)
    st = sp.new_state(limit=100)
    tokens = [1, 2, 1, 2, 1]
    assert sp.propose(tokens, st, room=10) == [2, 1, 2, 1]
    for _ in range(4):                        # the EMA (from 1.0) falls below 0.3 on the 4th miss
        assert st.pause == 0
        sp.record(st, drafted=4, accepted=0, emitted=1)
    for pause in (1, 2, 4):                   # then every rejected draft: a longer pause
        assert st.pause == pause
        for _ in range(pause):
            assert sp.propose(tokens, st, room=10) == []
        assert sp.propose(tokens, st, room=10) != []
        sp.record(st, drafted=4, accepted=0, emitted=1)
    sp.record(st, drafted=4, accepted=4, emitted=5)
    assert st.backoff == 1 and sp.acceptance_rate == 4 / 32
    assert len(sp.propose(tokens, sp.new_state(limit=7), room=10)) == 1   # 2 tokens left: 1 drafted
    assert sp.room(num_seqs=5, num_tokens=5) == 0
    assert sp.room(num_seqs=3, num_tokens=17) == 3
    assert (sp.draft_tokens, sp.accepted_tokens, sp.emitted_tokens) == (32, 4, 12)


# -- the scheduler's rollback -----------------------------------------------------------------------

def test_rejected_positions_are_rolled_back_and_never_registered():
    bs = 4
    alloc = KVBlockAllocator(32)
    sp = Speculator(k=4, min_n=1, max_n=3)
    s = Scheduler(alloc, bs, max_batch_size=4, max_prefill_tokens=64, prefix_caching=True, speculator=sp)
    seq = Sequence("a", [5, 6, 7, 8, 9, 5, 6], 7, cache_key="x")
    seq.spec = sp.new_state(limit=40)
    s.add(seq)
    s.advance(s.schedule())                    # the prompt (7 tokens)
    seq.token_ids.append(7)                    # its first output token
    b = s.schedule()
    item = b.items[0]
    assert item.draft == [8, 9, 5, 6] and item.num_new == 5
    assert len(seq.blocks) == 3                # positions 7..11
    item.accepted = 1                          # 8 accepted, then the sampler picked 1 instead of 9
    s.advance(b)
    assert seq.num_computed == 9 and len(seq.blocks) == 3   # 0..8 computed; token 9's block stays
    assert alloc.num_free == 32 - 3
    seq.token_ids += [8, 1]                    # what the output processor appends
    want = block_hash(block_hash(b"", "x", [5, 6, 7, 8]), "x", [9, 5, 6, 7])
    assert sorted(alloc._hash_of) == seq.blocks[:2]    # blocks 0 and 1: positions 0..7, all appended
    assert alloc._hash_of[seq.blocks[1]] == want
    b = s.schedule()                           # decode of "1": (8 1) never seen: no draft
    assert b.items[0].draft == []
    s.advance(b)
    assert len(alloc._hash_of) == 2            # block 2 (positions 8..11) is not full yet

    seq.token_ids.append(9)
    seq.spec.ema = 1.0
    b = s.schedule()                           # (1 9)? no; (9) -> 5 6 7 8: a full draft
    assert b.items[0].draft == [5, 6, 7, 8] and len(seq.blocks) == 4
    b.items[0].accepted = 0
    s.advance(b)                               # all rejected: back to 11 computed, block 3 freed
    assert seq.num_computed == 11 and len(seq.blocks) == 3 and alloc.num_free == 29
    s.remove(seq)
    assert alloc.num_free == 32


# -- the sampler: one position's distribution -------------------------------------------------------

def _probs(logits, history, opts):
    row = _penalise(logits, history, opts.repetition_penalty)
    return torch.softmax(_filter_rows((row / opts.temperature)[None], [opts.top_k], [opts.top_p])[0], -1)


def _chi2_ok(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, float]:
    """-> (statistic, the p = 0.001 critical value) over the tokens expected >= 5 times (the rest
    pooled), Wilson-Hilferty's approximation of the chi-square quantile."""
    n = counts.sum()
    exp = probs * n
    big = exp >= 5
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([exp[big], exp[~big].sum()[None]])
    keep = exp > 0
    stat = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    df = int(keep.sum()) - 1
    z = 3.09
    crit = df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3
    return stat, crit


def test_verification_keeps_the_distribution_at_each_position():
    """Over many seeds, the first emitted token is distributed as p0 (the draft's first token is
    accepted with probability p0(d) and otherwise replaced by a draw from p0 without d), and after an
    accepted d the next is distributed as p1 given the history with d (penalties see it)."""
    g = torch.Generator().manual_seed(0)
    V = 12
    logits = torch.randn(2, V, generator=g) * 1.5
    opts = SamplingOptions(temperature=0.8, top_k=9, top_p=0.97, repetition_penalty=1.4)
    history = [3, 4, 4]
    p0 = _probs(logits[0], history, opts)
    d = int(torch.argsort(p0, descending=True)[1])      # a likely draft token, not the likeliest
    p1 = _probs(logits[1], history + [d], opts)
    first, second = torch.zeros(V), torch.zeros(V)
    for seed in range(20000):          # enough that p = 0.001 tests a real bias
        row = SamplingRow(opts, make_generator(seed, torch.device("cpu")), list(history))
        tokens, _, _ = sample_draft(logits, row, [d])
        assert row.history == history
        first[tokens[0]] += 1
        if tokens[0] == d:
            assert len(tokens) == 2
            second[tokens[1]] += 1
        else:
            assert len(tokens) == 1
    for counts, p in ((first, p0), (second, p1)):
        stat, crit = _chi2_ok(counts, p)
        assert stat < crit, (stat, crit, counts, p)


# -- the engine: the same output with and without speculation ---------------------------------------

@pytest.fixture(scope="module")
def copy_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("spec")
    model = write_copy_model(root / "model", COPY, noise=0.05)
    for name, spec in ADAPTERS.items():
        write_adapter(root / "adapters" / name, COPY, spec)
    return model, root / "adapters"


def make_engine(copy_dirs, method: str, **overrides) -> Engine:
    model, adapters = copy_dirs
    cfg = dict(base_model=str(model), device="cpu", dtype="float32", kv_block_size=4,
               max_prefill_tokens=48, max_model_len=160, speculative_method=method,
               num_speculative_tokens=4, prompt_lookup_min=1, prompt_lookup_max=3)
    return Engine(ExecutorConfig(**{**cfg, **overrides}), LocalDirSource(adapters))


def sizes(out: dict) -> list[int]:
    """How many tokens each of a request's events carried (more than 1: an accepted draft)."""
    return [len(ev.token_ids) for ev in out["events"]]


def documents(n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randperm(COPY.vocab - 4, generator=g)[:24] + 2).tolist() for _ in range(n)]


def mixed_requests(**sampling) -> list[GenerationRequest]:
    """Quoting prompts (a document, then its first tokens again) and random ones, over every
    adapter and the base model; two pairs share a prompt (prefix cache hits)."""
    docs = documents(6, 1)
    g = torch.Generator().manual_seed(2)
    prompts = [d + [3] + d[:2] for d in docs] + [torch.randint(2, COPY.vocab, (9 + i,), generator=g).tolist()
                                                 for i in range(3)]
    prompts += [prompts[0], prompts[1]]
    names = ["", "r2", "r8", "r16", "strong", "", "r8", "", "strong", "", "r2"]
    return [GenerationRequest(f"q{i}", prompt_token_ids=p, adapter_id=a,
                              sampling=SamplingOptions(max_new_tokens=20, ignore_eos=True, **sampling))
            for i, (p, a) in enumerate(zip(prompts, names, strict=True))]


def check_registered_blocks(engine: Engine) -> None:
    """After every advance: a block registered with the prefix cache holds accepted tokens only."""
    sched, orig = engine.scheduler, engine.scheduler.advance
    bs = sched.block_size

    def advance(batch):
        orig(batch)
        for seq in sched.running:
            assert seq.num_registered * bs <= min(seq.num_computed, seq.num_tokens)
            for i in range(seq.num_registered):
                h = engine.allocator._hash_of.get(seq.blocks[i])
                want = block_hash(seq.block_hashes[i - 1] if i else b"", seq.cache_key,
                                  seq.token_ids[i * bs:(i + 1) * bs])
                assert seq.block_hashes[i] == want
                assert h is None or h == want   # None: an equal prefix was registered by another block
    sched.advance = advance


def run_both(copy_dirs, requests_fn, **overrides):
    outs, stats, preempted = [], [], []
    for method in ("none", "ngram"):
        engine = make_engine(copy_dirs, method, **overrides)
        for name in ADAPTERS:
            engine.load_adapter(name)
        check_registered_blocks(engine)
        orig = engine.scheduler._preempt
        engine.scheduler._preempt = lambda seq, orig=orig, method=method: (preempted.append((method, seq.seq_id)),
                                                                            orig(seq))
        try:
            outs.append(run(engine, requests_fn()))
            assert engine.allocator.num_free == engine.allocator.num_blocks
            stats.append(engine.status())
        finally:
            engine.stop()
    return outs, stats, preempted


def test_greedy_mixed_adapter_batch_is_identical_with_speculation(copy_dirs):
    """Every rank and the base model in one batch, a KV budget that forces preemption, prefix
    caching on: speculation changes no token, and no logprob by more than 1e-5."""
    per_block = 2 * COPY.layers * 4 * COPY.kv_heads * COPY.head_dim * 4
    (plain, spec), (_, st), preempted = run_both(copy_dirs, mixed_requests, kv_cache_bytes=40 * per_block)
    assert {m for m, _ in preempted} == {"none", "ngram"}, "the KV budget should force preemption"
    for rid, want in plain.items():
        got = spec[rid]
        assert got["error"] is None and got["finish"] == "length"
        assert got["tokens"] == want["tokens"], rid
        torch.testing.assert_close(torch.tensor(got["logprobs"]), torch.tensor(want["logprobs"]),
                                   atol=1e-5, rtol=0)
    assert max(max(sizes(o)) for o in spec.values()) > 1
    assert st.speculative_method == "ngram" and st.prefix_cache_hit_tokens > 0
    assert 0 < st.spec_accepted_tokens < st.spec_draft_tokens      # accepted and rejected drafts
    assert st.spec_emitted_tokens > st.spec_accepted_tokens
    assert st.spec_acceptance_rate == pytest.approx(st.spec_accepted_tokens / st.spec_draft_tokens)


def test_seeded_sampling_is_identical_with_speculation(copy_dirs):
    """One generator draw per emitted token, as without speculation: same seed, same tokens."""
    def requests():
        return [GenerationRequest(r.request_id, prompt_token_ids=r.prompt_token_ids, adapter_id=r.adapter_id,
                                  sampling=SamplingOptions(max_new_tokens=16, ignore_eos=True, temperature=0.9,
                                                           top_k=50, top_p=0.95, repetition_penalty=1.1,
                                                           seed=100 + i))
                for i, r in enumerate(mixed_requests())]
    (plain, spec), (_, st), _ = run_both(copy_dirs, requests)
    for rid, want in plain.items():
        assert spec[rid]["tokens"] == want["tokens"], rid
    assert st.spec_accepted_tokens > 0


def test_stop_string_inside_an_accepted_draft(copy_dirs):
    doc = documents(1, 7)[0]
    prompt = doc + [3] + doc[:2]
    engine = make_engine(copy_dirs, "ngram")
    tok = engine.tokenizer
    try:
        free = run(engine, [GenerationRequest("free", prompt_token_ids=prompt,
                                              sampling=SamplingOptions(max_new_tokens=20, ignore_eos=True))])
        tokens, events = free["free"]["tokens"], sizes(free["free"])
        # a token in the middle of a multi-token event whose text first appears there
        ends = [sum(events[:i + 1]) for i in range(len(events))]
        j, stop = None, None
        for cand in range(2, len(tokens) - 1):
            if cand + 1 in ends:
                continue
            before, upto = tok.decode(tokens[:cand]), tok.decode(tokens[:cand + 1])
            piece = upto[len(before):]
            if len(piece.strip()) >= 2 and upto.find(piece) == len(before):
                j, stop = cand, piece
                break
        assert j is not None, "no token in a multi-token event with a unique text"
        outs = []
        for method in ("ngram", "none"):
            e = engine if method == "ngram" else make_engine(copy_dirs, "none")
            req = GenerationRequest(f"stop-{method}", prompt_token_ids=prompt,
                                    sampling=SamplingOptions(max_new_tokens=20, ignore_eos=True, stop=(stop,)))
            try:
                outs.append(run(e, [req])[req.request_id])
            finally:
                if e is not engine:
                    e.stop()
    finally:
        engine.stop()
    spec, plain = outs
    assert spec["finish"] == plain["finish"] == "stop"
    assert spec["tokens"] == plain["tokens"] == tokens[:j + 1]   # the draft's tokens after it dropped
    assert spec["text"] == plain["text"] == tok.decode(tokens[:j])
    assert sizes(spec)[-1] > 1


def test_finishing_inside_a_draft_and_per_position_options(copy_dirs):
    """max_new_tokens, a stop token id and EOS landing inside a draft, min_new_tokens masking a stop
    token the draft proposes, penalties and top_logprobs: all as without speculation (tokens,
    logprobs, alternatives, finish reason, text), and the KV blocks all given back."""
    doc = documents(1, 11)[0]
    prompt = doc + [3] + doc[:2]
    engine = make_engine(copy_dirs, "ngram")
    try:
        eos = min(engine.eos_token_ids)
        free = run(engine, [GenerationRequest("free", prompt_token_ids=prompt, sampling=SamplingOptions(
            max_new_tokens=16, ignore_eos=True))])["free"]["tokens"]
        assert free == doc[2:18]                   # the model quotes the document
        with_eos = doc[:8] + [eos] + doc[9:]
        eos_prompt = with_eos + [3] + with_eos[:2]
        S = SamplingOptions
        cases = {f"len{m}": (prompt, S(max_new_tokens=m, ignore_eos=True)) for m in (1, 2, 3, 6, 7)}
        cases |= {
            "stop_id": (prompt, S(max_new_tokens=16, stop_token_ids=(free[6],))),
            "eos": (eos_prompt, S(max_new_tokens=16)),
            "min_new": (prompt, S(max_new_tokens=16, stop_token_ids=(free[1], free[7]), min_new_tokens=4)),
            "penalties": (prompt, S(max_new_tokens=12, ignore_eos=True, presence_penalty=0.5,
                                    frequency_penalty=0.3, repetition_penalty=1.2, top_logprobs=3)),
        }
        reqs = lambda: [GenerationRequest(k, prompt_token_ids=p, sampling=o)  # noqa: E731
                        for k, (p, o) in cases.items()]
        spec = run(engine, reqs())
        drafted = engine.status().spec_draft_tokens
        assert engine.allocator.num_free == engine.allocator.num_blocks
    finally:
        engine.stop()
    plain_engine = make_engine(copy_dirs, "none")
    try:
        plain = run(plain_engine, reqs())
    finally:
        plain_engine.stop()
    assert drafted > 0
    for k, want in plain.items():
        got = spec[k]
        assert (got["tokens"], got["finish"], got["text"]) == (want["tokens"], want["finish"], want["text"]), k
        torch.testing.assert_close(torch.tensor(got["logprobs"]), torch.tensor(want["logprobs"]),
                                   atol=1e-5, rtol=0)
        assert [t[0] for t in got["tops"]] == [t[0] for t in want["tops"]], k
    assert [len(spec[f"len{m}"]["tokens"]) for m in (1, 2, 3, 6, 7)] == [1, 2, 3, 6, 7]
    assert spec["stop_id"]["finish"] == "stop" and spec["stop_id"]["tokens"] == free[:7]
    assert spec["eos"]["finish"] == "eos" and spec["eos"]["tokens"] == with_eos[2:9]
    got = spec["min_new"]["tokens"]              # free[1], proposed by the draft, is masked (too early)
    assert got[:1] == free[:1] and got[1] != free[1] and len(got) >= 4
    assert len(spec["penalties"]["tops"]) == 12
    assert max(sizes(spec["len7"])) > 1 and max(sizes(spec["eos"])) > 1


def test_per_request_opt_out_and_metrics(copy_dirs):
    doc = documents(1, 9)[0]
    engine = make_engine(copy_dirs, "ngram")
    try:
        reqs = [GenerationRequest(f"o{flag}", prompt_token_ids=doc + [3] + doc[:2],
                                  sampling=SamplingOptions(max_new_tokens=12, ignore_eos=True, speculative=flag))
                for flag in (False, True)]
        off = run(engine, reqs[:1])["oFalse"]
        assert engine.status().spec_draft_tokens == 0 and max(sizes(off)) == 1
        on = run(engine, reqs[1:])["oTrue"]
        assert on["tokens"] == off["tokens"] and max(sizes(on)) > 1
        st = engine.status()
        metrics = generate_latest(ExecutorMetrics(engine).registry).decode()
    finally:
        engine.stop()
    for name, value in (("num_draft_tokens", st.spec_draft_tokens),
                        ("num_accepted_tokens", st.spec_accepted_tokens),
                        ("num_emitted_tokens", st.spec_emitted_tokens)):
        assert f"vllm:spec_decode_{name}_total {float(value)}" in metrics
    assert st.spec_draft_tokens > 0


def test_config_checks_the_speculative_flags():
    from services.common.config import ConfigError
    with pytest.raises(ConfigError, match="prompt_lookup_min|prompt-lookup-min"):
        ExecutorConfig(base_model="x", prompt_lookup_min=4, prompt_lookup_max=2)
    with pytest.raises(ConfigError, match="speculative"):
        ExecutorConfig(base_model="x", speculative_method="eagle")


def test_grpc_sampling_params_speculative_and_status(copy_dirs):
    """Over the real servicer: SamplingParams.speculative = false turns drafting off for that
    request (unset: on), the output is the same, and GetStatus carries the spec_* counts."""
    import asyncio

    import grpc

    from services.common.config import ServerConfig
    from services.common.gen.openlora.v1 import common_pb2, executor_pb2, executor_pb2_grpc
    from services.common.server import Service, create_server
    from services.executor.servicer import ExecutorServicer

    doc = documents(1, 13)[0]
    engine = make_engine(copy_dirs, "ngram")
    engine.start()

    async def scenario():
        server, port = await create_server(
            ServerConfig(port=0), [Service("openlora.v1.Executor", ExecutorServicer(engine, "x"),
                                           executor_pb2_grpc.add_ExecutorServicer_to_server)])
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                stub, outs, drafted = executor_pb2_grpc.ExecutorStub(ch), [], []
                for spec in (False, None):
                    sp = common_pb2.SamplingParams(max_new_tokens=12, ignore_eos=True)
                    if spec is not None:
                        sp.speculative = spec
                    outs.append(await stub.Generate(common_pb2.GenerateRequest(
                        prompt_token_ids=doc + [3] + doc[:2], sampling=sp), timeout=120))
                    drafted.append(await stub.GetStatus(executor_pb2.GetStatusRequest(), timeout=30))
                return outs, drafted
        finally:
            await server.stop(0)

    try:
        (off, on), (st_off, st_on) = asyncio.run(scenario())
    finally:
        engine.stop()
    assert list(off.token_ids) == list(on.token_ids) == doc[2:14]
    assert st_off.speculative_method == "ngram" and st_off.spec_draft_tokens == 0
    assert st_on.spec_draft_tokens > 0 and st_on.spec_accepted_tokens > 0
    assert st_on.spec_emitted_tokens >= st_on.spec_accepted_tokens + 1
    assert st_on.spec_acceptance_rate == pytest.approx(st_on.spec_accepted_tokens / st_on.spec_draft_tokens)


@pytest.mark.parametrize("window", [
    dict(arch="mistral", sliding_window=8),
    dict(arch="qwen2", sliding_window=8, max_window_layers=1),
], ids=["mistral-window", "qwen2-some-layers-windowed"])
def test_sliding_windows_are_kept_by_each_verified_position(tmp_path, window):
    """The copying model with sliding windows (every layer; only the layers from 1 on): prompts
    that loop with a period shorter than the window, so drafts are accepted and each verified
    position must attend within its own window: greedy output and logprobs as plain decoding."""
    spec = ModelSpec(**{**COPY.__dict__, **window})
    model = write_copy_model(tmp_path / "m", spec, noise=0.05)
    g = torch.Generator().manual_seed(3)
    loops = [torch.randint(2, spec.vocab, (3 + i,), generator=g).tolist() for i in range(3)]
    prompts = [(loop * 8)[:13 + i] for i, loop in enumerate(loops)]
    outs, accepted = [], 0
    for method in ("none", "ngram"):
        engine = Engine(ExecutorConfig(base_model=str(model), device="cpu", dtype="float32", kv_block_size=4,
                                       speculative_method=method, num_speculative_tokens=4,
                                       prompt_lookup_min=1, prompt_lookup_max=3), LocalDirSource(tmp_path))
        try:
            outs.append(run(engine, [GenerationRequest(f"w{i}", prompt_token_ids=p, sampling=SamplingOptions(
                max_new_tokens=24, ignore_eos=True)) for i, p in enumerate(prompts)]))
            accepted = engine.status().spec_accepted_tokens
        finally:
            engine.stop()
    plain, spec_out = outs
    assert accepted > 0
    for rid, want in plain.items():
        assert spec_out[rid]["tokens"] == want["tokens"], rid
        torch.testing.assert_close(torch.tensor(spec_out[rid]["logprobs"]), torch.tensor(want["logprobs"]),
                                   atol=1e-5, rtol=0)
