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
    # CPU: replay every allocation and free the profiler saw, in time order (kineto's raw
    # "[memory]" events carry the signed byte count), and take the running maximum.
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak
