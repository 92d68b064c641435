"""Host page memory for what the CPU kernels read in place (the adapter arena, a CPU device tier).

    pages = host_pages((num_pages, page_elems), dtype)   # uninitialised, like torch.empty

lora_paged_add_ reads a batch's adapters as pages scattered over the arena: one 4 KiB TLB entry per
page read, and a miss nearly every page once the arena is larger than the TLB reaches (~12 MiB). Here
the memory is 2 MiB-aligned and advised for transparent huge pages (madvise MADV_HUGEPAGE; Linux with
THP in "madvise" or "always" mode), so one entry covers 2 MiB of pages: the paged op reads scattered
pages ~15% faster (benchmarks/kernel.py decode). Untouched memory stays unbacked, as with torch.empty;
a touched huge page is 2 MiB resident. Elsewhere (another OS, THP off, small sizes) it is torch.empty.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

import torch
from torch import Tensor

HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14
_libc = None


def _madvise_huge(addr: int, length: int) -> bool:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return _libc.madvise(ctypes.c_void_p(addr), ctypes.c_size_t(length), _MADV_HUGEPAGE) == 0


def host_pages(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """An uninitialised contiguous CPU tensor of `shape`, 2 MiB-aligned and advised for huge pages
    where the OS has them (and the size is at least one huge page); else torch.empty(shape)."""
    numel = 1
    for n in shape:
        numel *= n
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    if not sys.platform.startswith("linux") or nbytes < HUGE_PAGE:
        return torch.empty(shape, dtype=dtype)
    raw = torch.empty(nbytes + HUGE_PAGE, dtype=torch.uint8)
    start = -raw.data_ptr() % HUGE_PAGE
    try:
        _madvise_huge(raw.data_ptr() + start, nbytes - nbytes % HUGE_PAGE)
    except (OSError, AttributeError):   # no libc to ask: ordinary pages
        pass
    return raw[start:start + nbytes].view(dtype).view(shape)
