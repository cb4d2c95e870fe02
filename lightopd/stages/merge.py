"""Stage `merge`: a LoRA adapter (train --lora-rank R without --merge-lora) folded into its base
model and written as a plain transformers model, as `train --merge-lora` would have written it.

The base is the one the adapter records (its lightopd.json's `parent`, else peft's
`base_model_name_or_path`) or `--base`; it is loaded on the CPU in float32, the adapter is applied
with peft and folded in, and the result is saved in the base's own dtype with the adapter's
tokenizer and provenance (its `lora.merged` set, `merged_from` naming the adapter), so the
teacher-consistency record carries over. `eval --model ADAPTER` evaluates an adapter the same way,
through a merged copy in a temporary directory.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import warnings
from pathlib import Path

import torch

from lightopd.engine import models
from lightopd.errors import InputError
from lightopd.merge_config import MergeConfig
from lightopd.provenance import model_fingerprint, read_provenance
from lightopd.training.checkpoints import save_model, saved_dtype

ADAPTER_CONFIG = "adapter_config.json"


def is_adapter(path: str | Path) -> bool:
    """Whether `path` is a LoRA adapter directory rather than a model."""
    path = Path(path)
    return (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").is_file()


def base_of(adapter: Path, base: str | None, what: str) -> Path:
    """The adapter's base model directory: `base`, else the one it records (the directory it was trained
    from, else its Hub id at the recorded commit, else peft's record). InputError if it is gone, or if
    its weights are not the ones the adapter was trained on (the recorded fingerprint)."""
    hint = "give it with `lightopd merge ADAPTER --base MODEL --out DIR`"
    parent = (read_provenance(adapter) or {}).get("parent") or {}
    if base is None:
        try:
            recorded = json.loads((adapter / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
        except (OSError, ValueError) as e:
            raise InputError(f"{what} {adapter}: unreadable {ADAPTER_CONFIG} ({e})") from None
        hub = f"{parent['hub_id']}@{parent['commit']}" if parent.get("hub_id") and parent.get("commit") else None
        local = parent.get("path") if parent.get("path") and Path(parent["path"]).is_dir() else None
        base = local or hub or parent.get("hub_id") or parent.get("path") or recorded
        if not base:
            raise InputError(f"{what} {adapter}: the adapter names no base model; {hint}")
        try:
            found = models.check_model_dir(base, "the adapter's base")
        except InputError as e:
            raise InputError(f"{what} {adapter}: {e}; {hint}") from None
    else:
        found = models.check_model_dir(base, "--base")
    trained_on = parent.get("fingerprint")
    if trained_on and model_fingerprint(found) != trained_on:
        raise InputError(f"{what} {adapter}: the base {base} is not the model it was trained on (fingerprint "
                         f"{model_fingerprint(found)}, the adapter records {trained_on}); {hint}")
    return found


def merge(adapter: str | Path, out: Path, base: str | None = None, trust_remote_code: bool = False,
          what: str = "--adapter") -> dict:
    """Write the merged model of `adapter` to `out` (new); returns what was merged."""
    adapter = Path(adapter)
    if not is_adapter(adapter):
        raise InputError(f"{what} {adapter}: not a LoRA adapter directory (no {ADAPTER_CONFIG} without a config.json)")
    if importlib.util.find_spec("peft") is None:
        raise InputError(f"{what} {adapter}: merging a LoRA adapter needs peft: pip install 'lightopd[peft]'")
    base_dir = base_of(adapter, base, what)
    from peft import PeftModel

    model = models.load_model(base_dir, torch.device("cpu"), torch.float32, trust_remote_code, "--base")
    try:
        with warnings.catch_warnings():  # peft's calls of transformers' deprecated names are not the user's concern
            warnings.simplefilter("ignore", FutureWarning)
            merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise InputError(f"{what} {adapter}: does not fit the base model {base_dir} ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:300]})") from None
    tokenizer = models.load_tokenizer(adapter if (adapter / "tokenizer_config.json").is_file() else base_dir,
                                      trust_remote_code)
    provenance = read_provenance(adapter) or {}
    lora = provenance.get("lora") if isinstance(provenance.get("lora"), dict) else {}
    provenance = {**provenance, "lora": {**lora, "merged": True}, "merged_from": str(adapter.resolve()),
                  "merged_base": str(base_dir.resolve())}
    dtype = saved_dtype(base_dir)
    tmp = out.with_name(f".{out.name}.tmp")  # written beside OUT and renamed: never half a model in OUT
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_model(tmp, merged, tokenizer, provenance, None, dtype)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    tmp.rename(out)
    return {"adapter": str(adapter), "base": str(base_dir), "dtype": str(dtype).removeprefix("torch.")}


def run(cfg: MergeConfig) -> dict:
    out = Path(cfg.out)
    if out.exists():
        raise InputError(f"--out {out}: exists; choose a new directory")
    if not out.parent.is_dir():
        raise InputError(f"--out {out}: no such directory {out.parent}")
    merged = merge(cfg.adapter, out, cfg.base, cfg.trust_remote_code, "merge")
    return {"command": "merge", "model": str(out), **merged}
