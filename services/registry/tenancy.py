"""What a tenant sees of the registry: ListAdapters narrowed to the caller's own adapters.

Pages are filled by scanning the core's pages and keeping the caller's rows; page tokens are the
core's (the last id returned), so paging works the same for everyone and under any store's ordering.
The scan is O(adapters in the registry) per tenant page: fine to tens of thousands of adapters.
"""

from __future__ import annotations

from services.common import auth
from services.registry.core import DEFAULT_PAGE, MAX_PAGE, AdapterRegistry, _encode_token


def auth_list(core: AdapterRegistry, page_size: int = 0, page_token: str = "", base_model: str = "",
              label_selector: str = "", ident: auth.Identity | None = None):
    """core.list, holding only the adapters `ident` (default: the caller) may see."""
    ident = ident or auth.current()
    if ident.sees_all:
        return core.list(page_size, page_token, base_model, label_selector)
    size = min(page_size or DEFAULT_PAGE, MAX_PAGE)
    out, token = [], page_token
    while True:
        rows, token = core.list(MAX_PAGE, token, base_model, label_selector)
        out += [r for r in rows if ident.owns(r.adapter_id)]
        if len(out) > size:
            return out[:size], _encode_token(out[size - 1].adapter_id)
        if not token:
            return out, ""
