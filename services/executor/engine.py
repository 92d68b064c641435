"""The inference engine: one dedicated thread running continuous-batching steps.

    engine = Engine(config, adapter_source); engine.start()
    engine.submit(GenerationRequest("r1", prompt="hi", sampling=SamplingOptions()), on_event)
    # on_event(TokenEvent) is called from the engine thread once per step, the last with finish_reason
    engine.stop()

A step: admit requests whose adapter is resident -> schedule -> one forward pass over every scheduled
sequence (prefill chunks and decode tokens together, sorted by adapter slot) -> sample -> emit events.
An error in one request's processing fails only that request; an error in the forward pass fails
that step's requests and the engine goes on.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import structlog
import torch

from services.common.errors import Cancelled, InvalidArgument, OpenLoraError, QueueFull, Unavailable
from services.common.memory import tune_malloc
from services.common.peft_format import check_adapter_id
from services.executor import ops
from services.executor.adapters.arena import ArenaLayout, HostArena
from services.executor.adapters.cache import AdapterCache, AdapterSource
from services.executor.adapters.pool import AdapterPool
from services.executor.adapters.residency import Residency
from services.executor.config import ExecutorConfig
from services.executor.kv_cache import KVBlockAllocator, KVCache, auto_num_blocks
from services.executor.model.attention import AttnGroup, AttnMetadata, build_group
from services.executor.model.llama import ForwardBatch
from services.executor.model.loader import (
    load_model,
    read_config,
    resolve_device,
    resolve_dtype,
    resolve_model_dir,
)
from services.executor.sampler import (
    EOS,
    LENGTH,
    STOP,
    SamplingOptions,
    SamplingRow,
    StopText,
    Top,
    make_generator,
    sample_with_top,
)
from services.executor.scheduler import Batch, Scheduler, Sequence
from services.executor.tokenizer import Detokenizer, Tokenizer

log = structlog.get_logger(__name__)

__all__ = ["Engine", "EngineStatus", "AdapterResidency", "GenerationRequest", "SamplingOptions",
           "TokenEvent"]


@dataclass
class GenerationRequest:
    request_id: str
    prompt: str = ""
    prompt_token_ids: list[int] = field(default_factory=list)   # used when prompt is empty
    adapter_id: str = ""                                         # "" -> base model
    adapter_version: int = 0                                     # 0 -> latest
    sampling: SamplingOptions = field(default_factory=SamplingOptions)


@dataclass
class TokenEvent:
    request_id: str
    token_ids: list[int]
    text: str
    logprobs: list[float]
    finish_reason: str | None          # "length" | "stop" | "eos" on the last event, else None
    prompt_tokens: int
    completion_tokens: int
    error: Exception | None = None     # set on a failed request's last event
    top_logprobs: list[Top] = field(default_factory=list)   # per token, when sampling.top_logprobs > 0


@dataclass(frozen=True)
class AdapterResidency:
    adapter_id: str
    version: int
    tier: str                          # "device" | "host" | "disk"
    active_requests: int


@dataclass(frozen=True)
class TierStat:
    tier: str                          # "device" | "host" | "disk"
    adapters: int = 0
    bytes_used: int = 0
    bytes_capacity: int = 0
    hits: int = 0
    misses: int = 0
    loads: int = 0
    evictions: int = 0


@dataclass(frozen=True)
class EngineStatus:
    running: int
    waiting: int
    max_batch_size: int
    kv_blocks_total: int
    kv_blocks_free: int
    device: str
    dtype: str
    device_adapter_slots: int
    adapters: list[AdapterResidency]
    kv_blocks_cached: int = 0          # blocks holding a cached prefix (in use or free)
    prefix_cache_hit_tokens: int = 0   # prompt tokens taken from the prefix cache since start
    prefill_tokens_computed: int = 0   # prompt tokens run through the model since start
    tier_stats: list[TierStat] = field(default_factory=list)   # device, host, disk
    host_cache_bytes: int = 0          # the host arena's capacity
    host_cache_used_bytes: int = 0     # its pages in use


class InternalError(OpenLoraError):
    """A bug in the engine (gRPC INTERNAL)."""


@dataclass(eq=False)
class _Request:
    req: GenerationRequest
    on_event: Callable[[TokenEvent], None]
    seq: Sequence
    max_new: int
    row: SamplingRow
    detok: Detokenizer | None
    stop_text: StopText
    lease_future: Future | None = None
    lease: object | None = None        # the pinned adapter (a residency or slot lease)
    slot: int | None = None            # its batch sort key
    completion: int = 0
    done: bool = False


class Engine:
    def __init__(self, config: ExecutorConfig, adapter_source: AdapterSource):
        self.config = config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        tune_malloc()   # activations are MiB-sized: keep freed ones for reuse (see memory.py)
        self.kernel_backend = ops.load(config)
        path = resolve_model_dir(config.base_model)
        _, cfg = read_config(path)
        max_len = config.max_model_len or cfg.max_positions
        block = config.kv_block_size
        self.model, self.model_config, self.model_path = load_model(str(path), self.device,
                                                                    self.dtype, max_len)
        if config.prepack_weights:
            packed = self.model.prepack()
            if packed:
                log.info("weights_prepacked", bytes=packed)
        # CPU: the host arena is what the kernel reads (no device slots). CUDA: device slots.
        self.arena: HostArena | None = None
        self.pool: AdapterPool | None = None
        if self.device.type == "cpu":
            layout = ArenaLayout.for_model(cfg, config.arena_page_elems)
            self.arena = HostArena(layout, config.host_cache_bytes, self.dtype)
            for layer, module, proj in self.model.projections():
                proj.lm = layout.lm(layer, module)
        else:
            self.pool = AdapterPool(cfg, config.max_device_adapters, config.max_lora_rank, self.dtype,
                                    self.device)
            for layer, module, proj in self.model.projections():
                proj.lora = self.pool.stacks[layer][module]
        num_blocks = auto_num_blocks(      # after weights and slots: CUDA sizes from what is free
            config.kv_cache_bytes, layers=cfg.layers, block_size=block, kv_heads=cfg.kv_heads,
            head_dim=cfg.head_dim, dtype=self.dtype, device=self.device,
            max_batch_size=config.max_batch_size, max_model_len=max_len)
        if num_blocks * block < max_len:
            log.warning("max_model_len_reduced", max_model_len=max_len, kv_tokens=num_blocks * block)
            max_len = num_blocks * block
        self.max_model_len = max_len
        self._tokenizer = Tokenizer.from_dir(path, self.model_config.eos_token_ids)
        eos = self.model_config.eos_token_ids or (self._tokenizer.eos_token_ids if self._tokenizer else ())
        self.eos_token_ids = frozenset(eos)
        # layers' sliding windows other than the model-wide one: each step builds their groups too
        mc = self.model_config
        self._other_windows = sorted({w for w in mc.layer_windows if w != mc.sliding_window},
                                     key=lambda w: w or 0)
        self.kv = KVCache(layers=cfg.layers, num_blocks=num_blocks, block_size=block,
                          kv_heads=cfg.kv_heads, head_dim=cfg.head_dim, dtype=self.dtype,
                          device=self.device)
        self.allocator = KVBlockAllocator(num_blocks)
        self.scheduler = Scheduler(self.allocator, block, config.max_batch_size,
                                   config.max_prefill_tokens, config.enable_prefix_caching)
        self.source = adapter_source
        if self.arena is not None:
            self.adapters = Residency(self.arena, adapter_source, cfg, config.max_lora_rank,
                                      policy=config.adapter_eviction_policy,
                                      latest_ttl_s=config.adapter_latest_ttl_s,
                                      workers=config.adapter_load_workers, wait_s=config.adapter_wait_s,
                                      on_load=self._on_adapter_load)
        else:
            self.adapters = AdapterCache(self.pool, adapter_source, cfg, config.max_lora_rank,
                                         latest_ttl_s=config.adapter_latest_ttl_s,
                                         workers=config.adapter_load_workers,
                                         slot_wait_s=config.adapter_wait_s)
        self.adapter_load_observer = None   # set by the metrics: (source tier, seconds) per load
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._inbox: deque[_Request] = deque()
        self._cancels: deque[str] = deque()
        self._active: dict[str, _Request] = {}       # every request not yet finished
        self._pending: list[_Request] = []            # waiting for their adapter (engine thread only)
        self._waiting_count = 0
        self._thread: threading.Thread | None = None
        self._stopping = False
        log.info("engine_ready", model=config.base_model, arch=cfg.arch, device=str(self.device),
                 dtype=str(self.dtype), kv_blocks=num_blocks, block_size=block,
                 max_model_len=max_len, kernel=self.kernel_backend)

    # -- public API ----------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Tokenizer | None:
        return self._tokenizer

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
        if not req.request_id:
            raise InvalidArgument("request_id must not be empty")
        problems = req.sampling.problems()
        if problems:
            raise InvalidArgument("; ".join(problems))
        if req.adapter_version < 0:
            raise InvalidArgument(f"adapter_version must be >= 0, got {req.adapter_version}")
        if req.adapter_id:
            check_adapter_id(req.adapter_id)
        prompt_ids = self._prompt_ids(req)
        if len(prompt_ids) >= self.max_model_len:
            raise InvalidArgument(f"the prompt has {len(prompt_ids)} tokens; this model's context "
                                  f"is {self.max_model_len} tokens, prompt plus at least one new token")
        if req.sampling.stop and self._tokenizer is None:
            raise InvalidArgument("stop strings need a tokenizer, and this model has none")
        opts = req.sampling
        vocab = self.model_config.vocab
        bad = [t for t in opts.stop_token_ids if t >= vocab]
        if bad:
            raise InvalidArgument(f"stop_token_ids: {bad[0]} is outside the vocabulary [0, {vocab})")
        max_new = opts.max_new_tokens or self.config.default_max_new_tokens
        if opts.min_new_tokens > max_new:
            raise InvalidArgument(f"min_new_tokens ({opts.min_new_tokens}) must be <= max_new_tokens "
                                  f"({max_new}, the executor's default)")
        greedy = opts.temperature <= 0
        held_back = tuple(sorted(set(opts.stop_token_ids)
                                 | (set() if opts.ignore_eos else set(self.eos_token_ids))))
        r = _Request(
            req=req, on_event=on_event,
            seq=Sequence(req.request_id, list(prompt_ids), len(prompt_ids)), max_new=max_new,
            row=SamplingRow(opts, None if greedy else make_generator(opts.seed, self.device),
                            list(prompt_ids), len(prompt_ids), held_back),
            detok=Detokenizer(self._tokenizer, prompt_ids) if self._tokenizer else None,
            stop_text=StopText(tuple(opts.stop)))
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
        reached). On CPU the host arena is what the kernel reads: "device" reaches "host"."""
        check_adapter_id(adapter_id)
        if tier == "disk":
            return self.source.resolve(adapter_id, version).version, "disk"
        lease = self.adapters.preload(adapter_id, version,
                                      timeout=self.config.registry_timeout_s * 4)
        return lease.version, "host" if self.arena is not None else "device"

    def unload_adapter(self, adapter_id: str) -> None:
        """Drop adapter_id from every tier (copies in use are freed when their requests end)."""
        check_adapter_id(adapter_id)
        self.adapters.unload(adapter_id)
        self.source.forget(adapter_id)

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

        deleted: the adapter leaves every tier (version 0: every version; in-use slots go when their
        requests end). Otherwise a new version exists: "latest" resolves to `latest_version` at once.
        """
        if deleted:
            self.unload_adapter(adapter_id)
        else:
            self.adapters.set_latest(adapter_id, latest_version)

    def status(self) -> EngineStatus:
        with self._lock:
            running, waiting = len(self.scheduler.running), len(self._inbox) + self._waiting_count
        return EngineStatus(
            running=running, waiting=waiting, max_batch_size=self.config.max_batch_size,
            kv_blocks_total=self.allocator.num_blocks, kv_blocks_free=self.allocator.num_free,
            device=str(self.device), dtype=str(self.dtype).removeprefix("torch."),
            device_adapter_slots=self.pool.num_slots if self.pool is not None else 0,
            adapters=self._residency(), kv_blocks_cached=self.allocator.num_cached,
            prefix_cache_hit_tokens=self.scheduler.prefix_hit_tokens,
            prefill_tokens_computed=self.scheduler.prefill_tokens,
            tier_stats=self._tier_stats(),
            host_cache_bytes=self.arena.capacity_bytes if self.arena is not None else 0,
            host_cache_used_bytes=self.arena.used_bytes if self.arena is not None else 0)

    def _residency(self) -> list[AdapterResidency]:
        fast = "host" if self.arena is not None else "device"
        held = [AdapterResidency(a, v, fast, n) for a, v, n in self.adapters.residency()]
        seen = {(a.adapter_id, a.version) for a in held}
        return held + [AdapterResidency(a, v, "disk", 0) for a, v in self.source.held()
                       if (a, v) not in seen]

    def _tier_stats(self) -> list[TierStat]:
        disk = TierStat("disk", **(self.source.stats() if hasattr(self.source, "stats") else {}))
        if self.arena is not None:
            return [TierStat("device"), TierStat("host", **self.adapters.host_stats()), disk]
        resident = self.adapters.residency()
        return [TierStat("device", adapters=len(resident), bytes_capacity=0), TierStat("host"), disk]

    # -- validation --------------------------------------------------------------------------
    def _prompt_ids(self, req: GenerationRequest) -> list[int]:
        if req.prompt:
            if self._tokenizer is None:
                raise InvalidArgument("this model has no tokenizer.json: send prompt_token_ids")
            ids = self._tokenizer.encode(req.prompt)
        else:
            ids = list(req.prompt_token_ids)
        if not ids:
            raise InvalidArgument("the prompt is empty: send prompt or prompt_token_ids")
        vocab = self.model_config.vocab
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise InvalidArgument(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})")
        return ids

    # -- the engine thread ---------------------------------------------------------------------
    def _run(self) -> None:
        with torch.inference_mode():
            while not self._stopping:
                try:
                    self._intake()
                    if not self.scheduler.has_work():
                        self._wake.wait(0.5)
                        self._wake.clear()
                        continue
                    self._step()
                except Exception:  # never let the loop die
                    log.exception("engine_loop_error")
                    time.sleep(0.01)

    def _intake(self) -> None:
        """New requests and cancels from other threads; requests whose adapter became ready."""
        with self._lock:
            new, self._inbox = list(self._inbox), deque()
            cancels, self._cancels = list(self._cancels), deque()
        for r in new:
            if r.req.adapter_id:
                r.lease_future = self.adapters.acquire(r.req.adapter_id, r.req.adapter_version)
                if not r.lease_future.done():   # woken when it is ready: no polling
                    r.lease_future.add_done_callback(lambda _: self._wake.set())
                self._pending.append(r)
            else:
                self.scheduler.add(r.seq)
        for request_id in cancels:
            r = self._active.get(request_id)
            if r is not None and not r.done:
                self._finish(r, None, error=Cancelled(f"request {request_id!r} was cancelled"))
        still = []
        for r in self._pending:
            if r.done:
                self._release_when_ready(r)
            elif not r.lease_future.done():
                still.append(r)
            elif r.lease_future.exception() is not None:
                self._finish(r, None, error=r.lease_future.exception())
            else:
                lease = r.lease_future.result()
                r.lease = lease
                r.slot = r.seq.slot = lease.slot
                r.seq.cache_key = f"{r.req.adapter_id}@{lease.version}"   # the adapter shapes the K/V
                self.scheduler.add(r.seq)
        self._pending = still
        with self._lock:
            self._waiting_count = len(self._pending) + len(self.scheduler.waiting)

    def _release_when_ready(self, r: _Request) -> None:
        """A request cancelled while its adapter loaded: give the pin back once it arrives."""
        fut = r.lease_future
        fut.add_done_callback(lambda f: f.exception() is None and self.adapters.release(f.result()))

    def _step(self) -> None:
        batch = self.scheduler.schedule()
        for seq in batch.preempted:
            log.info("sequence_preempted", request_id=seq.seq_id, tokens=seq.num_tokens,
                     kv_blocks_free=self.allocator.num_free)
        if not batch.items:
            self._wake.wait(0.005)
            return
        reqs = [self._active[item.seq.seq_id] for item in batch.items]
        try:
            logits = self.model(self._forward_batch(batch), self.kv)
        except Exception as exc:
            log.exception("step_failed", requests=[r.req.request_id for r in reqs])
            for r in reqs:
                self._finish(r, None, error=InternalError(f"internal error in the forward pass: "
                                                          f"{type(exc).__name__}: {exc}"))
            return
        sampled = [r for r, item in zip(reqs, batch.items, strict=False) if item.samples]
        self.scheduler.advance(batch)
        try:
            tokens, logprobs, tops = sample_with_top(logits, [r.row for r in sampled])
        except Exception:   # isolate the faulty request: sample row by row
            tokens, logprobs, tops = [], [], []
            for i, r in enumerate(sampled):
                try:
                    t, lp, top = sample_with_top(logits[i:i + 1], [r.row])
                except Exception as exc:
                    log.exception("sampling_failed", request_id=r.req.request_id)
                    self._finish(r, None, error=InternalError(f"internal error in sampling: {exc}"))
                    t, lp, top = [None], [None], [None]
                tokens += t
                logprobs += lp
                tops += top
        for r, token, lp, top in zip(sampled, tokens, logprobs, tops, strict=False):
            if r.done:
                continue
            try:
                self._emit_token(r, token, lp, top)
            except Exception as exc:
                log.exception("output_failed", request_id=r.req.request_id)
                self._finish(r, None, error=InternalError(f"internal error: {exc}"))

    def _forward_batch(self, batch: Batch) -> ForwardBatch:
        bs = self.kv.block_size
        ids, positions, slot_mapping, logits_rows = [], [], [], []
        decode, decode_rows, prefill, prefill_rows = [], [], [], []
        slots, counts = [], []
        row = 0
        for item in batch.items:
            seq, n = item.seq, item.num_new
            a = seq.num_computed
            ids += seq.token_ids[a:a + n]
            positions += range(a, a + n)
            blocks = seq.blocks
            slot_mapping += [blocks[p // bs] * bs + p % bs for p in range(a, a + n)]
            group, rows = (decode, decode_rows) if n == 1 else (prefill, prefill_rows)
            group.append((blocks, a + n, n))
            rows.append(row)
            if item.samples:
                logits_rows.append(row + n - 1)
            slots.append(seq.slot)
            counts.append(n)
            row += n
        dev = self.device
        cfg = self.model_config

        def groups_for(window: int | None) -> list[AttnGroup]:
            return [build_group(g, r, bs, window, dev) for g, r in ((decode, decode_rows),
                                                                    (prefill, prefill_rows)) if g]

        groups = groups_for(cfg.sliding_window)
        windowed = {w or 0: groups_for(w) for w in self._other_windows}
        seg_indptr, seg_slots = ops.build_segments(slots, counts, dev)
        paged = None
        if self.arena is not None:   # each segment's arena entry, in segment order
            entries, last = [], None
            for item, n in zip(batch.items, counts, strict=False):
                if n and (not entries or item.seq.slot != last):
                    lease = self._active[item.seq.seq_id].lease
                    entries.append(lease.entry if lease is not None else None)
                    last = item.seq.slot
            paged = self.arena.batch(entries)
        return ForwardBatch(
            input_ids=torch.tensor(ids, dtype=torch.long, device=dev),
            positions=torch.tensor(positions, dtype=torch.long, device=dev),
            attn=AttnMetadata(torch.tensor(slot_mapping, dtype=torch.long, device=dev), groups, windowed),
            seg_indptr=seg_indptr, seg_slots=seg_slots,
            logits_rows=torch.tensor(logits_rows, dtype=torch.long, device=dev), paged=paged)

    def _emit_token(self, r: _Request, token: int, logprob: float, top: Top | None = None) -> None:
        r.seq.token_ids.append(token)
        r.row.history.append(token)
        r.completion += 1
        finish = None
        if token in self.eos_token_ids and not r.req.sampling.ignore_eos:
            finish = EOS
        elif token in r.req.sampling.stop_token_ids:
            finish = STOP
        text = r.stop_text.push(r.detok.step([token])) if r.detok else ""
        if r.stop_text.stopped:
            finish = STOP
        if finish is None and (r.completion >= r.max_new or r.seq.num_tokens >= self.max_model_len):
            finish = LENGTH
        if finish is not None and r.detok and not r.stop_text.stopped:
            text += r.stop_text.push(r.detok.flush())
            if r.stop_text.stopped:
                finish = STOP
            text += r.stop_text.flush()
        event = TokenEvent(r.req.request_id, [token], text, [logprob], finish, r.seq.prompt_len,
                           r.completion, top_logprobs=[top] if top is not None else [])
        if finish is not None:
            self._finish(r, event)
        else:
            self._deliver(r, event)

    def _finish(self, r: _Request, event: TokenEvent | None, error: Exception | None = None) -> None:
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
        self._deliver(r, event)

    def _deliver(self, r: _Request, event: TokenEvent) -> None:
        try:
            r.on_event(event)
        except Exception:
            log.exception("on_event_failed", request_id=r.req.request_id)

    def _fail_all(self, error: Exception) -> None:
        with self._lock:
            left = list(self._active.values())
            self._inbox.clear()
        for r in left:
            if r.lease_future is not None and r.slot is None and not r.done:
                self._release_when_ready(r)
            self._finish(r, None, error=error)
