"""LoRA (`train --lora-rank R`): low-rank adapters on the student's linear layers, through `peft`
(an optional extra), and only they train.

The default targets (`all-linear`) are every linear layer but the output layer and the routers of
MoE blocks, found by what they are (default_targets, is_router); a target list that reaches a
router is refused.

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
from lightopd.progress import warn

PREFIX = "base_model.model."  # of the peft model's keys, before the base model's
ALL_LINEAR = "all-linear"  # the default targets (default_targets)


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
            "target_modules": cfg.lora_target_modules or ALL_LINEAR, "merged": cfg.merge_lora}


def alpha(cfg: TrainConfig) -> float:
    return cfg.lora_alpha if cfg.lora_alpha is not None else 2.0 * cfg.lora_rank


def add_adapters(model, cfg: TrainConfig, checkpoint: Path | None = None, quiet: bool = False):
    """The peft model around `model`: new adapters, or a checkpoint's (trainable) to resume. `quiet`: no
    warning (a second build of the same adapters, under FSDP)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if checkpoint is not None:
        with _quiet():
            return PeftModel.from_pretrained(model, str(checkpoint), is_trainable=True)
    named = cfg.lora_target_modules if cfg.lora_target_modules not in (None, ALL_LINEAR) else None
    targets = [t.strip() for t in named.split(",")] if named else default_targets(model)
    config = LoraConfig(r=cfg.lora_rank, lora_alpha=alpha(cfg), lora_dropout=cfg.lora_dropout,
                        target_modules=targets, task_type="CAUSAL_LM")
    try:
        # drawn from the seed alone, whatever ran before (under FSDP rank 0 builds them twice: empty and real)
        with torch.random.fork_rng(devices=[]), _quiet():
            torch.manual_seed(cfg.seed)
            adapted = get_peft_model(model, config)
    except ValueError as e:
        raise InputError(f"--lora-target-modules {named or ALL_LINEAR}: {str(e).splitlines()[0]}") from None
    on = adapted_modules(adapted.get_base_model())
    routers = [(name, module) for name, module, moe in on if is_router(name.rpartition(".")[2], module, moe)]
    if routers:
        name, module = routers[0]
        raise InputError(f"--lora-target-modules {named or ALL_LINEAR}: {name} is the router of an MoE block "
                         f"({type(module).__name__}); lightopd puts no adapter on a router (it decides which experts "
                         "each token reaches, and a Llama 4 router returns a tuple that an adapter cannot wrap): "
                         "name other modules")
    moved = [] if named else [t for t in targets if t not in {name for name, _, _ in on}]
    if moved and not quiet:
        warn(f"--lora-target-modules {ALL_LINEAR}: peft takes {len(moved)} of this "
             f"{getattr(model.config, 'model_type', '')} student's linear layers ({moved[0]}, ...) for the "
             "per-expert layers of transformers 4, and puts their adapters on the routed experts' stacked weights "
             f"instead (the fused gate and up projection at rank {2 * cfg.lora_rank}); name the modules to adapt "
             "with --lora-target-modules to leave the experts out")
    return adapted


def default_targets(model) -> list[str]:
    """`all-linear`: the name of every linear layer (torch Linear, transformers Conv1D) of `model` but its
    output layer and the routers of its MoE blocks (`is_router`). Routed experts that transformers 5
    stores as one stacked weight of all experts (Mixtral, Qwen3-MoE, DeepSeek-V3, Llama 4) are not
    linear layers, and are left out too (but see add_adapters' warning)."""
    from transformers.pytorch_utils import Conv1D

    output = model.get_output_embeddings()
    targets = []
    for parent_name, parent in model.named_modules():
        moe = is_moe_block(parent)
        for name, child in parent.named_children():
            if isinstance(child, (torch.nn.Linear, Conv1D)) and child is not output and not is_router(name, child, moe):
                targets.append(f"{parent_name}.{name}" if parent_name else name)
    return list(dict.fromkeys(targets))


def is_moe_block(module) -> bool:
    """A mixture-of-experts block: a module holding `experts` (the name every transformers MoE block uses)."""
    return any(name == "experts" for name, _ in module.named_children())


def is_router(name: str, module, in_moe_block: bool) -> bool:
    """Whether `module`, called `name` in its parent, routes tokens to experts: its class says router or
    gate (Llama4Router, a Linear subclass; MixtralTopKRouter; a remote-code MoEGate), or it is a layer of
    an MoE block itself (not of an expert) called `router`, `gate` or the gate of an expert (Qwen2-MoE's
    `shared_expert_gate`)."""
    kind = type(module).__name__.lower()
    if "router" in kind or "gating" in kind or kind.endswith("gate"):
        return True
    return in_moe_block and (name in ("router", "gate") or ("expert" in name and "gate" in name))


def adapted_modules(model) -> list[tuple[str, object, bool]]:
    """(name, the module under the adapter, whether its parent is an MoE block) of every module of `model`
    that peft put an adapter on."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    modules = dict(model.named_modules())
    return [(name, module.get_base_layer(), is_moe_block(modules[name.rpartition(".")[0]]))
            for name, module in modules.items() if isinstance(module, BaseTunerLayer) and name]


@contextmanager
def _quiet():
    """Warnings of peft the user can do nothing about, kept off their stderr: a transformers attribute
    that transformers 5 deprecates, and peft's note that a `rank_pattern` or `alpha_pattern` key matched
    no module. peft writes that one on MoE models whose experts transformers 5 stores stacked (DeepSeek-V3,
    Mixtral, Qwen3-MoE): it maps the names of transformers 4's per-expert layers onto the stacked weights,
    gives the fused gate and up projection rank 2R by such a pattern, then checks the pattern against
    modules, not the parameters it applies to. The rank is applied (a test reads the shapes); when the
    default targets are moved onto experts this way, add_adapters says so in its own words."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        warnings.filterwarnings("ignore", message="The following (rank|alpha)_pattern keys did not match",
                                category=RuntimeWarning)
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
