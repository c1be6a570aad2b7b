"""What every benchmark records about the machine it ran on."""

from __future__ import annotations

import os
import platform
import time

import torch

from tumorseg.models.fastconv import cpu_name


def machine_meta(note: str) -> dict:
    """Threads, torch build and CPU, plus a note on what was measured."""
    return {
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "mkldnn": torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled,
        "cpu": cpu_name(), "machine": platform.machine(), "cpu_count": os.cpu_count(),
        "note": note,
    }


def median_seconds(fn, repeats: int) -> float:
    """Median seconds of `repeats` calls of fn(), after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]
