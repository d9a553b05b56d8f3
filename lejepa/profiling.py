"""Peak memory of a piece of work, for memory tests and benchmarks.

:func:`peak_allocated_bytes` returns the high-water mark of tensor bytes allocated while ``run``
executes, above what was live before: on CUDA from the caching allocator's statistics, on CPU by
replaying the profiler's ``[memory]`` events (allocations positive, frees negative) in time order.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile


def peak_allocated_bytes(run: Callable[[], object], device: torch.device | str = "cpu") -> int:
    """Peak of live tensor bytes allocated while ``run()`` executes."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        run()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak
