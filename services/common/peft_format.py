"""PEFT LoRA adapter format: adapter_config.json, safetensors headers, tensor names, validation.

Shared by the registry (accepts or refuses adapters) and the executor (loads them). Pure Python, no
torch. Everything that rejects input raises `errors.InvalidAdapter` with a message a person can act on.

    cfg = parse_adapter_config(open("adapter_config.json", "rb").read())
    tensors, file_size = read_safetensors_header(open("adapter_model.safetensors", "rb"))
    validate_adapter(cfg, tensors)            # every tensor is lora_A [r, d_in] / lora_B [d_out, r]
    key = parse_lora_key("base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight")
    # key.layer == 3, key.module == "q_proj", key.part == "A", key.path == "model.layers.3.self_attn.q_proj"
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from dataclasses import dataclass, field
from typing import BinaryIO

from services.common.errors import InvalidAdapter, InvalidArgument

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)       # name order: the manifest's order
PICKLE_FILES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
PICKLE_MESSAGE = (
    "adapter weights are a pickle file ({name}); openlora loads only safetensors, never pickle. "
    "Convert it first, e.g. `python -c \"import torch; from safetensors.torch import save_file; "
    "save_file(torch.load('adapter_model.bin', weights_only=True), 'adapter_model.safetensors')\"` "
    "or PEFT's `model.save_pretrained(dir, safe_serialization=True)`")

MAX_HEADER_BYTES = 100 * 1024 * 1024              # safetensors' own limit
MAX_TENSORS = 65536                               # 80 layers x 7 modules x 2 is 1,120
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")

ADAPTER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,127}")


def check_adapter_id(adapter_id: str) -> str:
    """The contract's id rule; ids are never used as raw paths."""
    if not ADAPTER_ID.fullmatch(adapter_id or "") or ".." in adapter_id:
        raise InvalidArgument(f"bad adapter id {adapter_id!r}: use 1-128 characters of "
                              "[A-Za-z0-9._/-], starting with a letter or digit, without '..'")
    return adapter_id


def manifest_digest(files: dict[str, str]) -> str:
    """'sha256:' + sha256 of one `NAME\tSHA256_HEX\n` line per file, in name order."""
    manifest = "".join(f"{name}\t{sha}\n" for name, sha in sorted(files.items()))
    return "sha256:" + hashlib.sha256(manifest.encode()).hexdigest()


@dataclass(frozen=True)
class LoraConfig:
    """What openlora needs from adapter_config.json (PEFT LoRA: plain, DoRA, embedding/lm_head LoRA,
    modules_to_save)."""

    rank: int
    alpha: float
    target_modules: tuple[str, ...] | str          # str: a regex, full match on the module path
    use_rslora: bool = False
    layers_to_transform: tuple[int, ...] | None = None
    base_model: str = ""
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_dora: bool = False
    modules_to_save: tuple[str, ...] = ()
    target_parameters: tuple[str, ...] = ()        # PEFT's ParamWrapper targets (MoE experts, router)

    def saves(self, module_path: str) -> bool:
        """PEFT's modules_to_save rule: the path ends with one of the names (no dot needed)."""
        return any(module_path.endswith(name) for name in self.modules_to_save)

    def targets(self, module_path: str) -> bool:
        """PEFT's rule: list -> path == name or path endswith "." + name; str -> re.fullmatch.

        "all-linear" matches every module path. layers_to_transform, when set, must hold the
        path's layer index.
        """
        if isinstance(self.target_modules, str):
            found = (self.target_modules == "all-linear"
                     or re.fullmatch(self.target_modules, module_path) is not None)
        else:
            found = any(module_path == t or module_path.endswith("." + t)
                        for t in self.target_modules)
        if found and self.layers_to_transform is not None and not isinstance(self.target_modules, str):
            layer = _layer_of(module_path)
            found = layer is not None and layer in self.layers_to_transform
        return found

    def rank_for(self, module_path: str) -> int:
        return int(_pattern_value(self.rank_pattern, module_path, self.rank))

    def alpha_for(self, module_path: str) -> float:
        return float(_pattern_value(self.alpha_pattern, module_path, self.alpha))

    def scaling_for(self, module_path: str) -> float:
        """alpha / r, or alpha / sqrt(r) with rslora."""
        r, alpha = self.rank_for(module_path), self.alpha_for(module_path)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    @property
    def target_module_names(self) -> list[str]:
        """target_modules as a list for display/metadata (a regex is one element)."""
        if isinstance(self.target_modules, str):
            return [self.target_modules]
        return list(self.target_modules)


