"""The inference engine: one dedicated thread running continuous-batching steps.

    engine = Engine(config, adapter_source); engine.start()
    engine.submit(GenerationRequest("r1", prompt="hi", sampling=SamplingOptions()), on_event)
    # on_event(TokenEvent) is called from the engine thread once per step, the last with finish_reason
    engine.stop()

Each turn of the loop: intake (new requests, cancels; adapter intake in intake.py admits those whose
adapter is pinned) -> step(): schedule (scheduler.py) -> run the model over every scheduled sequence,
prefill chunks, decode tokens and speculative drafts together, sorted by adapter placement
(model_runner.py) -> sample (verifying drafts) -> advance the sequences (rolling back rejected draft
positions) -> emit: stop conditions, events (output.py). An error in one request's processing fails
only that request; an error in the forward pass fails that step's requests and the engine goes on.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

import structlog
import torch

from services.common.errors import Cancelled, InvalidArgument, QueueFull, Unavailable
from services.common.memory import tune_malloc
from services.common.peft_format import check_adapter_id
from services.executor import ops, prompt_logprobs, structured
from services.executor.adapters.arena import ArenaLayout, HostArena
from services.executor.adapters.device import DevicePool
from services.executor.adapters.forms import BaseWeights, num_projections
from services.executor.adapters.merge import CombiningResidency, MergedSource
from services.executor.adapters.residency import Residency
from services.executor.adapters.source import AdapterSource
from services.executor.config import ExecutorConfig
from services.executor.engine_types import (
    AdapterResidency,
    EngineStatus,
    GenerationRequest,
    InternalError,
    RequestState,
    TierStat,
    TokenEvent,
    new_request_state,
)
from services.executor.intake import AdapterIntake
from services.executor.kv_cache import (
    KVBlockAllocator,
    KVCache,
    auto_num_blocks,
    blocks_needed,
    unified_pool,
)
from services.executor.model.loader import (
    load_model,
    read_config,
    resolve_device,
    resolve_dtype,
    resolve_lora_dtype,
    resolve_model_dir,
)
from services.executor.model.quant import base_weight_bytes
from services.executor.model_runner import ModelRunner
from services.executor.output import OutputProcessor, deliver
from services.executor.sampler import SamplingOptions
from services.executor.scheduler import Batch, Scheduler
from services.executor.spec_decode import Speculator
from services.executor.structured import GrammarCache
from services.executor.tokenizer import Tokenizer

log = structlog.get_logger(__name__)

__all__ = ["Engine", "EngineStatus", "AdapterResidency", "GenerationRequest", "SamplingOptions",
           "TierStat", "TokenEvent"]


class Engine:
    def __init__(self, config: ExecutorConfig, adapter_source: AdapterSource):
        self.config = config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.lora_dtype = resolve_lora_dtype(config.lora_dtype, self.dtype)   # the adapter pages'
        tune_malloc()   # activations are MiB-sized: keep freed ones for reuse (see memory.py)
        self.kernel_backend = ops.load(config)
        path = resolve_model_dir(config.base_model)
        _, cfg = read_config(path)
        max_len = config.max_model_len or cfg.max_positions
        block = config.kv_block_size
        self.model, self.model_config, self.model_path = load_model(
            str(path), self.device, self.dtype, max_len, config.quantization, config.quantization_group_size)
        self.base_weight_bytes = base_weight_bytes(self.model)
        log.info("base_model_loaded", quantization=self.model.quantization, bytes=self.base_weight_bytes)
        if config.prepack_weights:
            packed = self.model.prepack()
            if packed:
                log.info("weights_prepacked", bytes=packed)
        # one paged layout on both devices: the host arena (pinned on CUDA) and, where the kernel
        # reads device memory or --device-cache-bytes asks for one, a device page pool filled from it
        layout = ArenaLayout.for_model(cfg, config.arena_page_elems)
        for layer, module, proj in self.model.lora_targets():   # projections and MoE experts
            proj.lm = layout.lm(layer, module)
        device_bytes = device_cache_bytes(config, self.device)
        unified = config.unified_kv_adapter_pool
        # the kernel's pool (the device pool, else the arena) is built after the KV cache when it
        # shares the KV's memory (--unified-kv-adapter-pool)
        self.arena = None if unified and not device_bytes else HostArena(
            layout, config.host_cache_bytes, self.lora_dtype, pin=self.device.type == "cuda")
        self.device_pool = DevicePool(layout, device_bytes, self.lora_dtype, self.device) \
            if device_bytes and not unified else None
        num_blocks = auto_num_blocks(      # after weights and pools: CUDA sizes from what is free
            config.kv_cache_bytes, layers=cfg.layers, block_size=block, kv_heads=cfg.kv_heads,
            head_dim=cfg.head_dim, dtype=self.dtype, device=self.device,
            max_batch_size=config.max_batch_size, max_model_len=max_len)
        if num_blocks * block < max_len:
            log.warning("max_model_len_reduced", max_model_len=max_len, kv_tokens=num_blocks * block)
            max_len = num_blocks * block
        self.max_model_len = max_len
        self._tokenizer = Tokenizer.from_dir(path, self.model_config.eos_token_ids)
        tokenizer_file = path / "tokenizer.json"
        eos = self.model_config.eos_token_ids or (self._tokenizer.eos_token_ids if self._tokenizer else ())
        eos_token_ids = frozenset(eos)
        self.steps = 0                  # non-empty steps run, and their wall time (status, metrics)
        self.step_seconds = 0.0
        self.grammars = GrammarCache(tokenizer_file.read_text() if tokenizer_file.is_file() else None,
                                     self.model_config.vocab, eos_token_ids, config.structured_output_cache)
        self.allocator = KVBlockAllocator(num_blocks)
        kv_buffer = None
        if unified:
            own = (device_bytes or config.host_cache_bytes) // (layout.page_elems * self.lora_dtype.itemsize)
            lender, pages, kv_buffer = unified_pool(
                self.allocator, layers=cfg.layers, block_size=block, kv_heads=cfg.kv_heads,
                head_dim=cfg.head_dim, dtype=self.dtype, device=self.device,
                page_elems=layout.page_elems, own_pages=own, reserve=blocks_needed(max_len, block),
                page_dtype=self.lora_dtype)
            if device_bytes:
                self.device_pool = DevicePool(layout, device_bytes, self.lora_dtype, self.device,
                                              pages=pages, lender=lender)
            else:
                self.arena = HostArena(layout, config.host_cache_bytes, self.lora_dtype, pages=pages,
                                       lender=lender)
        self.arena.base = BaseWeights(self.model, tag=str(path))   # DoRA norms are taken against it
        self.kv = KVCache(layers=cfg.layers, num_blocks=num_blocks, block_size=block,
                          kv_heads=cfg.kv_heads, head_dim=cfg.head_dim, dtype=self.dtype,
                          device=self.device, buffer=kv_buffer)
        self.speculator = None if config.speculative_method == "none" else Speculator(
            config.num_speculative_tokens, config.prompt_lookup_min, config.prompt_lookup_max,
            min_acceptance=config.speculative_min_acceptance,
            disable_by_batch_size=config.speculative_disable_by_batch_size,
            max_batch_tokens=config.speculative_max_batch_tokens)
        self.scheduler = Scheduler(self.allocator, block, config.max_batch_size,
                                   config.max_prefill_tokens, config.enable_prefix_caching,
                                   self.speculator)
        self.source = adapter_source
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self.merged = MergedSource(adapter_source, cfg, config.max_lora_rank)   # merged_adapters
        self.adapters = Residency(self.arena, self.merged, cfg, config.max_lora_rank,
                                  device=self.device_pool,
                                  max_device_adapters=config.max_device_adapters,
                                  policy=config.adapter_eviction_policy,
                                  latest_ttl_s=config.adapter_latest_ttl_s,
                                  workers=config.adapter_load_workers, wait_s=config.adapter_wait_s,
                                  on_load=self._on_adapter_load,
                                  write_back=config.disk_write_back,
                                  write_back_queue=config.disk_write_back_queue)
        # cat requests read their adapters' own pages in the batch (merge.CombiningResidency)
        self.adapters = CombiningResidency(self.adapters, self.merged, num_projections(layout))
        if unified:   # KV demand takes back lent blocks from cold adapters before preempting
            self.scheduler.reclaim = lambda n: self.adapters.reclaim(
                n, lambda: self.allocator.num_free) >= 0 and self.allocator.can_allocate(n)
        self.runner = ModelRunner(self.model, self.model_config, self.kv, self.device,
                                  self.adapters.kernel_pool,
                                  config.max_prefill_tokens + config.max_batch_size,
                                  config.max_batch_size)
        self.outputs = OutputProcessor(eos_token_ids, max_len, self._finish)
        self.intake = AdapterIntake(self.adapters, self.scheduler, self._wake.set, self._finish)
        self.adapter_load_observer = None   # set by the metrics: (source tier, seconds) per load
        self._inbox: deque[RequestState] = deque()
        self._cancels: deque[str] = deque()
        self._active: dict[str, RequestState] = {}   # every request not yet finished
        self._waiting_count = 0
        self._thread: threading.Thread | None = None
        self._stopping = False
        log.info("engine_ready", model=config.base_model, arch=cfg.arch, device=str(self.device),
                 dtype=str(self.dtype), lora_dtype=str(self.lora_dtype), kv_blocks=num_blocks, block_size=block,
                 max_model_len=max_len, kernel=self.kernel_backend)

    # -- public API ----------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Tokenizer | None:
        return self._tokenizer

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self.outputs.eos_token_ids

    @eos_token_ids.setter
    def eos_token_ids(self, ids: frozenset[int]) -> None:
        self.outputs.eos_token_ids = ids

    @property
    def model_name(self) -> str:
        return self.config.base_model

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stops the loop; requests still in flight get a final event with error=Unavailable."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._fail_all(Unavailable("the executor is shutting down"))
        self.adapters.close()

    def submit(self, req: GenerationRequest, on_event: Callable[[TokenEvent], None]) -> None:
        """Validate (raising InvalidArgument / QueueFull) and queue; thread-safe."""
        if self._stopping:
            raise Unavailable("the executor is shutting down")
        r = new_request_state(req, on_event, tokenizer=self._tokenizer, vocab=self.model_config.vocab,
                              max_model_len=self.max_model_len,
                              default_max_new_tokens=self.config.default_max_new_tokens,
                              eos_token_ids=self.eos_token_ids, device=self.device)
        if req.merged is not None:                  # its derived adapter is built from this recipe
            self.merged.register(req.merged)
        if req.sampling.structured is not None:    # compiled once per spec (cached), copied per request
            r.row.grammar = self.grammars.new(req.sampling.structured)
        elif self.speculator is not None and req.sampling.speculative:
            r.seq.spec = self.speculator.new_state(min(r.seq.prompt_len + r.max_new, self.max_model_len))
        with self._lock:
            if req.request_id in self._active:
                raise InvalidArgument(f"request_id {req.request_id!r} is already in flight")
            if len(self._inbox) + self._waiting_count >= self.config.max_queue:
                raise QueueFull(f"{self.config.max_queue} requests are already waiting; retry later")
            self._active[req.request_id] = r
            self._inbox.append(r)
        self._wake.set()

    def cancel(self, request_id: str) -> None:
        """Frees the request's KV blocks at the next step boundary; its last event has error=Cancelled."""
        with self._lock:
            self._cancels.append(request_id)
        self._wake.set()

    def load_adapter(self, adapter_id: str, version: int = 0, tier: str = "device") -> tuple[int, str]:
        """Blocking load of an adapter into `tier` ("device", "host" or "disk") -> (version, tier
        reached). Without a device tier (CPU) the host arena is what the kernel reads: "device"
        reaches "host"."""
        check_adapter_id(adapter_id)
        if tier == "disk":
            return self.source.resolve(adapter_id, version).version, "disk"
        timeout = self.config.load_adapter_timeout_s or 4 * self.config.registry_timeout_s
        to_device = tier == "device" and self.device_pool is not None
        lease = self.adapters.preload(adapter_id, version, timeout=timeout, device=to_device)
        return lease.version, "device" if to_device else "host"

    def unload_adapter(self, adapter_id: str, version: int = 0) -> None:
        """Drop adapter_id's `version` (0: every version) from every tier, its disk copy included
        (copies in use are freed when their requests end)."""
        check_adapter_id(adapter_id)
        self.adapters.unload(adapter_id, version)
        self.source.forget(adapter_id, version)

    def _on_adapter_load(self, source_tier: str, seconds: float) -> None:
        observer = self.adapter_load_observer
        if observer is not None:
            try:
                observer(source_tier, seconds)
            except Exception:
                log.exception("adapter_load_observer_failed")

    def adapter_changed(self, adapter_id: str, version: int, latest_version: int,
                        deleted: bool) -> None:
        """A registry change (AdapterRegistry.WatchAdapters); thread-safe.

        deleted: that version (0: every version) leaves every tier at once, its pages and disk copy
        freed (copies in use go when their requests end). Otherwise a new version exists: "latest"
        resolves to `latest_version` at once, and older versions go first when a tier needs room.
        """
        for derived in self.merged.derived_of(adapter_id):   # combinations of it are rebuilt
            self.adapters.unload(derived, 0)
        if deleted:
            self.unload_adapter(adapter_id, version)
            if version and latest_version:    # one version went: "latest" may now be an older one
                self.adapters.set_latest(adapter_id, latest_version)
        else:
            self.adapters.set_latest(adapter_id, latest_version)

    def status(self) -> EngineStatus:
        with self._lock:
            running, waiting = len(self.scheduler.running), len(self._inbox) + self._waiting_count
        dev = self.device_pool
        return EngineStatus(
            running=running, waiting=waiting, max_batch_size=self.config.max_batch_size,
            kv_blocks_total=self.allocator.num_blocks, kv_blocks_free=self.allocator.num_free,
            device=str(self.device), dtype=str(self.dtype).removeprefix("torch."),
            device_adapter_slots=self.config.max_device_adapters if dev is not None else 0,
            adapters=self._residency(), kv_blocks_cached=self.allocator.num_cached,
            prefix_cache_hit_tokens=self.scheduler.prefix_hit_tokens,
            prefill_tokens_computed=self.scheduler.prefill_tokens,
            tier_stats=self._tier_stats(),
            host_cache_bytes=self.arena.capacity_bytes, host_cache_used_bytes=self.arena.used_bytes,
            device_cache_bytes=dev.capacity_bytes if dev is not None else 0,
            device_cache_used_bytes=dev.used_bytes if dev is not None else 0,
            unified_kv_adapter_pool=self.config.unified_kv_adapter_pool,
            lora_dtype=str(self.lora_dtype).removeprefix("torch."),
            quantization=self.model.quantization, base_weight_bytes=self.base_weight_bytes,
            steps=self.steps, step_seconds=self.step_seconds,
            grammar_seconds=self.grammars.stats.seconds, grammar_rows=self.grammars.stats.rows,
            **self._spec_status())

    def _spec_status(self) -> dict:
        sp = self.speculator
        if sp is None:
            return {}
        return dict(speculative_method=self.config.speculative_method,
                    spec_draft_tokens=sp.draft_tokens, spec_accepted_tokens=sp.accepted_tokens,
                    spec_emitted_tokens=sp.emitted_tokens, spec_acceptance_rate=sp.acceptance_rate)

    def _residency(self) -> list[AdapterResidency]:
        held = [AdapterResidency(a, v, tier, n) for a, v, tier, n in self.adapters.placements()]
        seen = {(a.adapter_id, a.version) for a in held}
        return held + [AdapterResidency(a, v, "disk", 0) for a, v in self.source.held()
                       if (a, v) not in seen]

    def _tier_stats(self) -> list[TierStat]:
        disk = TierStat("disk", **(self.source.stats() if hasattr(self.source, "stats") else {}))
        return [TierStat("device", **self.adapters.device_stats()),
                TierStat("host", **self.adapters.host_stats()), disk]

    # -- the engine thread ---------------------------------------------------------------------
    def _run(self) -> None:
        with torch.inference_mode():
            while not self._stopping:
                try:
                    self._intake()
                    if not self.scheduler.has_work():
                        self._wake.wait(self.config.idle_poll_s)
                        self._wake.clear()
                        continue
                    self.step()
                except Exception:  # never let the loop die
                    log.exception("engine_loop_error")
                    time.sleep(self.config.error_backoff_s)

    def _intake(self) -> None:
        """New requests and cancels from other threads; requests whose adapter became ready."""
        with self._lock:
            new, self._inbox = list(self._inbox), deque()
            cancels, self._cancels = list(self._cancels), deque()
        for r in new:
            self.intake.admit(r)
        for request_id in cancels:
            r = self._active.get(request_id)
            if r is not None and not r.done:
                self._finish(r, None, Cancelled(f"request {request_id!r} was cancelled"))
        self.intake.poll()
        with self._lock:
            self._waiting_count = len(self.intake) + len(self.scheduler.waiting)

    def step(self) -> None:
        """One continuous-batching step: schedule -> run the model -> process the outputs."""
        started = time.perf_counter()
        batch = self.scheduler.schedule()
        self._log_preempted(batch)
        if not batch.items:
            self._wake.wait(self.config.empty_step_wait_s)
            return
        try:
            self._step(batch)
        finally:
            self.steps += 1
            self.step_seconds += time.perf_counter() - started

    def _step(self, batch: Batch) -> None:
        reqs = [self._active[item.seq.seq_id] for item in batch.items]
        spans = prompt_logprobs.prompt_spans(batch)
        grammar_rows = [r.row for r, item in zip(reqs, batch.items, strict=True)
                        if item.samples and r.row.grammar is not None]
        if grammar_rows and self.device.type == "cuda":   # masks computed while the GPU runs the step
            structured.prefetch(grammar_rows)   # (on CPU the worker thread only contends for the GIL)
        logits = self._run_model(batch, reqs, spans)
        if logits is None:
            return
        if spans:                       # the prompt rows come after the sampling rows
            rows = logits.shape[0] - sum(k for _, k in spans)
            prompt_logprobs.collect(logits[rows:], spans, batch, reqs)
            logits = logits[:rows]
        items = [item for item in batch.items if item.samples]
        sampled = [r for r, item in zip(reqs, batch.items, strict=True) if item.samples]
        outs = self.outputs.sample(logits, sampled, [item.draft for item in items])
        for item, out in zip(items, outs, strict=True):
            if item.draft and out is not None:     # verified: out = the accepted drafts + 1
                item.accepted = len(out[0]) - 1
                self.speculator.record(item.seq.spec, len(item.draft), item.accepted, len(out[0]))
        self.scheduler.advance(batch)
        for r in sampled:
            if r.seq.prompt_logits and not r.done:
                self._send_prompt_logprobs(r)
        self.outputs.emit(sampled, outs)

    def _send_prompt_logprobs(self, r: RequestState) -> None:
        """The event before the first token: every prompt token's logprob (prompt_logprobs.py)."""
        r.seq.prompt_logits = False         # sent once; a recompute after preemption needs no rows
        try:
            lps = prompt_logprobs.finished(r)
        except Exception as exc:
            log.exception("prompt_logprobs_failed", request_id=r.req.request_id)
            self._finish(r, None, InternalError(f"internal error in prompt logprobs: {exc}"))
            return
        r.prompt_lps = None
        deliver(r, TokenEvent(r.req.request_id, [], "", [], None, r.seq.prompt_len, 0,
                              prompt_logprobs=lps))

    def _run_model(self, batch: Batch, reqs: list[RequestState], spans=()) -> torch.Tensor | None:
        """The step's logits, or None when the forward pass failed (its requests fail with it)."""
        entries = [r.lease.entry if r.lease is not None else None for r in reqs]
        try:
            return self.runner.run(batch, entries, spans)
        except Exception as exc:
            log.exception("step_failed", requests=[r.req.request_id for r in reqs])
            for r in reqs:
                self._finish(r, None, InternalError(f"internal error in the forward pass: "
                                                    f"{type(exc).__name__}: {exc}"))
            return None

    def _log_preempted(self, batch: Batch) -> None:
        for seq in batch.preempted:
            log.info("sequence_preempted", request_id=seq.seq_id, tokens=seq.num_tokens,
                     kv_blocks_free=self.allocator.num_free)

    def _finish(self, r: RequestState, event: TokenEvent | None, error: Exception | None = None) -> None:
        """The request's last event; frees its KV blocks and adapter pin."""
        if r.done:
            return
        r.done = True
        self.scheduler.remove(r.seq)
        if r.lease is not None:
            self.adapters.release(r.lease)
            r.lease = None
            r.slot = None
        with self._lock:
            self._active.pop(r.req.request_id, None)
        if event is None:
            event = TokenEvent(r.req.request_id, [], "", [], None, r.seq.prompt_len, r.completion,
                               error=error)
        deliver(r, event)

    def _fail_all(self, error: Exception) -> None:
        with self._lock:
            left = list(self._active.values())
            self._inbox.clear()
        for r in left:
            if r.lease_future is not None and r.slot is None and not r.done:
                self.intake.release_when_ready(r)
            self._finish(r, None, error)


def device_cache_bytes(config: ExecutorConfig, device: torch.device) -> int:
    """The device pool's size: --device-cache-bytes; on CUDA 0 means the smaller of the host arena
    and a tenth of the free GPU memory (the kernel reads device memory there); on CPU 0 means none
    (the kernel reads the host arena in place)."""
    if config.device_cache_bytes or device.type == "cpu":
        return config.device_cache_bytes
    free, _ = torch.cuda.mem_get_info(device)
    return min(config.host_cache_bytes, free // 10)
