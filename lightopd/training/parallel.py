"""How the student runs across ranks: as is (one process), replicated (DDP) or sharded (FSDP2),
behind one interface for the trainer: the module to call, gradient-sync control for
accumulation, the gradient norm, and state for checkpoints.

Under FSDP2 each decoder layer (the model's `_no_split_modules` classes) is its own shard group
and the root group holds the rest (embeddings, final norm, output layer). Every forward gathers
parameters from all ranks, so every rank must run the same number of micro-batches; `Parallel.
pads` tells the trainer to pad. Under FSDP a checkpoint holds every rank's own shards of the
weights and optimizer state (torch.distributed.checkpoint: nothing is gathered, and a different
world size reshards on load); the final model alone is gathered in full, to be a plain one.
"""

from __future__ import annotations

import inspect
from contextlib import AbstractContextManager, nullcontext

import torch

from lightopd.training.distributed import World


def _layers(model) -> list[torch.nn.Module]:
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


class Parallel:
    def __init__(self, root: torch.nn.Module, model: torch.nn.Module, world: World, fsdp: bool):
        """`root`: the module whose forward runs the model (engine.forward.CompletionLogits)."""
        self.model, self.world, self.fsdp = model, world, fsdp and world.active
        self.module = root
        if self.fsdp:
            from torch.distributed.fsdp import fully_shard

            for layer in _layers(model):
                fully_shard(layer)
            fully_shard(root)
        elif world.active:
            device = next(model.parameters()).device
            # no buffer broadcast in forward: ranks may run different numbers of forwards in a step, and the
            # model's buffers (rotary tables) are identical on every rank anyway
            ddp = torch.nn.parallel.DistributedDataParallel
            quiet = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp).parameters
                     else {"broadcast_buffers": False})
            self.module = ddp(root, device_ids=[device] if device.type == "cuda" else None, **quiet)

    @property
    def pads(self) -> bool:
        """Whether every rank must run the same number of forwards in a step."""
        return self.fsdp

    def sync(self, enabled: bool) -> AbstractContextManager:
        """Run one micro-batch's forward and backward inside this; only the step's last one syncs."""
        if self.fsdp:
            self.module.set_requires_gradient_sync(enabled)
            return nullcontext()
        if self.world.active and not enabled:
            return self.module.no_sync()
        return nullcontext()

    def clip_grad_norm(self, max_norm: float) -> float:
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        if hasattr(norm, "full_tensor"):  # a DTensor under FSDP
            norm = norm.full_tensor()
        return float(norm)

    # ---- state for checkpoints (collectives: every rank calls them) ----

    def model_state(self) -> dict | None:
        """The full state dict to save on rank 0 (None: the model's own `state_dict()` will do)."""
        if not self.fsdp:
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return state if self.world.main else None

    def save_sharded(self, optimizer: torch.optim.Optimizer, directory) -> None:
        """FSDP: every rank writes its own shards of the weights and the optimizer state into
        `directory` (torch.distributed.checkpoint); nothing is gathered."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optimizer_state = get_state_dict(self.model, optimizer)
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(directory))

    def load_sharded(self, optimizer: torch.optim.Optimizer, directory) -> None:
        """FSDP: every rank reads its own shards (resharded when the world size changed)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_state, optimizer_state = get_state_dict(self.model, optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(state, checkpoint_id=str(directory))
        set_state_dict(self.model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        if not self.fsdp:
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(self.model, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict) -> None:
        if not self.fsdp:
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(self.model, optimizer, state, options=StateDictOptions(full_state_dict=True))