MAX_REGEX_CHARS = 1024


def _check_regex(pattern: str, what: str) -> None:
    """A config's regex must compile and must not nest repeats, nor repeat alternatives ((a+)+ and
    (a|aa)* take exponential time on a module path that almost matches): InvalidAdapter otherwise."""
    if len(pattern) > MAX_REGEX_CHARS:
        raise InvalidAdapter(f"{CONFIG_FILE}: {what} is longer than {MAX_REGEX_CHARS} characters")
    try:
        parsed = re._parser.parse(pattern)
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as exc:
        raise InvalidAdapter(f"{CONFIG_FILE}: {what} is not a valid regex: {exc}") from None
    if _nested_repeat(parsed, inside=False):
        raise InvalidAdapter(f"{CONFIG_FILE}: {what} nests repeats (like (a+)+), which can take "
                             "exponential time; write it without a repeat inside a repeat")


_REPEATS = {re._constants.MAX_REPEAT, re._constants.MIN_REPEAT,
            getattr(re._constants, "POSSESSIVE_REPEAT", None)} - {None}


def _nested_repeat(items, inside: bool) -> bool:
    for op, arg in items:
        if op in _REPEATS:
            lo, hi, sub = arg
            unbounded = hi == re._constants.MAXREPEAT or hi > 1
            if unbounded and inside:
                return True
            if _nested_repeat(sub, inside or unbounded):
                return True
        elif op in (re._constants.SUBPATTERN,):
            if _nested_repeat(arg[-1], inside):
                return True
        elif op is re._constants.BRANCH:
            if inside or any(_nested_repeat(b, inside) for b in arg[1]):
                return True
        elif op in (re._constants.ASSERT, re._constants.ASSERT_NOT):
            if _nested_repeat(arg[1], inside):
                return True
    return False


def _pattern_value(pattern: dict, module_path: str, default):
    """PEFT's get_pattern_key: the first key k with re.match(rf"(.*\\.)?({k})$", path)."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module_path):
            return value
    return default


def _layer_of(module_path: str) -> int | None:
    for part in module_path.split("."):
        if part.isdigit():
            return int(part)
    return None


def parse_adapter_config(data: bytes) -> LoraConfig:
    """adapter_config.json bytes -> LoraConfig; refuses what openlora cannot serve exactly."""
    try:
        raw = json.loads(data)
    except (ValueError, RecursionError) as exc:          # RecursionError: [[[[...
        raise InvalidAdapter(f"{CONFIG_FILE} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise InvalidAdapter(f"{CONFIG_FILE} must be a JSON object")
    peft_type = raw.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise InvalidAdapter(f"{CONFIG_FILE}: peft_type {peft_type!r} is not supported; "
                             "openlora serves LoRA adapters only (peft_type \"LORA\")")
    use_dora = raw.get("use_dora", False)
    if not isinstance(use_dora, bool) and use_dora is not None:
        raise InvalidAdapter(f"{CONFIG_FILE}: use_dora must be true or false, got {use_dora!r}")
    if raw.get("fan_in_fan_out"):
        raise InvalidAdapter(f"{CONFIG_FILE}: fan_in_fan_out is true (GPT-2 Conv1D layout); "
                             "only nn.Linear layouts are supported")
    bias = raw.get("bias", "none")
    if bias not in (None, "none"):
        raise InvalidAdapter(f"{CONFIG_FILE}: bias is {bias!r}; adapters that train biases are not "
                             "supported. Train with bias=\"none\"")
    if raw.get("lora_bias"):
        raise InvalidAdapter(f"{CONFIG_FILE}: lora_bias is true; LoRA biases are not supported")
    saved = raw.get("modules_to_save") or []
    if not (isinstance(saved, list) and all(isinstance(n, str) and n for n in saved)):
        raise InvalidAdapter(f"{CONFIG_FILE}: modules_to_save must be a list of module names, "
                             f"got {saved!r}")
    if raw.get("trainable_token_indices"):
        raise InvalidAdapter(f"{CONFIG_FILE}: trainable_token_indices is not supported; save the "
                             "embedding whole with modules_to_save instead")
    if raw.get("exclude_modules"):
        raise InvalidAdapter(f"{CONFIG_FILE}: exclude_modules is not supported; list the "
                             "modules to adapt in target_modules instead")
    params = raw.get("target_parameters") or []
    if not (isinstance(params, list) and all(isinstance(t, str) and t for t in params)):
        raise InvalidAdapter(f"{CONFIG_FILE}: target_parameters must be a list of parameter names "
                             f"(e.g. mlp.experts.gate_up_proj), got {params!r}")

    rank = raw.get("r", 8)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise InvalidAdapter(f"{CONFIG_FILE}: r must be a positive integer, got {rank!r}")
    alpha = raw.get("lora_alpha", 8)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise InvalidAdapter(f"{CONFIG_FILE}: lora_alpha must be a number, got {alpha!r}")

    targets = raw.get("target_modules")
    if isinstance(targets, str):
        if targets != "all-linear":
            _check_regex(targets, "target_modules regex")
        target_modules: tuple[str, ...] | str = targets
    elif isinstance(targets, list) and (targets or raw.get("target_parameters")) and all(
            isinstance(t, str) and t for t in targets):
        target_modules = tuple(sorted(set(targets)))
    else:
        raise InvalidAdapter(f"{CONFIG_FILE}: target_modules must be a non-empty list of module "
                             f"names or a regex string, got {targets!r}")

    layers = raw.get("layers_to_transform")
    if layers is None:
        layers_t = None
    elif isinstance(layers, int) and not isinstance(layers, bool):
        layers_t = (layers,)
    elif isinstance(layers, list) and all(isinstance(i, int) and i >= 0 for i in layers):
        layers_t = tuple(sorted(set(layers))) or None
    else:
        raise InvalidAdapter(f"{CONFIG_FILE}: layers_to_transform must be an int or a list of "
                             f"ints, got {layers!r}")

    rank_pattern = raw.get("rank_pattern") or {}
    alpha_pattern = raw.get("alpha_pattern") or {}
    if not isinstance(rank_pattern, dict) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in rank_pattern.values()):
        raise InvalidAdapter(f"{CONFIG_FILE}: rank_pattern must map names to positive ints")
    if not isinstance(alpha_pattern, dict) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in alpha_pattern.values()):
        raise InvalidAdapter(f"{CONFIG_FILE}: alpha_pattern must map names to numbers")
    if not all(math.isfinite(v) for v in alpha_pattern.values()):
        raise InvalidAdapter(f"{CONFIG_FILE}: alpha_pattern values must be finite numbers")
    for key in (*rank_pattern, *alpha_pattern):
        _check_regex(rf"(.*\.)?({key})$", f"rank_pattern/alpha_pattern key {key!r}")

    base_model = raw.get("base_model_name_or_path") or ""
    if not isinstance(base_model, str):
        raise InvalidAdapter(f"{CONFIG_FILE}: base_model_name_or_path must be a string")
    return LoraConfig(rank=rank, alpha=float(alpha), target_modules=target_modules,
                      use_rslora=bool(raw.get("use_rslora", False)), layers_to_transform=layers_t,
                      base_model=base_model, rank_pattern=dict(rank_pattern),
                      alpha_pattern={k: float(v) for k, v in alpha_pattern.items()},
                      use_dora=bool(use_dora), modules_to_save=tuple(sorted(set(saved))),
                      target_parameters=tuple(sorted(set(params))))


# The parameters PEFT's target_parameters may wrap that openlora serves: transformers 5's MoE
# layers' fused experts and router, by module name, in the order the module registers them. That
# order decides how PEFT nests their ParamWrappers: the first one wrapped ends up innermost, so its
# tensors are saved as `path.base_layer.lora_A` when a second parameter of the module is targeted.
MODULE_PARAMETERS = {"experts": ("gate_up_proj", "down_proj"), "gate": ("weight",)}


def parameter_target(config: LoraConfig, path: str) -> tuple[str, str] | None:
    """A tensor path of a PEFT ParamWrapper -> (module path, parameter name), else None.

    "model.layers.0.mlp.experts" -> (..., "down_proj") and "model.layers.0.mlp.experts.base_layer"
    -> (..., "gate_up_proj") when both are targeted; one targeted parameter has no base_layer."""
    if not config.target_parameters:
        return None
    module, depth = path, 0
    while module.endswith(".base_layer"):
        module, depth = module[: -len(".base_layer")], depth + 1
    # PEFT matches target_parameters as it matches target_modules: a name or a dotted suffix (it may
    # save a bare "down_proj" there)
    order = [p for p in MODULE_PARAMETERS.get(module.rsplit(".", 1)[-1], ())
             if any(f"{module}.{p}" == t or f"{module}.{p}".endswith("." + t) for t in config.target_parameters)]
    if depth >= len(order):
        return None
    return module, order[len(order) - 1 - depth]


@dataclass(frozen=True)
class LoraKey:
    """One LoRA tensor: `path` is the adapted module, e.g. "model.layers.3.self_attn.q_proj"."""

    layer: int
    module: str                                    # last path segment, e.g. "q_proj"
    part: str                                      # "A" or "B"
    path: str


_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<path>.+)\.lora_(?P<part>[AB])(?:\.[^.]+)?\.weight$")
_MAGNITUDE = re.compile(r"^(?:base_model\.model\.)?(?P<path>.+)\.lora_magnitude_vector(?:\.[^.]+)?(?:\.weight)?$")
_EMBEDDING = re.compile(r"^(?:base_model\.model\.)?(?P<path>.+)\.lora_embedding_(?P<part>[AB])(?:\.[^.]+)?$")
_FULL = re.compile(r"^(?:base_model\.model\.)?(?P<path>.+?)(?P<how>\.modules_to_save(?:\.[^.]+)?|\.base_layer)?"
                   r"\.weight$")
EMBED_PATHS = ("model.embed_tokens",)
LM_HEAD_PATHS = ("lm_head",)


def parse_lora_key(name: str) -> LoraKey:
    """PEFT tensor name -> LoraKey; accepts the optional adapter-name segment (lora_A.default.weight)."""
    m = _KEY.match(name)
    if m is None:
        raise InvalidAdapter(f"tensor {name!r} is not a LoRA weight "
                             "(expected <module path>.lora_A.weight or .lora_B.weight)")
    path = m["path"]
    layer = _layer_of(path)
    if layer is None:
        raise InvalidAdapter(f"tensor {name!r} does not belong to a numbered layer "
                             "(expected e.g. model.layers.3.self_attn.q_proj)")
    return LoraKey(layer=layer, module=path.rsplit(".", 1)[-1], part=m["part"], path=path)


@dataclass(frozen=True)
class TensorKey:
    """Any tensor of a PEFT LoRA adapter, by kind:

    "lora"       path.lora_A/B.weight             A [r, d_in], B [d_out, r] (projections, lm_head)
    "magnitude"  path.lora_magnitude_vector      [d_out] (DoRA)
    "embedding"  path.lora_embedding_A/B         A [r, vocab], B [hidden, r] (embed_tokens)
    "full"       path.weight (modules_to_save), or path.base_layer.weight (saved base embeddings)
    """

    kind: str
    path: str
    part: str = ""                                 # "A" / "B" for lora and embedding
    base_copy: bool = False                        # full: a saved base_layer copy, not trained

    @property
    def layer(self) -> int | None:
        return _layer_of(self.path)

    @property
    def module(self) -> str:
        return self.path.rsplit(".", 1)[-1]


def parse_tensor_key(name: str) -> TensorKey:
    """PEFT tensor name -> TensorKey; InvalidAdapter for a name no PEFT LoRA adapter has."""
    for kind, rx in (("lora", _KEY), ("magnitude", _MAGNITUDE), ("embedding", _EMBEDDING)):
        m = rx.match(name)
        if m is not None:
            return TensorKey(kind, m["path"], m.groupdict().get("part") or "")
    m = _FULL.match(name)
    if m is not None and "lora_" not in name:
        return TensorKey("full", m["path"], base_copy=m["how"] == ".base_layer")
    raise InvalidAdapter(f"tensor {name!r} is not a LoRA weight "
                         "(expected <module path>.lora_A.weight or .lora_B.weight, "
                         ".lora_magnitude_vector, .lora_embedding_A/B or a modules_to_save copy)")


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors file; start/end are ABSOLUTE byte offsets in the file."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_safetensors_header(f: BinaryIO | bytes) -> tuple[dict[str, TensorInfo], int]:
    """Parse and check a safetensors header -> (tensors, expected file size in bytes).

    Layout: u64 little-endian N, N bytes of JSON, then the data section. TensorInfo offsets are
    absolute (8 + N + data_offsets). Checks: N in range, JSON object, known dtypes, sizes matching
    shape x dtype, offsets contiguous from 0 with no gap or overlap. The caller compares the real
    file size with the returned one.
    """
    if isinstance(f, (bytes, bytearray, memoryview)):
        buf = bytes(f[:8])
        read_rest = lambda n: bytes(f[8:8 + n])  # noqa: E731
    else:
        buf = f.read(8)
        read_rest = f.read
    if len(buf) < 8:
        raise InvalidAdapter(f"{WEIGHTS_FILE} is too short to be safetensors ({len(buf)} bytes)")
    (n,) = struct.unpack("<Q", buf)
    if n == 0 or n > MAX_HEADER_BYTES:
        raise InvalidAdapter(f"{WEIGHTS_FILE}: safetensors header length {n} is out of range "
                             "(is this really a safetensors file?)")
    raw = read_rest(n)
    if len(raw) != n:
        raise InvalidAdapter(f"{WEIGHTS_FILE} is truncated: header says {n} bytes, file has "
                             f"{len(raw)}")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:    # RecursionError: [[[[...
        raise InvalidAdapter(f"{WEIGHTS_FILE}: safetensors header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise InvalidAdapter(f"{WEIGHTS_FILE}: safetensors header must be a JSON object")
    if len(header) > MAX_TENSORS + 1:
        raise InvalidAdapter(f"{WEIGHTS_FILE}: {len(header)} tensors; an adapter holds at most "
                             f"{MAX_TENSORS}")
    base = 8 + n
    spans = []
    tensors: dict[str, TensorInfo] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        where = f"{WEIGHTS_FILE}: tensor {name!r}"
        if not isinstance(info, dict):
            raise InvalidAdapter(f"{where}: entry must be an object")
        dtype, shape, offs = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
            raise InvalidAdapter(f"{where}: unknown dtype {dtype!r}")
        if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool)
                                                and d >= 0 for d in shape)):
            raise InvalidAdapter(f"{where}: shape must be a list of non-negative ints, got {shape!r}")
        if not (isinstance(offs, list) and len(offs) == 2 and all(
                isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offs)
                and offs[0] <= offs[1]):
            raise InvalidAdapter(f"{where}: data_offsets must be [begin, end] with "
                                 f"0 <= begin <= end, got {offs!r}")
        want = math.prod(shape) * DTYPE_BYTES[dtype]
        if offs[1] - offs[0] != want:
            raise InvalidAdapter(f"{where}: data_offsets span {offs[1] - offs[0]} bytes but "
                                 f"shape {shape} of {dtype} needs {want}")
        spans.append((offs[0], offs[1], name))
        tensors[name] = TensorInfo(dtype, tuple(shape), base + offs[0], base + offs[1])
    spans.sort()
    pos = 0
    for begin, end, name in spans:
        if begin != pos:
            raise InvalidAdapter(f"{WEIGHTS_FILE}: tensor {name!r} starts at data offset {begin}, "
                                 f"expected {pos} (offsets must be contiguous, no gaps/overlaps)")
        pos = end
    return tensors, base + pos


def validate_adapter(config: LoraConfig, tensors: dict[str, TensorInfo]) -> None:
    """Every tensor is one of the adapter's forms, its shapes consistent:

    a targeted module's lora_A [r, d_in] / lora_B [d_out, r], both present (projections and lm_head);
    with use_dora, each such module's lora_magnitude_vector [d_out]; embed_tokens' lora_embedding_A
    [r, vocab] / lora_embedding_B [hidden, r]; modules_to_save copies (.weight of a saved module) and
    saved base embeddings (.base_layer.weight of a targeted embed_tokens / lm_head).
    r is config.rank_for(path); layers_to_transform, when set (list targets only, as in PEFT),
    holds every LoRA tensor's layer.
    """
    if not tensors:
        raise InvalidAdapter(f"{WEIGHTS_FILE} holds no tensors")
    parts: dict[str, dict[str, TensorInfo]] = {}
    magnitudes: dict[str, tuple[str, TensorInfo]] = {}
    for name, info in tensors.items():
        key = parse_tensor_key(name)
        if info.dtype not in FLOAT_DTYPES:
            raise InvalidAdapter(f"tensor {name!r}: dtype {info.dtype} is not a float type "
                                 f"({', '.join(FLOAT_DTYPES)})")
        if 0 in info.shape or not info.shape:
            raise InvalidAdapter(f"tensor {name!r}: expected a non-empty tensor, got shape "
                                 f"{list(info.shape)}")
        if key.kind == "full":
            _check_full(config, name, key, info)
            _check_served(name, key)
            continue
        if key.kind == "lora" and key.layer is None and key.path not in LM_HEAD_PATHS:
            raise InvalidAdapter(f"tensor {name!r} does not belong to a numbered layer or lm_head "
                                 "(expected e.g. model.layers.3.self_attn.q_proj)")
        if key.kind == "embedding" and key.path not in EMBED_PATHS:
            raise InvalidAdapter(f"tensor {name!r}: lora_embedding_A/B is only served on "
                                 "model.embed_tokens")
        if (key.layer is not None and config.layers_to_transform is not None
                and not isinstance(config.target_modules, str)
                and key.layer not in config.layers_to_transform):
            raise InvalidAdapter(f"tensor {name!r}: layer {key.layer} is not in "
                                 f"layers_to_transform {list(config.layers_to_transform)}")
        param = parameter_target(config, key.path) if key.kind == "lora" else None
        if param is not None:   # lora_A [r * experts, d_in], lora_B [d_out, r * experts]
            _check_parameter_lora(config, name, key, info, param, parts)
            continue
        if not config.targets(key.path):
            raise InvalidAdapter(f"tensor {name!r}: module {key.path!r} is not in target_modules "
                                 f"{config.target_modules!r}")
        _check_served(name, key)
        if key.kind == "magnitude":
            if not config.use_dora:
                raise InvalidAdapter(f"tensor {name!r} is a DoRA magnitude but {CONFIG_FILE} has "
                                     "no use_dora: true")
            if len(info.shape) != 1:
                raise InvalidAdapter(f"tensor {name!r}: a DoRA magnitude is a vector [d_out], got "
                                     f"shape {list(info.shape)}")
            magnitudes[key.path] = (name, info)
            continue
        if len(info.shape) != 2:
            raise InvalidAdapter(f"tensor {name!r}: expected a 2-D non-empty matrix, got shape "
                                 f"{list(info.shape)}")
        r = config.rank_for(key.path)
        # lora_embedding_A is [r, vocab], lora_embedding_B [hidden, r]: the same sides as lora_A/B
        if key.part == "A" and info.shape[0] != r:
            raise InvalidAdapter(f"tensor {name!r}: lora_A must be [r={r}, d_in], got "
                                 f"{list(info.shape)}; does r in {CONFIG_FILE} match the weights?")
        if key.part == "B" and info.shape[1] != r:
            raise InvalidAdapter(f"tensor {name!r}: lora_B must be [d_out, r={r}], got "
                                 f"{list(info.shape)}; does r in {CONFIG_FILE} match the weights?")
        if key.part in parts.setdefault(key.path, {}):
            raise InvalidAdapter(f"module {key.path!r} has two lora_{key.part} tensors")
        parts[key.path][key.part] = info
    for path, ab in sorted(parts.items()):
        missing = {"A", "B"} - ab.keys()
        if missing:
            raise InvalidAdapter(f"module {path!r} has no lora_{missing.pop()} tensor; "
                                 "each adapted module needs both lora_A and lora_B")
        if config.use_dora:
            if path in EMBED_PATHS:
                raise InvalidAdapter(f"module {path!r}: DoRA on embeddings is not supported; "
                                     "target embed_tokens without use_dora")
            if path not in magnitudes:
                raise InvalidAdapter(f"module {path!r} has no lora_magnitude_vector; a DoRA "
                                     "adapter (use_dora) needs one per adapted module")
            name, info = magnitudes[path]
            if info.shape[0] != ab["B"].shape[0]:
                raise InvalidAdapter(f"tensor {name!r}: DoRA magnitude has length {info.shape[0]}, "
                                     f"its module's d_out (lora_B rows) is {ab['B'].shape[0]}")
    for path, (name, _) in magnitudes.items():
        if path not in parts:
            raise InvalidAdapter(f"tensor {name!r}: DoRA magnitude of a module with no lora_A/B")


def _check_parameter_lora(config: LoraConfig, name: str, key: TensorKey, info: TensorInfo,
                          param: tuple[str, str], parts: dict) -> None:
    """A ParamWrapper's lora_A / lora_B: PEFT stacks one rank-r pair per expert (r * experts rows of
    A, columns of B; a 2-D parameter such as the router's weight has one)."""
    r = config.rank_for(".".join(param))
    if len(info.shape) != 2:
        raise InvalidAdapter(f"tensor {name!r}: expected a 2-D matrix, got shape {list(info.shape)}")
    stacked = info.shape[0] if key.part == "A" else info.shape[1]
    if stacked % r:
        raise InvalidAdapter(f"tensor {name!r}: lora_{key.part} of {'.'.join(param)} stacks "
                             f"{stacked} rank rows, not a multiple of r={r}; does r in {CONFIG_FILE} "
                             "match the weights?")
    if key.part in parts.setdefault(key.path, {}):
        raise InvalidAdapter(f"module {key.path!r} has two lora_{key.part} tensors")
    parts[key.path][key.part] = info
    other = parts[key.path].get("B" if key.part == "A" else "A")
    if other is not None and (other.shape[1] if key.part == "A" else other.shape[0]) != stacked:
        raise InvalidAdapter(f"tensor {name!r}: lora_A's rows and lora_B's columns of "
                             f"{'.'.join(param)} differ")


