from services.common.gen.openlora.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AdapterTier(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ADAPTER_TIER_UNSPECIFIED: _ClassVar[AdapterTier]
    ADAPTER_TIER_DEVICE: _ClassVar[AdapterTier]
    ADAPTER_TIER_HOST: _ClassVar[AdapterTier]
    ADAPTER_TIER_DISK: _ClassVar[AdapterTier]
ADAPTER_TIER_UNSPECIFIED: AdapterTier
ADAPTER_TIER_DEVICE: AdapterTier
ADAPTER_TIER_HOST: AdapterTier
ADAPTER_TIER_DISK: AdapterTier

class LoadAdapterRequest(_message.Message):
    __slots__ = ("adapter_id", "version", "tier")
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    version: int
    tier: AdapterTier
    def __init__(self, adapter_id: _Optional[str] = ..., version: _Optional[int] = ..., tier: _Optional[_Union[AdapterTier, str]] = ...) -> None: ...

class LoadAdapterResponse(_message.Message):
    __slots__ = ("tier", "load_ms")
    TIER_FIELD_NUMBER: _ClassVar[int]
    LOAD_MS_FIELD_NUMBER: _ClassVar[int]
    tier: AdapterTier
    load_ms: float
    def __init__(self, tier: _Optional[_Union[AdapterTier, str]] = ..., load_ms: _Optional[float] = ...) -> None: ...

class UnloadAdapterRequest(_message.Message):
    __slots__ = ("adapter_id",)
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    def __init__(self, adapter_id: _Optional[str] = ...) -> None: ...

class UnloadAdapterResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AdapterResidency(_message.Message):
    __slots__ = ("adapter_id", "version", "tier", "active_requests")
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    version: int
    tier: AdapterTier
    active_requests: int
    def __init__(self, adapter_id: _Optional[str] = ..., version: _Optional[int] = ..., tier: _Optional[_Union[AdapterTier, str]] = ..., active_requests: _Optional[int] = ...) -> None: ...

class ExecutorStatus(_message.Message):
    __slots__ = ("executor_id", "base_model", "device", "dtype", "running_requests", "waiting_requests", "max_batch_size", "kv_blocks_total", "kv_blocks_free", "device_adapter_slots", "host_cache_bytes", "host_cache_used_bytes", "adapters", "kv_blocks_cached", "prefix_cache_hit_tokens", "prefill_tokens_computed", "tier_stats", "quantization", "base_weight_bytes", "speculative_method", "spec_draft_tokens", "spec_accepted_tokens", "spec_emitted_tokens", "spec_acceptance_rate", "device_cache_bytes", "device_cache_used_bytes", "unified_kv_adapter_pool", "max_model_len", "lora_dtype")
    EXECUTOR_ID_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    RUNNING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    WAITING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_FREE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ADAPTER_SLOTS_FIELD_NUMBER: _ClassVar[int]
    HOST_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    HOST_CACHE_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_CACHED_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_HIT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_TOKENS_COMPUTED_FIELD_NUMBER: _ClassVar[int]
    TIER_STATS_FIELD_NUMBER: _ClassVar[int]
    QUANTIZATION_FIELD_NUMBER: _ClassVar[int]
    BASE_WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    SPECULATIVE_METHOD_FIELD_NUMBER: _ClassVar[int]
    SPEC_DRAFT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SPEC_ACCEPTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SPEC_EMITTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SPEC_ACCEPTANCE_RATE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_CACHE_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    UNIFIED_KV_ADAPTER_POOL_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    LORA_DTYPE_FIELD_NUMBER: _ClassVar[int]
    executor_id: str
    base_model: str
    device: str
    dtype: str
    running_requests: int
    waiting_requests: int
    max_batch_size: int
    kv_blocks_total: int
    kv_blocks_free: int
    device_adapter_slots: int
    host_cache_bytes: int
    host_cache_used_bytes: int
    adapters: _containers.RepeatedCompositeFieldContainer[AdapterResidency]
    kv_blocks_cached: int
    prefix_cache_hit_tokens: int
    prefill_tokens_computed: int
    tier_stats: _containers.RepeatedCompositeFieldContainer[TierStats]
    quantization: str
    base_weight_bytes: int
    speculative_method: str
    spec_draft_tokens: int
    spec_accepted_tokens: int
    spec_emitted_tokens: int
    spec_acceptance_rate: float
    device_cache_bytes: int
    device_cache_used_bytes: int
    unified_kv_adapter_pool: bool
    max_model_len: int
    lora_dtype: str
    def __init__(self, executor_id: _Optional[str] = ..., base_model: _Optional[str] = ..., device: _Optional[str] = ..., dtype: _Optional[str] = ..., running_requests: _Optional[int] = ..., waiting_requests: _Optional[int] = ..., max_batch_size: _Optional[int] = ..., kv_blocks_total: _Optional[int] = ..., kv_blocks_free: _Optional[int] = ..., device_adapter_slots: _Optional[int] = ..., host_cache_bytes: _Optional[int] = ..., host_cache_used_bytes: _Optional[int] = ..., adapters: _Optional[_Iterable[_Union[AdapterResidency, _Mapping]]] = ..., kv_blocks_cached: _Optional[int] = ..., prefix_cache_hit_tokens: _Optional[int] = ..., prefill_tokens_computed: _Optional[int] = ..., tier_stats: _Optional[_Iterable[_Union[TierStats, _Mapping]]] = ..., quantization: _Optional[str] = ..., base_weight_bytes: _Optional[int] = ..., speculative_method: _Optional[str] = ..., spec_draft_tokens: _Optional[int] = ..., spec_accepted_tokens: _Optional[int] = ..., spec_emitted_tokens: _Optional[int] = ..., spec_acceptance_rate: _Optional[float] = ..., device_cache_bytes: _Optional[int] = ..., device_cache_used_bytes: _Optional[int] = ..., unified_kv_adapter_pool: _Optional[bool] = ..., max_model_len: _Optional[int] = ..., lora_dtype: _Optional[str] = ...) -> None: ...

class TierStats(_message.Message):
    __slots__ = ("tier", "adapters", "bytes_used", "bytes_capacity", "hits", "misses", "loads", "evictions")
    TIER_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    BYTES_USED_FIELD_NUMBER: _ClassVar[int]
    BYTES_CAPACITY_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    LOADS_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    tier: AdapterTier
    adapters: int
    bytes_used: int
    bytes_capacity: int
    hits: int
    misses: int
    loads: int
    evictions: int
    def __init__(self, tier: _Optional[_Union[AdapterTier, str]] = ..., adapters: _Optional[int] = ..., bytes_used: _Optional[int] = ..., bytes_capacity: _Optional[int] = ..., hits: _Optional[int] = ..., misses: _Optional[int] = ..., loads: _Optional[int] = ..., evictions: _Optional[int] = ...) -> None: ...
