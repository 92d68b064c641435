"""The Executor gRPC service: protobuf <-> engine types, and engine events -> replies/chunks.

Thin by design: validation lives in the engine, errors are mapped by services.common.errors, and
the engine runs on its own thread; events cross to this event loop with call_soon_threadsafe.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator

import structlog

from services.common import auth, errors
from services.common.gen.openlora.v1 import common_pb2, executor_pb2, executor_pb2_grpc
from services.common.logging import bind_request
from services.common.streams import StreamsHub
from services.executor.adapters.merge import MergeSpec
from services.executor.engine import Engine, GenerationRequest, SamplingOptions, TokenEvent
from services.executor.structured import StructuredOutput

log = structlog.get_logger(__name__)

FINISH = {"length": common_pb2.FINISH_REASON_LENGTH, "stop": common_pb2.FINISH_REASON_STOP,
          "eos": common_pb2.FINISH_REASON_EOS, None: common_pb2.FINISH_REASON_UNSPECIFIED}
TIERS = {"device": executor_pb2.ADAPTER_TIER_DEVICE, "host": executor_pb2.ADAPTER_TIER_HOST,
         "disk": executor_pb2.ADAPTER_TIER_DISK}


def to_request(pb: common_pb2.GenerateRequest) -> GenerationRequest:
    s = pb.sampling
    merged = _merged(pb)
    return GenerationRequest(
        request_id=pb.request_id or uuid.uuid4().hex,
        prompt=pb.prompt,
        prompt_token_ids=list(pb.prompt_token_ids),
        adapter_id=merged.derived_id if merged else pb.adapter_id,
        adapter_version=1 if merged else pb.adapter_version,
        merged=merged,
        sampling=SamplingOptions(
            max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
            top_k=s.top_k, seed=s.seed if s.HasField("seed") else None, stop=tuple(s.stop),
            ignore_eos=s.ignore_eos, repetition_penalty=s.repetition_penalty,
            stop_token_ids=tuple(s.stop_token_ids), min_new_tokens=s.min_new_tokens,
            presence_penalty=s.presence_penalty, frequency_penalty=s.frequency_penalty,
            top_logprobs=s.top_logprobs,
            prompt_logprobs=s.prompt_logprobs if s.HasField("prompt_logprobs") else None,
            speculative=s.speculative if s.HasField("speculative") else True,
            structured=_structured(s)))


def _merged(pb: common_pb2.GenerateRequest) -> MergeSpec | None:
    if not pb.HasField("merged_adapters"):
        return None
    if pb.adapter_id:
        raise errors.InvalidArgument("adapter_id and merged_adapters are exclusive: name the adapters "
                                     "in merged_adapters.ids")
    m = pb.merged_adapters
    return MergeSpec.parse(m.ids, m.weights, m.combination_type, m.density, m.majority_sign_method)


def _structured(s: common_pb2.SamplingParams) -> StructuredOutput | None:
    kind = s.structured_output.WhichOneof("kind") if s.HasField("structured_output") else None
    if kind is None:
        return None
    if kind == "choice":
        return StructuredOutput("choice", tuple(s.structured_output.choice.choices))
    return StructuredOutput(kind, "" if kind == "json_object" else getattr(s.structured_output, kind))


def _tops(ev: TokenEvent) -> list[common_pb2.TopLogprobs]:
    return [common_pb2.TopLogprobs(token_ids=ids, logprobs=lps) for ids, lps in ev.top_logprobs]


def _prompt(ev: TokenEvent) -> list[common_pb2.PromptLogprob]:
    return [common_pb2.PromptLogprob(token_id=t, logprob=lp, top=None if top is None else
                                     common_pb2.TopLogprobs(token_ids=top[0], logprobs=top[1]))
            for t, lp, top in ev.prompt_logprobs or ()]


def _usage(ev: TokenEvent) -> common_pb2.Usage:
    return common_pb2.Usage(prompt_tokens=ev.prompt_tokens, completion_tokens=ev.completion_tokens)


def _observe_tokens(m, adapter_id: str, t0: float, last: float | None, n: int) -> float:
    """Record TTFT for a request's first tokens, ITL (split evenly) for later ones; returns now."""
    now = time.perf_counter()
    if last is None:
        m.observe_ttft(now - t0)
        m.first_token(adapter_id)
        n -= 1
        last = now
    for _ in range(n):
        m.observe_itl((now - last) / n)
    return now


