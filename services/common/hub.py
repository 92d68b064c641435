"""The Hugging Face Hub, as the registry (hf:// sources) and the executor (a hub id as --base-model)
reach it: its log lines once, as JSON, and a fast answer on a machine without network.

huggingface_hub retries a failed connection five times with backoff (about 25 s) and puts a plain
handler on its own logger, so each "Retrying in 2s" warning appeared twice (once as plain text
between the JSON lines). `import_hub()` drops that handler (its records reach the root JSON handler
once); `unreachable(endpoint)` checks the endpoint's host resolves and accepts a TCP connection
within a few seconds before any download starts, and says why not.
"""

from __future__ import annotations

import os
import socket
import urllib.parse

DEFAULT_ENDPOINT = "https://huggingface.co"
# how long the reachability probe may take (DNS answers or refusals come back in milliseconds)
PROBE_TIMEOUT_S = 5.0
_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def import_hub():
    """huggingface_hub, its library logger without its own handler (records go to the root's)."""
    import huggingface_hub
    from huggingface_hub.utils import logging as hub_logging  # importing it added the handler
    root = hub_logging._get_library_root_logger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.propagate = True
    return huggingface_hub


def endpoint_of(endpoint: str | None = None) -> str:
    return (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def unreachable(endpoint: str | None = None, timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """Why the hub at `endpoint` (default HF_ENDPOINT, else huggingface.co) cannot be reached from
    here, or None. Behind a proxy (HTTPS_PROXY etc.) the host is the proxy's to resolve: None."""
    if any(os.environ.get(name) for name in _PROXY_VARS):
        return None
    url = urllib.parse.urlsplit(endpoint_of(endpoint))
    host = url.hostname
    if not host:
        return f"{endpoint_of(endpoint)!r} is not a URL"
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return None
    except socket.gaierror as exc:
        return f"cannot resolve {host} ({exc.strerror}): no network or no DNS on this machine?"
    except TimeoutError:
        return f"no answer from {host}:{port} within {timeout_s:.0f}s"
    except OSError as exc:
        return f"cannot connect to {host}:{port} ({exc.strerror or exc})"
