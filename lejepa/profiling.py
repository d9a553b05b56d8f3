"""Peak memory of a piece of work, for memory tests and benchmarks.

:func:`peak_allocated_bytes` returns the high-water mark of tensor bytes allocated while ``run``
executes, above what was live before: on CUDA from the caching allocator's statistics, on CPU by
replaying the profiler's ``[memory]`` events (allocations positive, frees negative) in time order.
The CPU events are read from the profiler's Chrome trace (``profile.export_chrome_trace``, the
public route to the time-ordered allocation stream; ``profile.events()`` only keeps per-operator
sums, which miss transient peaks inside an operator).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

MEMORY_EVENT = "[memory]"
"""The name of the profiler's allocation / free events (``args.Bytes``: positive allocated, negative freed)."""


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
    live = peak = 0
    for nbytes in _memory_events(prof):
        live += nbytes
        peak = max(peak, live)
    return peak


def _memory_events(prof: profile) -> list[int]:
    """The bytes of each ``[memory]`` event of ``prof``'s trace, in time order (ties in trace order)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "trace.json"
        prof.export_chrome_trace(str(path))
        trace = json.loads(path.read_text())
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    memory = [e for e in events if e.get("name") == MEMORY_EVENT]
    return [int(e["args"]["Bytes"]) for e in sorted(memory, key=lambda e: float(e["ts"]))]
