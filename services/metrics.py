"""Process and device memory figures that every stage reports in its info metadata."""

from __future__ import annotations

import resource
import sys

import torch


def memory_snapshot() -> dict[str, str]:
    """Peak resident memory of this process and, on CUDA, the peak and current allocated device memory."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak_bytes = peak if sys.platform == "darwin" else peak * 1024
    out = {"peak_rss_bytes": str(peak_bytes)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda_peak_allocated_bytes"] = str(torch.cuda.max_memory_allocated())
        out["cuda_allocated_bytes"] = str(torch.cuda.memory_allocated())
        out["cuda_peak_reserved_bytes"] = str(torch.cuda.max_memory_reserved())
    return out
