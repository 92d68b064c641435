"""What a tenant sees of the registry: its own adapters and the public ones.

Lists are filled by scanning the core's pages and keeping the rows the caller may see; page tokens
are the core's (the last id returned), so paging works the same for everyone and under any store's
ordering. The scan is O(adapters in the registry) per tenant page: fine to tens of thousands.
Another tenant's private adapter answers exactly what an unknown id does (NOT_FOUND, same words);
a public one may be read and run but not changed or deleted (PERMISSION_DENIED).
"""

from __future__ import annotations

from services.common import auth
from services.registry.core import DEFAULT_PAGE, MAX_PAGE, AdapterRegistry, _encode_token


def visible(ident: auth.Identity, record) -> bool:
    return ident.owns(record.adapter_id) or record.public


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
        out += [r for r in rows if visible(ident, r)]
        if len(out) > size:
            return out[:size], _encode_token(out[size - 1].adapter_id)
        if not token:
            return out, ""


def is_public(core: AdapterRegistry, adapter_id: str) -> bool:
    latest = core.metadata.get(adapter_id, 0)
    return latest is not None and latest.public


def auth_get(core: AdapterRegistry, adapter_id: str, version: int = 0, timeout: float | None = None):
    """core.get for the caller: another tenant's adapter only when public (and never imported on
    demand for it)."""
    if not auth.owns_checked(adapter_id) and not is_public(core, adapter_id):
        raise auth.not_found(adapter_id)
    return core.get(adapter_id, version, timeout)


def auth_delete(core: AdapterRegistry, adapter_id: str, version: int = 0):
    if not auth.owns_checked(adapter_id):
        raise auth.not_yours(adapter_id) if is_public(core, adapter_id) else auth.not_found(adapter_id)
    return core.delete(adapter_id, version)
