"""Peak memory of a block of work, as the paper's Table 9 counts it (VRAM during inference, everything included).

On CUDA `torch.cuda.max_memory_allocated` alone misses what faiss-gpu allocates (its indexes and each
`StandardGpuResources`' scratch memory): the peak is torch's peak allocation plus the device memory in use outside
torch's allocator at the block's end (`torch.cuda.mem_get_info`'s used memory minus torch's reserved memory: the
CUDA context, cuBLAS workspaces, faiss-gpu), as `nvidia-smi` would count it; the device must not be shared with
other processes. On the CPU it is the peak anonymous resident memory (RssAnon, sampled): the memory-mapped key
files' pages are page cache, which the kernel drops under pressure, and counting them would count the keys twice
beside the index's copy. Both are absolute (everything alive counts, loaded before the block or not), so a block
can hold just the inference, after the loading's transient buffers are freed:

    lm = make_lm(...)
    with PeakMemory(device) as peak:
        evaluate(lm)
        figures = peak.measure()  # while lm (and its faiss resources) still exist
"""

from __future__ import annotations

import ctypes
import gc
import threading

import torch


def trim() -> None:
    """Collect, and hand freed heap back to the OS, so that one block's peak is not an earlier one's leftovers."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def rss_anon() -> int | None:
    """This process's anonymous resident bytes (Linux), None where unknown."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))
    except (OSError, StopIteration):
        return None


class PeakMemory:
    """Context manager; `measure()` (inside the block, while what is measured is alive) returns a dict:
    peak_bytes, and on CUDA torch_peak_bytes and outside_torch_bytes (faiss-gpu) too. peak_bytes is None where
    the platform says nothing (no /proc)."""

    interval_s = 0.02

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"

    def __enter__(self) -> "PeakMemory":
        trim()
        self._peak, self._stop, self._thread = None, threading.Event(), None
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        elif rss_anon() is not None:
            self._peak = rss_anon()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._peak = max(self._peak, rss_anon() or 0)

    def measure(self) -> dict:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            free, total = torch.cuda.mem_get_info(self.device)
            outside = max(0, total - free - torch.cuda.memory_reserved(self.device))
            torch_peak = torch.cuda.max_memory_allocated(self.device)
            return {"peak_bytes": torch_peak + outside, "torch_peak_bytes": torch_peak, "outside_torch_bytes": outside}
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._peak = max(self._peak, rss_anon() or 0)
        return {"peak_bytes": self._peak}

    def __exit__(self, *exc) -> None:
        self._stop.set()
