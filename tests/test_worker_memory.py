"""The worker gives its freed heap back (vllm_e3.worker.HeapTrim; found by the soak)."""
import torch
from vllm_e3.worker import HeapTrim

def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20

def test_heap_trim_returns_freed_heap_pages():
    # 64 KiB tensors sit in glibc's heap (below its mmap threshold); freeing
    # every other one leaves ~128 MB of free chunks between live ones, which
    # only malloc_trim gives back
    keep = [torch.ones(16384) for _ in range(4096)]
    del keep[::2]
    before = rss_mb()
    HeapTrim(every_s=0.0).maybe()
    assert before - rss_mb() > 64, (before, rss_mb())
    HeapTrim(every_s=3600.0).maybe()   # not due: a no-op
