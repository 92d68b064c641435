"""The gateway's one config object."""

from __future__ import annotations

from dataclasses import dataclass

from services.common.config import ServerConfig, check, flag


@dataclass(slots=True)
class GatewayConfig(ServerConfig):
    port: int = flag(8000, "HTTP port to listen on (0 -> any free port)")
    router: str = flag(None, "router address HOST:PORT (generation goes there)", required=True)
    registry: str = flag("", "registry address HOST:PORT: adapters in /v1/models, load/unload_lora_adapter "
                         "(empty -> only the base model is listed)")
    served_model_name: str = flag("", "the base model's name in /v1/models and in `model` "
                                  "(empty -> the model directory's name)")
    base_model: str = flag("", "base model directory: its tokenizer.json (logprob token strings, chat "
                           "prompts) and tokenizer_config.json chat_template (empty -> the directory the "
                           "executors report, when it exists on this machine)")
    request_timeout_s: float = flag(600.0, "deadline of each generation, passed on to the router, seconds")
    max_body_bytes: int = flag(4 * 1024 * 1024, "largest request body accepted (larger -> 413)")
    max_n: int = flag(16, "largest `n` (choices per prompt) and prompts x n per request")
    default_max_tokens: int = flag(16, "max_tokens of /v1/completions when a request gives none "
                                   "(OpenAI's default; chat uses the executors' default)")
    models_cache_s: float = flag(1.0, "how long /v1/models reuses the registry's adapter list, seconds")

    def __post_init__(self) -> None:
        ServerConfig.__post_init__(self)
        check(bool(self.router), "router", "is required")
        check(self.request_timeout_s > 0, "request_timeout_s", "must be > 0")
        check(self.max_body_bytes > 0, "max_body_bytes", "must be > 0")
        check(1 <= self.max_n <= 1024, "max_n", f"must be 1..1024, got {self.max_n}")
        check(self.default_max_tokens > 0, "default_max_tokens", "must be > 0")
        check(self.models_cache_s >= 0, "models_cache_s", "must be >= 0")
