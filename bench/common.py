"""Shared pieces of the benchmarks: a machine description and a realistic-vocabulary model."""

from __future__ import annotations

import os
import platform
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


def make_bench_model(path: Path, vocab: int = 32000, hidden: int = 256, layers: int = 4, seed: int = 0) -> Path:
    """A Llama-shaped model with a realistic (32k) word-level vocabulary, saved like a real checkpoint."""
    words = default_words(vocab - len(SPECIALS) - 6)
    return make_model(path, words, hidden=hidden, layers=layers, context=1024, seed=seed)