_SAVED_NORM = re.compile(r"^model\.(?:layers\.\d+\.(?:input_layernorm|post_attention_layernorm)|norm)$")
# The forms executors serve beyond projection LoRA; a tensor of any other form is refused at
# registration and at load, so nothing is registered that generate would serve wrongly.
SERVED_FORMS = frozenset({"dora", "embed_tokens", "lm_head", "modules_to_save"})


def tensor_form(key: TensorKey) -> str:
    """"lora" (a projection's), "dora", "lm_head", "embed_tokens", "modules_to_save" (of embed_tokens
    or lm_head) or "modules_to_save of NAME"."""
    if key.kind == "full" and not key.base_copy:
        served = key.path in EMBED_PATHS + LM_HEAD_PATHS or _SAVED_NORM.match(key.path)
        return "modules_to_save" if served else f"modules_to_save of {key.module}"
    if key.path in LM_HEAD_PATHS:
        return "lm_head"
    if key.kind == "embedding" or key.path in EMBED_PATHS:
        return "embed_tokens"
    return "dora" if key.kind == "magnitude" else "lora"


def _check_served(name: str, key: TensorKey) -> None:
    form = tensor_form(key)
    if form != "lora" and form not in SERVED_FORMS:
        raise InvalidAdapter(f"tensor {name!r}: {form} adapters are not served yet (served forms: "
                             f"LoRA on the projections, {', '.join(sorted(SERVED_FORMS))})")


