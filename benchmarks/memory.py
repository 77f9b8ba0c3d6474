"""Peak memory of one call, on CUDA (the caching allocator's counters) or the CPU (profiler events)."""
from __future__ import annotations

import torch


def peak_memory_bytes(fn, device: torch.device) -> int:
    """Peak bytes allocated by ``fn()`` above what was allocated before it ran."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    # CPU: replay the allocator's events in time order and take the running maximum.
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.events() if e.name == "[memory]"), key=lambda e: e.time_range.start)
    live = peak = 0
    for e in events:
        live += e.cpu_memory_usage
        peak = max(peak, live)
    return peak
