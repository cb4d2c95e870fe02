"""LoRA (`train --lora-rank R`): low-rank adapters on the student's linear layers, through `peft`
(an optional extra), and only they train.

Adapters start with B = 0, so the first step's loss is the base model's. The trainer runs the
base model with the adapters injected in place (the decoder, output layer and everything else
as without LoRA); checkpoints and the output hold the adapter in peft's format
(adapter_config.json, adapter_model.safetensors), or with `--merge-lora` the output holds the
merged full weights, a plain transformers model. Resume loads the base student and the
checkpoint's adapter. Under --fsdp the base and the adapters are sharded together (float32
shards, computed in bf16 on CUDA); checkpoints hold each rank's shards of the adapters and their
optimizer state, and the output is gathered from them (a merge reads the base model again on
rank 0's CPU).
"""

from __future__ import annotations

import importlib.util
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from lightopd.config import TrainConfig
from lightopd.errors import InputError

PREFIX = "base_model.model."  # of the peft model's keys, before the base model's


def check_lora(cfg: TrainConfig) -> None:
    """Exit 2 before any work when LoRA is asked for and cannot run."""
    if not cfg.lora_rank:
        if cfg.merge_lora:
            raise InputError("--merge-lora: there is no adapter to merge without --lora-rank")
        return
    if importlib.util.find_spec("peft") is None:
        raise InputError("--lora-rank: the peft package is not installed; pip install 'lightopd[peft]'")


def settings(cfg: TrainConfig) -> dict:
    """What lightopd.json records of the adapter."""
    return {"rank": cfg.lora_rank, "alpha": alpha(cfg), "dropout": cfg.lora_dropout,
            "target_modules": cfg.lora_target_modules or "all-linear", "merged": cfg.merge_lora}


def alpha(cfg: TrainConfig) -> float:
    return cfg.lora_alpha if cfg.lora_alpha is not None else 2.0 * cfg.lora_rank


def add_adapters(model, cfg: TrainConfig, checkpoint: Path | None = None):
    """The peft model around `model`: new adapters, or a checkpoint's (trainable) to resume."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if checkpoint is not None:
        with _quiet():
            return PeftModel.from_pretrained(model, str(checkpoint), is_trainable=True)
    targets = cfg.lora_target_modules or "all-linear"
    config = LoraConfig(r=cfg.lora_rank, lora_alpha=alpha(cfg), lora_dropout=cfg.lora_dropout,
                        target_modules=targets if targets == "all-linear" else [t.strip() for t in targets.split(",")],
                        task_type="CAUSAL_LM")
    try:
        # drawn from the seed alone, whatever ran before (under FSDP rank 0 builds them twice: empty and real)
        with torch.random.fork_rng(devices=[]), _quiet():
            torch.manual_seed(cfg.seed)
            return get_peft_model(model, config)
    except ValueError as e:
        raise InputError(f"--lora-target-modules {targets}: {str(e).splitlines()[0]}") from None


@contextmanager
def _quiet():
    """peft reads a transformers attribute that transformers 5 deprecates: a warning the user can do
    nothing about, kept off their stderr."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def save_adapter(peft_model, directory: Path, weights: dict | None = None) -> None:
    """The adapter alone, in peft's format; `weights`: the adapters' full state dict (keys of the
    base model) when the model itself is sharded."""
    state = None if weights is None else {PREFIX + k: v for k, v in weights.items()}
    peft_model.save_pretrained(str(directory), safe_serialization=True, state_dict=state)


def merged(peft_model):
    """The base model with the adapters folded into its weights (a plain transformers model)."""
    return peft_model.merge_and_unload()


def merged_from(base, peft_model, weights: dict):
    """`merged` for a sharded `peft_model`: its adapters' full state dict `weights` put into
    adapters of the same settings on `base`, a full copy of the base model, then folded in."""
    from peft import get_peft_model

    with _quiet():
        adapted = get_peft_model(base, peft_model.peft_config[peft_model.active_adapter])
    result = adapted.get_base_model().load_state_dict(weights, strict=False)
    adapters = [k for k in adapted.get_base_model().state_dict() if "lora_" in k]
    if result.unexpected_keys or set(adapters) - set(weights):
        raise RuntimeError(f"the gathered adapters do not fit the base model (unexpected {result.unexpected_keys[:3]}, "
                           f"missing {sorted(set(adapters) - set(weights))[:3]})")
    return adapted.merge_and_unload()