def _check_full(config: LoraConfig, name: str, key: TensorKey, info: TensorInfo) -> None:
    if key.base_copy:
        if not (config.targets(key.path) and key.path in EMBED_PATHS + LM_HEAD_PATHS):
            raise InvalidAdapter(f"tensor {name!r}: a saved base layer of a module that is not a "
                                 "targeted embed_tokens or lm_head")
    elif not config.saves(key.path):
        raise InvalidAdapter(f"tensor {name!r} is not a LoRA weight, and {key.path!r} is not in "
                             f"modules_to_save {list(config.modules_to_save)}")
    if len(info.shape) > 2:
        raise InvalidAdapter(f"tensor {name!r}: a saved module's weight must be 1-D or 2-D, got "
                             f"{list(info.shape)}")


def adapter_form(config: LoraConfig, tensors: dict[str, TensorInfo]) -> str:
    """What an adapter is, for listings: e.g. "lora", "dora", "lora+embed_tokens+lm_head",
    "lora+modules_to_save:lm_head" (a label value: no ',')."""
    keys = [parse_tensor_key(n) for n in tensors]
    extra = sorted({"embed_tokens" for k in keys if k.kind == "embedding"}
                   | {"lm_head" for k in keys if k.kind == "lora" and k.path in LM_HEAD_PATHS})
    saved = sorted({k.module for k in keys if k.kind == "full" and not k.base_copy})
    return "+".join(["dora" if config.use_dora else "lora", *extra]
                    + ([f"modules_to_save:{':'.join(saved)}"] if saved else []))


def nonfinite_tensor(f: BinaryIO, tensors: dict[str, TensorInfo]) -> str | None:
    """The name of the first float tensor holding NaN or infinity in the safetensors file f, or None
    (reads the data section once, a tensor at a time)."""
    import numpy as np
    views = {"F16": np.float16, "F32": np.float32, "F64": np.float64}
    for name, info in sorted(tensors.items(), key=lambda kv: kv[1].start):
        if info.dtype not in FLOAT_DTYPES or info.nbytes == 0:
            continue
        f.seek(info.start)
        raw = f.read(info.nbytes)
        if info.dtype == "BF16":   # bf16: the high half of a float32
            arr = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            arr = np.frombuffer(raw, dtype=np.dtype(views[info.dtype]).newbyteorder("<"))
        if not np.isfinite(arr).all():
            return name
    return None
