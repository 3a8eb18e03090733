"""Shared by the benchmarks: where one call's time goes, as torch.profiler's top ops."""
from __future__ import annotations

import torch


def profile_top(label: str, fn, device: torch.device, rows: int = 12, warmup: bool = False) -> None:
    """Print the ops of one `fn()` call with the most self device time (self CPU time on a CPU); `warmup` runs it
    once first, unprofiled."""
    cuda = device.type == "cuda"
    if warmup:
        fn()
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize(device)
    with torch.profiler.profile(activities=acts) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize(device)
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    print(f"== {label}: top ops by {key}\n" + prof.key_averages().table(sort_by=key, row_limit=rows,
                                                                        max_name_column_width=60), flush=True)
