"""A trained student handed to the next stage in memory (lightopd rounds): train holds the model it
has just written, and the next load of that directory takes it instead of reading the files.

A held model's weights are exactly the directory's: it is held in the dtype the directory was
written in, and only while the directory's config and weight files are the ones written then (their
names, sizes and modification times). A load takes
it on the same device in that dtype, or in a wider one (a bfloat16 model converted in place to
float32 is exact); any other load reads the directory. A load that trains (`take=True`) removes it,
since training changes the weights in place; a load that samples leaves it for the next stage.
Holding is off unless a caller turns it on (`handing_over()`), so a plain stage keeps no memory.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

_SLOT: dict = {"on": False, "held": None}  # held: (directory, fingerprint, model)
_WIDER = {torch.bfloat16: {torch.float32}, torch.float16: {torch.float32}}


@contextlib.contextmanager
def handing_over():
    """Within it, train holds the model it writes and loads may take it; after it, nothing is held."""
    _SLOT["on"], _SLOT["held"] = True, None
    try:
        yield
    finally:
        _SLOT["on"], _SLOT["held"] = False, None


def hold(directory: Path, model, dtype: torch.dtype) -> None:
    """Hold `model` as `directory`'s (just written from it, in `dtype`), converting it in place."""
    if _SLOT["on"]:
        _SLOT["held"] = (Path(directory).resolve(), _files(directory), model.to(dtype).eval())


def take(directory: Path, device: torch.device, dtype: torch.dtype, attn_implementation: str | None, keep: bool):
    """The held model of `directory` on `device` in `dtype` (with that attention kernel, if named), or
    None (read the directory instead). `keep`: leave it held (the caller only reads it)."""
    if _SLOT["held"] is None:
        return None
    path, fingerprint, model = _SLOT["held"]
    held = next(model.parameters())
    same_device = held.device.type == device.type and device.index in (None, held.device.index)
    kernel = attn_implementation in (None, getattr(model.config, "_attn_implementation", None))
    if path != Path(directory).resolve() or not same_device or not kernel \
            or fingerprint != _files(directory):
        return None
    if held.dtype != dtype:
        if dtype not in _WIDER.get(held.dtype, ()):
            return None  # narrowing would round the weights the next load must read exactly
        model.to(dtype)
    if not keep:
        _SLOT["held"] = None
    return model.eval()


def _files(directory: Path) -> list[tuple[str, int, int]]:
    """What a rewrite of the directory's config or weights changes: each file's name, size and mtime."""
    files = sorted([Path(directory) / "config.json", *Path(directory).glob("*.safetensors")])
    return [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()]
