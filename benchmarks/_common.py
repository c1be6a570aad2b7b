"""What every benchmark records about the machine it ran on."""

from __future__ import annotations

import platform

import torch


def machine_meta(note: str) -> dict:
    """Threads, torch build and CPU, plus a note on what was measured."""
    return {
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "mkldnn": torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled,
        "cpu": platform.processor() or platform.machine(), "note": note,
    }
