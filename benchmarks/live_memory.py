"""Peak live tensor memory, counted by torch itself rather than read from the process's resident
memory: independent of the C allocator (glibc's mmap threshold, jemalloc, ...) that decides how
much freed memory stays resident.

    with LiveTensorPeak() as live:
        build_gated_graph(a_ii, o_ii)
    live.peak   # bytes: the most tensor storage created inside the block and alive at one time

Every operator's new outputs (not views, not in-place results: outputs whose schema aliases an
input are skipped) are counted from creation until their storage is freed. What an operator
allocates and frees inside its own C++ code (workspaces) is not seen, and storages that existed
before the block (the inputs) never count. On a GPU the CUDA caching allocator keeps the same count
itself: torch.cuda.max_memory_allocated (bench_core.Peak).
"""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

_SPARSE_PARTS = ("crow_indices", "col_indices", "ccol_indices", "row_indices", "values", "_indices", "_values")


def _storages(t: torch.Tensor):
    if t.layout == torch.strided:
        return [t.untyped_storage()]
    out = []
    for name in _SPARSE_PARTS:  # compressed / COO tensors: their index and value tensors
        try:
            out.append(getattr(t, name)().untyped_storage())
        except (RuntimeError, AttributeError, NotImplementedError):
            pass
    return out


class LiveTensorPeak(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._alive: dict[int, int] = {}

    def _freed(self, key: int) -> None:
        self.live -= self._alive.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(r.alias_info is not None for r in func._schema.returns):
            return out  # a view or an in-place / out= result: no new memory
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            for storage in _storages(t):
                size, key = storage.nbytes(), id(storage)
                if size == 0 or key in self._alive:
                    continue
                self._alive[key] = size
                self.live += size
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._freed, key)
        return out
