"""gpu_state.py - the card's SM clock and board power, read while a benchmark runs.

Both cards we measure on sit at their power limit under sustained load and lower their SM clock
(bench/NOTES.md), so each benchmark records clock and power next to its timings.
"""
import subprocess

import torch


def gpu_state():
    """(SM MHz, board W) now, through NVML (torch.cuda) or nvidia-smi; nan where neither works.
    (CUDA_VISIBLE_DEVICES remapping is ignored: the benchmark machine has one card.)"""
    try:
        return float(torch.cuda.clock_rate()), torch.cuda.power_draw() / 1e3
    except Exception:  # no pynvml: ask nvidia-smi
        pass
    try:
        q = subprocess.run(["nvidia-smi", "-i", str(torch.cuda.current_device()),
                            "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader,nounits"],
                           capture_output=True, text=True, timeout=5).stdout.split(",")
        return float(q[0]), float(q[1])
    except Exception:
        return float("nan"), float("nan")
