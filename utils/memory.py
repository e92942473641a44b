"""Memory measurement for benchmarks: process RSS sampling and the peak of live tensor bytes.

* :class:`PeakRSS` samples ``/proc/self/statm`` in a thread: what the process really holds on the CPU
  (PyTorch CPU tensors come from malloc/mmap, so tracemalloc does not see them, and ``ru_maxrss`` is a
  process-lifetime maximum that model construction could dominate).
* :class:`LiveTensorPeak` counts the bytes of every tensor storage created by an op inside the block, frees
  them when the storage dies, and keeps the maximum: the figure ``torch.cuda.max_memory_allocated`` reports for
  the same code (minus the allocator's 512-byte rounding and library workspaces), machine-independent, and it
  works on the ``meta`` device, so the peak of a 512 px batch-8 step is known without running it.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["rss_bytes", "PeakRSS", "LiveTensorPeak"]


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Sample RSS in a background thread; ``peak - start`` is the extra memory of the measured block."""

    def __init__(self, interval: float = 0.0005):
        self.interval = interval

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def extra_mb(self) -> float:
        return (self.peak - self.start) / 2**20


class LiveTensorPeak(TorchDispatchMode):
    """``with LiveTensorPeak() as m: ...`` -> ``m.peak_bytes``: the most bytes of tensors created inside the
    block that were alive at the same time (forward, backward and ``.grad`` included; tensors that existed
    before the block, such as the weights, are not counted, nor are views of them). Views share their storage and
    count once."""

    def __init__(self) -> None:
        super().__init__()
        self._sizes: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.current_bytes = 0
        self.peak_bytes = 0

    def _release(self, nbytes: int) -> None:
        self.current_bytes -= nbytes

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        if storage in self._sizes:
            return
        nbytes = storage.nbytes()
        # The storage's Python object lives exactly as long as the storage (PyObject preservation), so a weak
        # reference to it tells when the memory is given back.
        self._sizes[storage] = nbytes
        weakref.finalize(storage, self._release, nbytes)
        self.current_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.current_bytes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        # Views and in-place ops return an input's storage: not new memory, also when that input (a weight, say)
        # was made before the block.
        inputs = [t.untyped_storage() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor) and not any(leaf.untyped_storage() is st for st in inputs):
                self._track(leaf)
        return out
