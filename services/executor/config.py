"""The executor's one config object."""

from __future__ import annotations

from dataclasses import dataclass

from services.common.config import ServerConfig, check, flag


@dataclass(slots=True)
class ExecutorConfig(ServerConfig):
    port: int = flag(50052, "port to listen on (0 -> any free port)")
    registry: str = flag("", "registry address HOST:PORT (empty -> no registry)")
    base_model: str = flag(None, "base model: a Hugging Face directory or hub id", required=True)
    executor_id: str = flag("", "name reported in responses (default HOST:PORT)")
    device: str = flag("auto", "device to run on", choices=("auto", "cpu", "cuda"))
    dtype: str = flag("auto", "weights and activations dtype",
                      choices=("auto", "float32", "bfloat16", "float16"))
    lora_dtype: str = flag("auto", "adapter pages' dtype: auto -> --dtype; bfloat16 under a float32 model "
                           "halves the bytes every adapter takes in each tier and the bytes the kernel reads "
                           "per token (values rounded once to bfloat16 at load, products and sums in fp32)",
                           choices=("auto", "float32", "bfloat16", "float16"))
    max_batch_size: int = flag(64, "most sequences in one step")
    max_queue: int = flag(1024, "most requests waiting before RESOURCE_EXHAUSTED")
    quantization: str = flag("none", "weight-only quantization of the base's projections at load: per-channel "
                             "int8 or group-wise int4 (activations, adapters, embeddings and lm_head stay "
                             "in --dtype); a GPTQ / AWQ checkpoint is used as quantized whatever this says",
                             choices=("none", "int8", "int4"))
    quantization_group_size: int = flag(128, "inputs sharing one int4 scale and zero point (32, 64, 128, 256 "
                                        "or a multiple of 256)")
    max_device_adapters: int = flag(32, "most adapters the device tier holds at once (a cap on top of "
                                    "--device-cache-bytes)")
    max_lora_rank: int = flag(64, "largest adapter rank accepted")
    prepack_weights: bool = flag(True, "float32 on CPU: copy each base weight once into MKL's GEMM "
                                 "layout (faster decode steps, more memory)")
    host_cache_bytes: int = flag(2 * 1024**3, "host adapter arena in bytes, allocated once (pinned on CUDA): "
                                 "adapters at their true rank in fixed-size pages; without a device tier "
                                 "(CPU) the kernel reads them in place, so it bounds how many adapters "
                                 "one batch mixes")
    device_cache_bytes: int = flag(0, "device tier: a page pool in accelerator memory, filled from the host "
                                   "arena by page copies, read in place by the kernel (0 -> on CUDA the "
                                   "smaller of --host-cache-bytes and a tenth of the free GPU memory; on "
                                   "CPU none: the kernel reads the arena. > 0 on CPU: a second host pool "
                                   "filled by copy, so the device tier runs in tests as on a GPU)")
    unified_kv_adapter_pool: bool = flag(False, "adapter pages and KV blocks share one budget (S-LoRA's "
                                         "unified paging): the kernel's page pool borrows whole KV blocks "
                                         "no sequence uses, and cold adapters give them back before any "
                                         "sequence is preempted; an adapter a request uses is never taken")
    arena_page_elems: int = flag(0, "elements per arena page (0 -> the smallest projection dimension "
                                 "of at least 512 elements, S-LoRA's vector-sized page)")
    adapter_eviction_policy: str = flag("gdsf", "which adapter a full arena or disk tier evicts: gdsf "
                                        "(frequency x reload cost / size, with ageing) or lru",
                                        choices=("gdsf", "lru"))
    adapter_load_workers: int = flag(4, "threads fetching, verifying, parsing and packing adapters")
    adapter_wait_s: float = flag(120.0, "how long a load waits for room in a tier full of adapters "
                                 "in use before RESOURCE_EXHAUSTED, seconds")
    disk_cache_dir: str = flag("", "disk tier directory (empty -> ~/.cache/openlora/adapters/<executor id "
                                   "or HOST_PORT>, reused across restarts; a temporary one with --port 0)")
    disk_cache_bytes: int = flag(20 * 1024**3, "disk tier capacity in bytes (least recently used versions go first)")
    disk_write_back: bool = flag(True, "write an adapter the host arena evicts back to the disk tier (its "
                                 "packed image) when the disk no longer holds it, so the two tiers hold "
                                 "different adapters and a reload reads the disk instead of fetching")
    disk_write_back_queue: int = flag(8, "write-backs waiting at most; under a burst of evictions the "
                                      "rest are skipped (fetched again if asked for)")
    kv_cache_bytes: int = flag(0, "KV cache budget in bytes (0 -> automatic)")
    kv_block_size: int = flag(16, "tokens per KV cache block")
    max_model_len: int = flag(0, "longest prompt + completion (0 -> the model's)")
    max_prefill_tokens: int = flag(2048, "most prompt tokens prefilled in one step")
    enable_prefix_caching: bool = flag(True, "reuse the KV blocks of a prompt prefix already computed "
                                       "for the same adapter and version (full blocks only)")
    speculative_method: str = flag("none", "speculative decoding: none, or ngram (prompt lookup: drafts "
                                   "copied from the prompt and output so far, verified in the step's "
                                   "forward pass; the output is unchanged)", choices=("none", "ngram"))
    num_speculative_tokens: int = flag(4, "most draft tokens per sequence and step (ngram)")
    prompt_lookup_min: int = flag(2, "shortest n-gram matched against the context for a draft")
    prompt_lookup_max: int = flag(5, "longest n-gram matched (the longest match wins)")
    speculative_min_acceptance: float = flag(0.25, "a sequence whose acceptance rate (averaged over its "
                                             "recent drafts) falls below this stops drafting for a "
                                             "while (a pause that doubles up to 64 steps)")
    speculative_disable_by_batch_size: int = flag(16, "no drafts in a step with more sequences than this "
                                                  "(0 -> no limit): a big batch is compute-bound")
    speculative_max_batch_tokens: int = flag(128, "drafts only while the step's tokens (prefill chunks, "
                                             "decode tokens and drafts) stay within this (0 -> no limit)")
    default_max_new_tokens: int = flag(64, "max_new_tokens when a request gives 0")
    structured_output_cache: int = flag(256, "compiled structured-output grammars kept (by schema, LRU)")
    blob_url: str = flag("", "the registry's blob store (its --blob-url: s3://BUCKET/PREFIX, or a shared "
                         "blob directory): adapter files are read straight from it, verified by digest, "
                         "with FetchAdapter as the fallback (empty -> FetchAdapter only)")
    registry_timeout_s: float = flag(30.0, "deadline of each registry call, seconds")
    metrics_port: int = flag(0, "Prometheus metrics HTTP port (0 -> off)")
    kernel: str = flag("auto", "which kernels run the ops: the C++/CUDA extension, falling back to the "
                       "PyTorch references (logged) if it cannot be built (auto); the extension, a failed "
                       "build an error (cpp); or the slow references (reference)",
                       choices=("auto", "cpp", "reference"))
    build_dir: str = flag("", "where the kernels are compiled and cached (empty -> ~/.cache/openlora)")
    cuda_arch: str = flag("", "GPU architecture the CUDA kernels are compiled for, e.g. 90 or 80 (empty -> "
                          "the GPU present; the compile-only check without one: 90)")
    cpu_isa: str = flag("auto", "instruction set of the CPU kernels (auto -> the best this CPU supports)",
                        choices=("auto", "avx512_bf16", "avx512", "avx2", "generic"))
    adapter_latest_ttl_s: float = flag(5.0, "age after which a resident 'latest' adapter is re-resolved in "
                                       "the background (it is served at once meanwhile), seconds")
    load_adapter_timeout_s: float = flag(0.0, "how long a LoadAdapter call waits for its adapter, seconds "
                                         "(0 -> 4 x --registry-timeout-s)")
    blob_read_concurrency: int = flag(8, "parallel reads (S3 connections) of adapter files from --blob-url")
    registry_watch_max_backoff_s: float = flag(5.0, "longest pause before reopening a broken registry "
                                               "change feed (the pause starts at 0.1 s and doubles), seconds")
    idle_poll_s: float = flag(0.5, "how long the idle engine thread sleeps between checks for work "
                              "(new requests and cancels wake it at once), seconds")
    empty_step_wait_s: float = flag(0.005, "how long the engine waits after a step that could schedule "
                                    "nothing (every KV block in use, an adapter still loading), seconds")
    error_backoff_s: float = flag(0.01, "pause of the engine loop after an unexpected error, seconds")

    def __post_init__(self) -> None:
        ServerConfig.__post_init__(self)
        check(bool(self.base_model), "base_model", "is required")
        for name in ("max_batch_size", "max_queue", "max_device_adapters", "max_lora_rank",
                     "kv_block_size", "max_prefill_tokens", "default_max_new_tokens",
                     "structured_output_cache", "adapter_load_workers", "blob_read_concurrency"):
            check(getattr(self, name) > 0, name, f"must be > 0, got {getattr(self, name)}")
        check(self.quantization in ("none", "int8", "int4"), "quantization",
              f"must be none, int8 or int4, got {self.quantization!r}")
        check(self.quantization_group_size >= 32 and (self.quantization_group_size in (32, 64, 128)
              or self.quantization_group_size % 256 == 0), "quantization_group_size",
              f"must be 32, 64, 128, 256 or a multiple of 256, got {self.quantization_group_size}")
        check(self.adapter_wait_s > 0, "adapter_wait_s", "must be > 0")
        for name in ("host_cache_bytes", "device_cache_bytes", "disk_cache_bytes", "kv_cache_bytes", "max_model_len",
                     "arena_page_elems"):
            check(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}")
        check(self.speculative_method in ("none", "ngram"), "speculative_method",
              f"must be none or ngram, got {self.speculative_method!r}")
        for name in ("num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max"):
            check(getattr(self, name) > 0, name, f"must be > 0, got {getattr(self, name)}")
        check(self.prompt_lookup_min <= self.prompt_lookup_max, "prompt_lookup_min",
              f"must be <= prompt_lookup_max ({self.prompt_lookup_max}), got {self.prompt_lookup_min}")
        check(0 <= self.speculative_min_acceptance <= 1, "speculative_min_acceptance", "must be in [0, 1]")
        for name in ("speculative_disable_by_batch_size", "speculative_max_batch_tokens"):
            check(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}")
        check(self.registry_timeout_s > 0, "registry_timeout_s", "must be > 0")
        check(not (self.dtype == "float16" and self.device == "cpu"), "dtype",
              "float16 runs on CUDA only; use float32 or bfloat16 with --device cpu")
        check(self.lora_dtype in ("auto", "bfloat16", self.dtype) or self.dtype == "auto", "lora_dtype",
              f"must be auto, --dtype ({self.dtype}) or bfloat16 (under a float32 model), got {self.lora_dtype}")
        check(0 <= self.metrics_port <= 65535, "metrics_port", "must be 0..65535")
        check(self.adapter_latest_ttl_s >= 0, "adapter_latest_ttl_s", "must be >= 0")
        check(self.load_adapter_timeout_s >= 0, "load_adapter_timeout_s", "must be >= 0")
        for name in ("registry_watch_max_backoff_s", "idle_poll_s", "empty_step_wait_s",
                     "error_backoff_s"):
            check(getattr(self, name) > 0, name, f"must be > 0, got {getattr(self, name)}")
