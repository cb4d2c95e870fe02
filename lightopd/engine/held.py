"""A trained student handed to the next stage in memory (lightopd rounds): train holds the model it
has just written, and the next load of that directory takes it instead of reading the files.

A held model is exactly what a load of the directory gives: its weights are held in the dtype the
directory was written in (only parameters and saved buffers are cast: a buffer a checkpoint does
not save, such as the rotary frequencies, stays as transformers made it, float32), and only while
the directory's config and weight files are the ones written then (their names, sizes and
modification times). A load takes it on the same device in that dtype, or in a wider one (a
bfloat16 model converted in place to float32 is exact); any other load reads the directory, as does
every load of a model that keeps some modules in float32 whatever its dtype. A load that trains
(`keep=False`) removes it, since training changes the weights in place; a load that samples leaves
it for the next stage. Holding is off unless a caller turns it on (`handing_over()`), so a plain
stage keeps no memory.
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
    if _SLOT["on"] and not _keeps_float32(model):
        _SLOT["held"] = (Path(directory).resolve(), _files(directory), _cast(model, dtype).eval())


def _keeps_float32(model) -> bool:
    """Whether transformers loads some of the model's modules in float32 whatever the dtype asked."""
    return bool(getattr(model, "_keep_in_fp32_modules", None) or getattr(model, "_keep_in_fp32_modules_strict", None))


def _cast(model, dtype: torch.dtype):
    """`model` with its floating parameters and saved buffers in `dtype`, in place (as a load in `dtype`
    makes them; buffers a checkpoint does not save keep their dtype, as a load leaves them)."""
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if param.is_floating_point() and param.dtype != dtype:
                param.data = param.data.to(dtype)
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is not None and buffer.is_floating_point() and buffer.dtype != dtype \
                    and name not in module._non_persistent_buffers_set:
                module._buffers[name] = buffer.to(dtype)
    return model


def take(directory: Path, device: torch.device, dtype: torch.dtype, attn_implementation: str | None, keep: bool):
    """The held model of `directory` on `device` in `dtype` (with that attention kernel, if named), or
    None (read the directory instead). `keep`: leave it held (the caller only reads it)."""
    if _SLOT["held"] is None:
        return None
    path, fingerprint, model = _SLOT["held"]
    held = next(model.parameters())
    index = device.index
    if index is None and device.type == "cuda":
        index = torch.cuda.current_device()  # (`cuda`: the current one)
    same_device = held.device.type == device.type and index in (None, held.device.index)
    kernel = attn_implementation in (None, getattr(model.config, "_attn_implementation", None))
    if path != Path(directory).resolve() or not same_device or not kernel \
            or fingerprint != _files(directory):
        return None
    if held.dtype != dtype:
        if dtype not in _WIDER.get(held.dtype, ()):
            return None  # narrowing would round the weights the next load must read exactly
        _cast(model, dtype)
    if not keep:
        _SLOT["held"] = None
    return model.eval()


def _files(directory: Path) -> list[tuple[str, int, int]]:
    """What a rewrite of the directory's config or weights changes: each file's name, size and mtime."""
    files = sorted([Path(directory) / "config.json", *Path(directory).glob("*.safetensors")])
    return [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()]
