"""Shared pieces of the benchmarks: a machine description and a realistic-vocabulary model."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path

import torch

from lightopd.tiny import SPECIALS, default_words, make_model


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def make_bench_model(path: Path, vocab: int = 32000, hidden: int = 256, layers: int = 4, seed: int = 0,
                     context: int = 1024) -> Path:
    """A Llama-shaped model with a realistic (32k) word-level vocabulary, saved like a real checkpoint."""
    words = default_words(vocab - len(SPECIALS) - 6)
    return make_model(path, words, hidden=hidden, layers=layers, context=context, seed=seed)


def peak_rss_mb(command: list[str]) -> float:
    """Run `command` and return its peak resident memory (VmHWM, polled from /proc until it exits).

    getrusage(RUSAGE_CHILDREN) would report the parent's size for a child forked from a large
    parent, since the high-water mark survives exec.
    """
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak_kb = 0
    while proc.poll() is None:
        try:
            for line in open(f"/proc/{proc.pid}/status"):
                if line.startswith("VmHWM:"):
                    peak_kb = max(peak_kb, int(line.split()[1]))
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
    if proc.returncode != 0:
        raise RuntimeError(f"{command[:4]} exited {proc.returncode}")
    return peak_kb / 1024
