"""How the student runs across ranks: as is (one process), replicated (DDP) or sharded (FSDP2),
behind one interface for the trainer: the module to call, gradient-sync control for
accumulation, the gradient norm, and state for checkpoints.

Under FSDP2 each decoder layer (the model's `_no_split_modules` classes) is its own shard group
and the root group holds the rest (embeddings, final norm, output layer). The student is built on
the meta device and sharded before any weight exists; each rank then allocates its own shards
on its device, and rank 0, the one rank that read the full model (on the CPU), broadcasts the
weights shard by shard, so no GPU ever holds the whole model. With a compute dtype below float32
(bf16 on CUDA) the weights, gradients and AdamW state stay float32 shards while all-gathers and
the forward run in the compute dtype and gradients are reduced in float32 (MixedPrecisionPolicy).
Every forward gathers parameters from all ranks, so every rank must run the same number of
micro-batches; `Parallel.pads` tells the trainer to pad. Under FSDP a checkpoint holds every
rank's own shards of the weights and optimizer state (torch.distributed.checkpoint: nothing is
gathered, and a different world size reshards on load); under LoRA only the trainable adapters
and their optimizer state. The final model alone is gathered in full, to be a plain one.
"""

from __future__ import annotations

import inspect
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lightopd.training.distributed import World


@dataclass(frozen=True)
class Source:
    """Where a student built on the meta device gets its weights once sharded."""

    device: torch.device  # this rank's
    model: torch.nn.Module | None  # the full student on the CPU on rank 0; None on the other ranks


def _layers(model) -> list[torch.nn.Module]:
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


class Parallel:
    def __init__(self, root: torch.nn.Module, model: torch.nn.Module, world: World, fsdp: bool,
                 dtype: torch.dtype = torch.float32, source: Source | None = None):
        """`root`: the module whose forward runs the model (engine.forward.CompletionChunks); `dtype`:
        the compute dtype; `source`: for a `model` on the meta device (FSDP only), its weights."""
        self.model, self.world, self.fsdp = model, world, fsdp and world.active
        self.module = root
        # under LoRA (frozen base weights) checkpoints and the final gather hold what trains alone
        self.frozen = any(not p.requires_grad for p in model.parameters())
        if self.fsdp:
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            mixed = ({"mp_policy": MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)}
                     if dtype != torch.float32 else {})
            for layer in _layers(model):
                fully_shard(layer, **mixed)
            fully_shard(root, **mixed)
            if source is not None:
                self._materialise(source)
        elif world.active:
            device = next(model.parameters()).device
            # no buffer broadcast in forward: ranks may run different numbers of forwards in a step, and the
            # model's buffers (rotary tables) are identical on every rank anyway
            ddp = torch.nn.parallel.DistributedDataParallel
            quiet = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp).parameters
                     else {"broadcast_buffers": False})
            self.module = ddp(root, device_ids=[device] if device.type == "cuda" else None, **quiet)

    def _materialise(self, source: Source) -> None:
        """Allocate this rank's shards on its device and fill them from rank 0's full model: the
        state dict shard by shard, then the buffers (rotary tables and other non-persistent ones,
        which no state dict holds), broadcast whole."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        self.model.to_empty(device=source.device)
        full = source.model.state_dict() if source.model is not None else {}
        set_model_state_dict(self.model, full, options=StateDictOptions(full_state_dict=True,
                                                                        broadcast_from_rank0=True))
        with torch.no_grad():
            for name, buffer in self.model.named_buffers():
                if source.model is not None:
                    buffer.copy_(source.model.get_buffer(name))
                dist.broadcast(buffer, src=0)
            self.module(None)  # the forward's self-checks, through the sharded root (every rank)
        # the root keeps its weights gathered after a forward, for the backward that follows; after
        # this one none follows: shard them again, or the optimizer would get the gathered copies
        self.module.reshard()

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
        """The full state dict to save on rank 0 (None: the model's own `state_dict()` will do); under
        LoRA that of the adapters alone."""
        if not self.fsdp:
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(self.model, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True, ignore_frozen_params=self.frozen))
        return state if self.world.main else None

    def save_sharded(self, optimizer: torch.optim.Optimizer, directory) -> None:
        """FSDP: every rank writes its own shards of the weights and the optimizer state into
        `directory` (torch.distributed.checkpoint); nothing is gathered."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optimizer_state = get_state_dict(self.model, optimizer, options=self._sharded_options())
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(directory))

    def load_sharded(self, optimizer: torch.optim.Optimizer, directory) -> None:
        """FSDP: every rank reads its own shards (resharded when the world size changed)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_state, optimizer_state = get_state_dict(self.model, optimizer, options=self._sharded_options())
        state = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(state, checkpoint_id=str(directory))
        # under LoRA the frozen base weights are not in the checkpoint: they are the student's, already in place
        result = set_state_dict(self.model, optimizer, model_state_dict=state["model"],
                                optim_state_dict=state["optimizer"], options=self._sharded_options(strict=False))
        frozen = {name for name, p in self.model.named_parameters() if not p.requires_grad}
        missing = sorted(set(result.missing_keys) - frozen)
        if result.unexpected_keys or missing:
            raise RuntimeError(f"{directory} does not fit the student (missing {missing[:3]}, "
                               f"unexpected {result.unexpected_keys[:3]})")

    def _sharded_options(self, strict: bool = True):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(ignore_frozen_params=self.frozen, strict=strict)

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
