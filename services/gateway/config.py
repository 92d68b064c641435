"""The gateway's one config object: only the flags it honours (no gRPC server of its own)."""

from __future__ import annotations

from dataclasses import dataclass

from services.common.config import check, event_loop_flag, flag


@dataclass(slots=True)
class GatewayConfig:
    host: str = flag("127.0.0.1", "address to listen on")
    port: int = flag(8000, "HTTP port to listen on (0 -> any free port)")
    grace_seconds: float = flag(10.0, "how long SIGTERM waits for in-flight requests")
    log_level: str = flag("info", "log level", choices=("debug", "info", "warning", "error"))
    event_loop: str = event_loop_flag()
    router: str = flag(None, "router address HOST:PORT (generation goes there)", required=True)
    registry: str = flag("", "registry address HOST:PORT: adapters in /v1/models, load/unload_lora_adapter "
                         "(empty -> only the base model is listed)")
    token: str = flag("", "bearer token of the gateway's own calls (learning the base model); a caller's "
                      "own Authorization header is what its requests carry")
    tls_cert: str = flag("", "PEM certificate: serve HTTPS (also the client certificate for mutual TLS)")
    tls_key: str = flag("", "PEM private key of --tls-cert")
    tls_ca: str = flag("", "PEM CA: require HTTPS client certificates it signed, and verify the router "
                       "and registry")
    served_model_name: str = flag("", "the base model's name in /v1/models and in `model` "
                                  "(empty -> the model directory's name)")
    base_model: str = flag("", "base model directory: its tokenizer.json (logprob token strings, chat "
                           "prompts) and tokenizer_config.json chat_template (empty -> the directory the "
                           "executors report, when it exists on this machine)")
    request_timeout_s: float = flag(600.0, "deadline of each generation, passed on to the router, seconds")
    multiplex_streams: bool = flag(True, "send streamed generations to the router over one GenerateStreams "
                                   "call, answered in batches (off: one GenerateStream call per request)")
    max_body_bytes: int = flag(4 * 1024 * 1024, "largest request body accepted (larger -> 413)")
    max_n: int = flag(16, "largest `n` (choices per prompt) and prompts x n per request")
    default_max_tokens: int = flag(0, "max_tokens when a request gives none (0 -> up to the end of the "
                                   "context, as OpenAI and vLLM)")
    models_cache_s: float = flag(1.0, "how long /v1/models reuses the registry's adapter list, seconds")

    def __post_init__(self) -> None:
        check(0 <= self.port <= 65535, "port", f"must be 0..65535, got {self.port}")
        check(bool(self.host), "host", "must not be empty")
        check(self.grace_seconds >= 0, "grace_seconds", "must be >= 0")
        check(bool(self.tls_cert) == bool(self.tls_key), "tls_cert" if not self.tls_cert else "tls_key",
              "--tls-cert and --tls-key go together")
        check(not self.tls_ca or bool(self.tls_cert), "tls_ca", "needs --tls-cert and --tls-key")
        check(bool(self.router), "router", "is required")
        check(self.request_timeout_s > 0, "request_timeout_s", "must be > 0")
        check(self.max_body_bytes > 0, "max_body_bytes", "must be > 0")
        check(1 <= self.max_n <= 1024, "max_n", f"must be 1..1024, got {self.max_n}")
        check(self.default_max_tokens >= 0, "default_max_tokens", "must be >= 0")
        check(self.models_cache_s >= 0, "models_cache_s", "must be >= 0")