class ExecutorServicer(executor_pb2_grpc.ExecutorServicer):
    def __init__(self, engine: Engine | None, executor_id: str, host_cache_bytes: int = 0,
                 metrics=None, adapters=None):
        self._engine = engine
        # services.router.registry_check.AdapterCheck: asks the registry, with the caller's own
        # token, whether another tenant's adapter is public (None: never, for tenants)
        self.adapters = adapters
        self.executor_id = executor_id
        self.host_cache_bytes = host_cache_bytes
        self.metrics = metrics   # services.executor.metrics.ExecutorMetrics, or None
        self.streams = StreamsHub(f"/{auth.EXECUTOR}/GenerateStream")   # GenerateStreams calls
        self.drain = self.streams.drain   # on SIGTERM: those calls end when their requests have

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise errors.Unavailable("executor is still loading its model; retry when its health "
                                     "check answers SERVING")
        return self._engine

    @engine.setter
    def engine(self, engine: Engine) -> None:
        self._engine = engine

    async def _events(self, req: GenerationRequest) -> AsyncIterator[TokenEvent]:
        """Submit `req` and yield its events; a caller that stops early cancels the request."""
        bind_request(req.request_id, adapter_id=req.adapter_id)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[TokenEvent] = asyncio.Queue()

        def sink(ev: TokenEvent) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, ev)
            except RuntimeError:  # the loop is gone: the call ended
                pass

        spec = req.sampling.structured        # compiled off the event loop, then cached by spec: a cached
        if spec is not None and not self.engine.grammars.cached(spec):   # one costs no thread hop, so
            await asyncio.to_thread(self.engine.grammars.compile, spec)  # it reaches the batch with its peers
        self.engine.submit(req, sink)
        m, t0 = self.metrics, time.perf_counter()
        last = None      # when the previous token came (None: none yet)
        if m is not None:
            m.request_started(req.adapter_id)
        done = False
        try:
            while True:
                ev = await queue.get()
                if ev.error is not None:
                    done = True
                    raise ev.error
                if m is not None and ev.token_ids:
                    last = _observe_tokens(m, req.adapter_id, t0, last, len(ev.token_ids))
                yield ev
                if ev.finish_reason is not None:
                    done = True
                    if m is not None:
                        m.observe_e2e(time.perf_counter() - t0)
                    return
        finally:
            if m is not None:
                m.request_finished(req.adapter_id, started=last is not None)
            if not done:
                log.info("request_cancelled", request_id=req.request_id)
                self.engine.cancel(req.request_id)

    async def _may_use_all(self, request) -> None:
        """_may_use for the request's adapter, or each adapter it combines (merged_adapters)."""
        await self._may_use(request.adapter_id, request.adapter_version)
        for raw in request.merged_adapters.ids if request.HasField("merged_adapters") else ():
            name, _, ver = raw.partition("@")
            await self._may_use(name, int(ver) if ver.isdigit() else 0)

    async def _may_use(self, adapter_id: str, version: int = 0) -> None:
        """The caller's own adapter, or another tenant's the registry shows it (public); else
        NOT_FOUND, as for an unknown id."""
        if auth.owns_checked(adapter_id):
            return
        if self.adapters is None:
            raise auth.not_found(adapter_id)
        await self.adapters.check(adapter_id, version, strict=True)

    async def Generate(self, request, context):
        await self._may_use_all(request)
        req = to_request(request)
        ids, lps, text, tops, prompt, last = [], [], [], [], [], None
        async with contextlib.aclosing(self._events(req)) as events:
            async for ev in events:
                if ev.prompt_logprobs is not None:
                    prompt = _prompt(ev)
                ids += ev.token_ids
                lps += ev.logprobs
                text.append(ev.text)
                tops += _tops(ev)
                last = ev
        return common_pb2.GenerateResponse(
            request_id=req.request_id, text="".join(text), token_ids=ids, logprobs=lps,
            finish_reason=FINISH[last.finish_reason], usage=_usage(last),
            executor_id=self.executor_id, top_logprobs=tops, prompt_logprobs=prompt)

    async def GenerateStream(self, request, context):
        await self._may_use_all(request)
        req = to_request(request)
        async with contextlib.aclosing(self._events(req)) as events:
            async for ev in events:
                final = ev.finish_reason is not None
                yield common_pb2.GenerateChunk(
                    request_id=req.request_id, token_ids=ev.token_ids, text=ev.text,
                    logprobs=ev.logprobs, finish_reason=FINISH[ev.finish_reason],
                    usage=_usage(ev) if final else None, executor_id=self.executor_id,
                    top_logprobs=_tops(ev), prompt_logprobs=_prompt(ev))

    async def GenerateStreams(self, request_iterator, context):
        """Many GenerateStream requests over one call (a router's), answered once per engine step
        (services.common.streams)."""
        async for response in self.streams.serve(request_iterator,
                                                 lambda request: self.GenerateStream(request, context)):
            yield response

    async def LoadAdapter(self, request, context):
        await self._may_use(request.adapter_id, request.version)
        start = time.perf_counter()
        tier = {executor_pb2.ADAPTER_TIER_DISK: "disk",
                executor_pb2.ADAPTER_TIER_HOST: "host"}.get(request.tier, "device")
        _, reached = await asyncio.to_thread(self.engine.load_adapter, request.adapter_id,
                                             request.version, tier)
        return executor_pb2.LoadAdapterResponse(
            tier=TIERS[reached], load_ms=(time.perf_counter() - start) * 1e3)

    async def UnloadAdapter(self, request, context):
        if not auth.owns_checked(request.adapter_id):
            await self._may_use(request.adapter_id)          # NOT_FOUND unless public
            raise auth.not_yours(request.adapter_id)         # public: others may use, not unload
        await asyncio.to_thread(self.engine.unload_adapter, request.adapter_id)
        return executor_pb2.UnloadAdapterResponse()

    async def GetStatus(self, request, context):
        st = self.engine.status()
        return executor_pb2.ExecutorStatus(
            executor_id=self.executor_id, base_model=self.engine.model_name, device=st.device,
            dtype=st.dtype, running_requests=st.running, waiting_requests=st.waiting,
            max_batch_size=st.max_batch_size, kv_blocks_total=st.kv_blocks_total,
            kv_blocks_free=st.kv_blocks_free, device_adapter_slots=st.device_adapter_slots,
            host_cache_bytes=st.host_cache_bytes, host_cache_used_bytes=st.host_cache_used_bytes,
            device_cache_bytes=st.device_cache_bytes,
            device_cache_used_bytes=st.device_cache_used_bytes,
            unified_kv_adapter_pool=st.unified_kv_adapter_pool, lora_dtype=st.lora_dtype,
            tier_stats=[executor_pb2.TierStats(
                tier=TIERS[t.tier], adapters=t.adapters, bytes_used=t.bytes_used,
                bytes_capacity=t.bytes_capacity, hits=t.hits, misses=t.misses, loads=t.loads,
                evictions=t.evictions) for t in st.tier_stats],
            kv_blocks_cached=st.kv_blocks_cached, prefix_cache_hit_tokens=st.prefix_cache_hit_tokens,
            prefill_tokens_computed=st.prefill_tokens_computed,
            speculative_method=st.speculative_method, spec_draft_tokens=st.spec_draft_tokens,
            spec_accepted_tokens=st.spec_accepted_tokens, spec_emitted_tokens=st.spec_emitted_tokens,
            spec_acceptance_rate=st.spec_acceptance_rate,
            max_model_len=self.engine.max_model_len,
            quantization=st.quantization, base_weight_bytes=st.base_weight_bytes,
            adapters=[executor_pb2.AdapterResidency(adapter_id=a.adapter_id, version=a.version,
                                                    tier=TIERS.get(a.tier, 0),
                                                    active_requests=a.active_requests)
                      for a in st.adapters if auth.current().owns(a.adapter_id)])
