"""Peak bytes of the tensors an operation allocates, on CPU (no allocator statistics there).

Every op's outputs are seen through a ``TorchDispatchMode``; an output whose storage is new counts
its storage's bytes until the output tensor is garbage-collected (a view keeps its base alive
through ``_base``, and a view op's output shares a known storage, so it is not counted again).
The peak is the maximum of the running sum: what the operation held at once beyond its inputs.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class PeakTracker(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._ptrs = set()

    def _free(self, ptr: int, nbytes: int) -> None:
        self._ptrs.discard(ptr)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and not t._is_view():
                st = t.untyped_storage()
                ptr, nbytes = st.data_ptr(), st.nbytes()
                if nbytes and ptr not in self._ptrs:
                    self._ptrs.add(ptr)
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(t, self._free, ptr, nbytes)
        return out


def peak_bytes(fn, *args, **kwargs):
    """(result, peak bytes allocated while ``fn`` ran, the result's own bytes included)."""
    with PeakTracker() as tr:
        out = fn(*args, **kwargs)
    return out, tr.peak
