"""The CPU gradient cache: the fused losses' large gradient buffers, recycled.

On CPU, glibc hands out every buffer over 32 MiB as fresh memory and the first
write to it faults in each page: for an N×V fp32 gradient (2 GB at N=4096,
V=128256) that costs 0.5–1.5 s on a small VM, several times the fused pass
itself. The cpp kernels therefore take their gradient buffers (8 MiB and
over) from a cache: once a step's backward has consumed a gradient, its block
stays resident, idle, and the next step's gradient reuses it without a page
fault. This is what PyTorch's CUDA caching allocator does on the GPU, and
these functions mirror ``torch.cuda.empty_cache`` and friends.

Idle blocks are capped at a byte limit: a quarter of physical memory unless
``FASTDISTILL_CPU_CACHE_MB`` (read the first time the cache is used) or
:func:`set_limit` says otherwise; 0 turns the cache off. Peak memory within
a step is unchanged: the cache only keeps what the step needed anyway.
"""
from __future__ import annotations

import math
import numbers

import torch

from . import _backend


_STATS = ("idle_bytes", "idle_blocks", "live_bytes", "live_blocks", "hits", "misses", "limit_bytes")


def _ops():
    """The cache's ops, or None when the C++ extension is not loaded (no cache then)."""
    return torch.ops.fastdistill if _backend._state.get("cpp") else None


# The largest byte count a tensor (an int64 numel times its element size) and
# the cache's int64 bookkeeping can hold.
MAX_BYTES = 2**63 - 1


def _checked_size(size, dtype) -> list[int]:
    """``size`` as a list of ints, with its exact byte count checked before the
    C++ side multiplies it: a wrapped product would map a small block under a
    huge tensor, and reading it would crash the process."""
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"empty: dtype must be a torch.dtype, got {type(dtype).__name__}")
    if isinstance(size, int) and not isinstance(size, bool):
        size = (size,)
    try:
        dims = list(size)
    except TypeError:
        raise TypeError(f"empty: size must be an int or a sequence of ints, got "
                        f"{type(size).__name__}") from None
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, numbers.Integral):
            raise TypeError(f"empty: size must hold ints, got {type(d).__name__} in {tuple(dims)}")
    dims = [int(d) for d in dims]
    if any(d < 0 for d in dims):
        raise ValueError(f"empty: size must be >= 0, got {tuple(dims)}")
    nbytes = math.prod(dims) * torch.empty((), dtype=dtype).element_size()
    if max(dims, default=0) > MAX_BYTES or nbytes > MAX_BYTES:
        raise ValueError(f"empty: size {tuple(dims)} of {dtype} is {nbytes} bytes, over the "
                         f"{MAX_BYTES} a tensor can address")
    return dims


def empty(size, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """An uninitialised contiguous tensor, from the cache when it is a CPU tensor
    of 8 MiB or more (the cpp kernels' gradients come from the same cache).
    A traced graph (torch.compile) gets a plain ``torch.empty``."""
    dims = _checked_size(size, dtype)
    ops = _ops()
    if (ops is not None and torch.device(device or "cpu").type == "cpu"
            and not torch.compiler.is_compiling()):
        return ops.cpu_cache_new(dims, dtype)
    return torch.empty(dims, dtype=dtype, device=device)


def empty_like(t: torch.Tensor) -> torch.Tensor:
    """``empty`` with the shape, dtype and device of ``t``."""
    return empty(t.shape, t.dtype, t.device)


def memory_stats() -> dict[str, int]:
    """The cache's state: idle and live bytes and blocks, hits, misses, the limit."""
    ops = _ops()
    values = ops.cpu_cache_stats() if ops is not None else [0] * len(_STATS)
    return dict(zip(_STATS, values))


def idle_bytes() -> int:
    """Bytes resident in the cache that no tensor uses now."""
    return memory_stats()["idle_bytes"]


def empty_cache() -> None:
    """Give every idle block back to the OS (live gradients are untouched)."""
    ops = _ops()
    if ops is not None:
        ops.cpu_cache_empty()


def set_limit(nbytes: int) -> None:
    """Keep at most ``nbytes`` of idle blocks (0: keep none, the cache is off)."""
    if isinstance(nbytes, bool) or not isinstance(nbytes, int):
        raise TypeError(f"set_limit: nbytes must be an int, got {type(nbytes).__name__}")
    if not 0 <= nbytes <= MAX_BYTES:
        raise ValueError(f"set_limit: nbytes must be in [0, 2**63 - 1], got {nbytes}")
    if not _backend.load_extension():
        return
    torch.ops.fastdistill.cpu_cache_set_limit(nbytes)
