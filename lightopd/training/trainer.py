"""One optimizer step of offline distillation: a step's prompt groups in, gradients applied.

A step's rows go into micro-batches within a token budget (packed without padding when the model
reads packed rows, else padded, longest first); each micro-batch runs the student's decoder once
and its output layer on completion positions only, a chunk of positions at a time
(engine.chunks): the chunk's logits become log-prob statistics (objectives.stats) and the
objective's per-position loss, differentiated and freed before the next chunk, so the loss's
memory does not grow with the sequence.
Gradients accumulate as (sum of per-token losses) × world / (completion tokens of the step over
all ranks), so the loss is the token mean of the whole step whatever the micro-batching or the
number of ranks (DDP's gradient average supplies the 1 / world). The objective's `prepare` hook
sees the whole step first; its outputs are handed to the loss position by position, and so are
the shared weights every objective's loss is multiplied by (training/chunk.py): the reward-based
row weights, the token selection (objectives/selection.py), which, where it reads the current
student, takes a pass without gradients over the step first, and, over several teacher stores,
each row's teacher's weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pyarrow as pa
import torch

from lightopd.config import TrainConfig
from lightopd.data.batching import TokenBatches, list_mask, padded_column, row_column
from lightopd.data.spans import Spans
from lightopd.data.stream import Group
from lightopd.engine import models
from lightopd.engine.forward import CompletionChunks
from lightopd.errors import TrainingError
from lightopd.objectives import Objective, StepRows
from lightopd.objectives.selection import normalised, selected
from lightopd.progress import warn
from lightopd.training import distributed
from lightopd.training.chunk import ROW_WEIGHT, TEACHER, TEACHER_WEIGHT, TOKEN_WEIGHT, chunk_loss, student_statistics
from lightopd.training.distributed import World
from lightopd.training.parallel import Parallel, Source
from lightopd.training.schedule import lr_factor, optimizer_for

STORED = ("teacher_logprobs", "behavior_logprobs", "policy_logprobs", "topk_ids", "topk_logprobs",
          "teacher_log_tail")  # read for the diagnostics whatever the objective (reference_logprobs: when it needs it)


@dataclass(frozen=True)
class TrainData:
    """What the trainer needs to know of the store it reads."""

    columns: tuple[str, ...]  # the stored columns to offer the objective and the diagnostics (what they use is read)
    k: int | None  # its teacher top-k
    vocab: int  # the tokenizer's ids
    policy_from_behavior: bool = False  # an older store, sampled untruncated: ℓold is its behavior_logprobs
    teachers: tuple[str, ...] = ()  # the teachers of several teacher stores, named in each row's `teacher` column
    teacher_weights: dict[str, float] = field(default_factory=dict)  # --teacher-weight by name ({}: all 1)


def checkpointing(model) -> None:
    """Activation checkpointing of every decoder layer (non-reentrant: it composes with DDP, FSDP2 and
    autocast), by the name this transformers release gives it."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def attention(model) -> str:
    return str(getattr(model.config, "_attn_implementation", None) or "eager")


def asks_packing(packing: str, model) -> bool:
    """Whether `--packing` asks for packed micro-batches with this model's attention kernel."""
    variable_length = "flash" in attention(model) or attention(model) == "flex_attention"
    return packing == "on" or (packing == "auto" and variable_length)


class Trainer:
    """One optimizer step at a time of `objective` on `model` (see the module doc)."""

    skips_dropped = True  # positions a selection drops before the forward skip the output layer (tests turn it off)

    def __init__(self, cfg: TrainConfig, objective: Objective, model, data: TrainData, total_steps: int,
                 world: World = distributed.SINGLE, source: Source | None = None, spans: Spans | None = None):
        """`source`: where a `model` built on the meta device gets its weights (under --fsdp); `spans`:
        the reader of each row's spans, where the selection or the objective reads them (train builds
        it once, with the student's tokenizer for character offsets; else one is built here)."""
        self.cfg, self.objective, self.model, self.data, self.world = cfg, objective, model, data, world
        offered = (*data.columns, "policy_logprobs") if data.policy_from_behavior else data.columns
        self.columns = tuple(c for c in dict.fromkeys((*objective.needs().columns, *objective.columns, *STORED))
                             if c in offered)
        rewards = ("reward",) if objective.needs().rewards else ()  # per row: read, never batched
        spec = cfg.selection
        if spans is None and spec.reads_spans:
            spans = Spans(spec.token_spans, spec.token_span_units, spec.token_spans_file)
        self.spans = spans
        keys = ("sample_index",) if cfg.selection.token_select == "random" else ()
        keys += self.spans.columns if self.spans is not None else ()
        self.read_columns = tuple(c for c in (*self.columns, *rewards, *keys) if c in data.columns)  # from the shards
        self.selection, self.total_steps = cfg.selection, total_steps
        self.device = source.device if source is not None else next(model.parameters()).device
        self.amp_dtype = models.resolve_dtype(cfg.student.dtype, self.device)
        if not cfg.dropout:
            models.without_dropout(model)
        chunks = CompletionChunks(model, data.vocab, check=source is None)
        if cfg.gradient_checkpointing:
            if not getattr(model, "supports_gradient_checkpointing", False):
                raise TrainingError(f"--gradient-checkpointing: {type(model).__name__} does not support it")
            checkpointing(model)
        # wrapped before the optimizer sees the (possibly sharded) weights
        self.parallel = Parallel(chunks, model, world, cfg.fsdp, self.amp_dtype, source)
        self.completion_chunks = self.parallel.module
        self.packed = asks_packing(cfg.packing, model) and chunks.positions.packs
        if cfg.packing == "on" and not self.packed and world.main:
            warn(f"--packing on: this model ({type(model).__name__}, attention {attention(model)}) does not read "
                 "packed rows as separate sequences; micro-batches are padded instead")
        self.optimizer = optimizer_for(model, cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           lambda step: lr_factor(step, cfg, total_steps))

    def _prepared(self, table: pa.Table, groups: list[Group], mask: torch.Tensor, spans: list | None
                  ) -> dict[str, torch.Tensor]:
        """The objective's per-position inputs for the whole step, [R, T] each (`mask`: the step's
        completion positions)."""
        group_of = torch.tensor([i for i, g in enumerate(groups) for _ in range(g.num_rows)], device=self.device)
        rows = StepRows(lambda name: padded_column(table, name, self.device), mask.double(), group_of, self.world.sum,
                        lambda name: row_column(table, name, self.device), spans)
        prepared = self.objective.prepare(rows)
        weights = self.objective.row_weights(rows)
        if weights is not None:
            prepared[ROW_WEIGHT] = weights
        if self.data.teachers:  # each row's teacher (several teacher stores)
            names = table["teacher"].to_pylist()
            for name in self.data.teachers:
                mine = torch.tensor([n == name for n in names], dtype=torch.float64, device=self.device)
                prepared[TEACHER + name] = mine.unsqueeze(-1) * rows.mask
            if self.data.teacher_weights:
                weight = torch.tensor([self.data.teacher_weights[n] for n in names], dtype=torch.float64,
                                      device=self.device)
                prepared[TEACHER_WEIGHT] = weight.unsqueeze(-1) * rows.mask
        return prepared

    def _selection(self, table: pa.Table, batches: TokenBatches, micros: list, weights: list[float], step: int,
                   tokens: int, mask: torch.Tensor, spans: list | None) -> torch.Tensor:
        """The token selection's weights of the step [R, T] (objectives/selection.py); the
        current student's entropy and divergence come from a pass without gradients (eval mode)."""
        spec = self.selection
        entropy = divergence = None
        if spec.needs_student:
            entropy = torch.zeros(mask.shape, device=self.device)
            divergence = torch.zeros(mask.shape, device=self.device)
            self.model.eval()
            with torch.no_grad(), torch.autocast(self.device.type, dtype=self.amp_dtype,
                                                 enabled=self.amp_dtype != torch.float32):
                for micro, weight in zip(micros, weights, strict=True):
                    mb = batches.tensors(micro, self.columns, self.data.k, self.device)
                    parts = self.completion_chunks(mb.layout, student_statistics(mb, self.objective.params.temperature),
                                                   self.cfg.loss_chunk_tokens, statistics=True)
                    if weight and parts:
                        rows, cols = mask[micro].nonzero(as_tuple=True)
                        rows = torch.tensor(micro, device=self.device)[rows]
                        entropy[rows, cols] = torch.cat([e for e, _ in parts])
                        divergence[rows, cols] = torch.cat([d for _, d in parts])
        keys = []
        if spec.token_select == "random":
            keys = [f"{self.cfg.seed}:{step}:{pid}:{j}" for pid, j in zip(
                table["prompt_id"].to_pylist(), table["sample_index"].to_pylist(), strict=True)]
        gather = lambda t: torch.cat(self.world.gather(t))  # noqa: E731
        kept = selected(spec, mask.double(), step, self.total_steps, keys, entropy, divergence, gather, tokens, spans)
        return normalised(kept, spec.token_norm, tokens, self.world.sum)

    def step(self, groups: list[Group], step: int = 1) -> dict:
        """Optimizer step number `step` (1-based: the curriculum and random selections read it)."""
        table = pa.Table.from_batches(groups)
        if self.data.policy_from_behavior and "behavior_logprobs" in table.column_names:
            table = table.append_column("policy_logprobs", table["behavior_logprobs"])
        batches = TokenBatches(table, self.cfg.micro_batch_tokens, self.packed)
        totals = self.world.sum(torch.tensor([batches.tokens, table.num_rows], dtype=torch.float64,
                                             device=self.device))
        tokens, step_rows = (int(x) for x in totals.tolist())  # over all ranks
        scale = self.world.size / max(tokens, 1)  # DDP averages over ranks: this makes it the global token mean
        spans = self.spans.of(table) if self.spans is not None else None
        mask = list_mask(table, "completion_ids").to(self.device)
        prepared = self._prepared(table, groups, mask, spans)
        # under DDP every rank must reach one synchronising backward, even one whose rows have no completion tokens
        micros = batches.plan or batches.packs[:1]
        weights = [1.0] * len(micros)
        if self.parallel.pads:  # FSDP: as many forwards on every rank; the extra ones repeat a batch at weight 0
            extra = int(self.world.max(torch.tensor(len(micros), device=self.device))) - len(micros)
            micros, weights = micros + [micros[0]] * extra, weights + [0.0] * extra
        if self.selection.active:
            prepared[TOKEN_WEIGHT] = self._selection(table, batches, micros, weights, step, tokens, mask, spans)
        skipping = self.selection.known_before and self.skips_dropped
        loss_sum = torch.zeros((), device=self.device)
        sums: dict[str, torch.Tensor] = {}
        ratio_max = torch.zeros((), device=self.device)
        self.model.train()
        for j, (micro, weight) in enumerate(zip(micros, weights, strict=True)):
            with self.parallel.sync(j == len(micros) - 1):
                mb = batches.tensors(micro, self.columns, self.data.k, self.device)
                mine = {name: values[micro][mask[micro]].float() for name, values in prepared.items()}
                if skipping:  # dropped positions never reach the output layer
                    index = (mine[TOKEN_WEIGHT] > 0).nonzero().squeeze(-1)
                    mb, mine = mb.only(index), {name: values[index] for name, values in mine.items()}
                with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype != torch.float32):
                    total, chunks = self.completion_chunks(mb.layout, chunk_loss(self.objective, mb, mine),
                                                           self.cfg.loss_chunk_tokens)
                (total * (scale * weight)).backward()
            if not weight:
                continue
            loss_sum += total.detach()
            for _, diagnosed in chunks:
                for name, values in diagnosed.items():
                    sums[name] = sums.get(name, 0.0) + values.sum()
                    if name == "is_ratio" and values.numel():
                        ratio_max = torch.maximum(ratio_max, values.max())
        # sums over ranks, then one device-to-host transfer per step
        names = sorted(sums)
        if self.world.active:  # a rank whose positions were all dropped (or had none) computed no diagnostic
            names = sorted(set().union(*self.world.gather(names)))
        zero = torch.zeros((), device=self.device)
        totals = self.world.sum(torch.stack([loss_sum.double(), *(sums.get(n, zero).double() for n in names)])).tolist()
        ratio_max = float(self.world.max(ratio_max))
        loss_sum, sums = totals[0], dict(zip(names, totals[1:], strict=True))
        loss = loss_sum / tokens if tokens else float("nan")
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        grad_norm = self.parallel.clip_grad_norm(clip)
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingError(f"non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'} "
                                f"(loss {loss}, grad norm {grad_norm})")
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self._non_finite_weights():
            raise TrainingError(f"the update made a weight non-finite (loss {loss}, grad norm {grad_norm}, lr {lr}); "
                                "a smaller --lr or --grad-clip keeps the weights finite")
        record = {"loss": loss, "lr": lr, "tokens": tokens, "rows": step_rows, "grad_norm": grad_norm}
        kept = sums.get("kept_fraction", 0.0)
        computed = kept if skipping else tokens  # the positions whose diagnostics were computed
        for name, total in sums.items():
            if name == "is_ratio_sq":
                continue  # (is_ess's denominator)
            if name == "kept_fraction":
                count = tokens
            elif name.startswith("kept_"):
                count = kept
            elif name.startswith("dropped_"):
                if skipping:
                    continue  # never computed
                count = tokens - kept
            elif name.startswith(("teacher_loss/", "teacher_k1/")):  # over that teacher's positions
                count = sums.get("teacher_token_frac/" + name.split("/", 1)[1], 0.0)
            else:
                count = computed
            record["is_ratio_mean" if name == "is_ratio" else name] = total / count if count else None
        if "is_ratio" in sums:
            record["is_ratio_max"] = ratio_max
            squares = sums.get("is_ratio_sq", 0.0)  # the effective sample size of the weights, in (0, 1]
            record["is_ess"] = sums["is_ratio"] ** 2 / (computed * squares) if squares and computed else None
        return record

    def _non_finite_weights(self) -> bool:
        """Whether any weight on any rank is NaN or inf (one synchronisation; every rank gets the answer)."""
        bad = torch.zeros((), device=self.device)
        for p in self.model.parameters():
            local = p.to_local() if hasattr(p, "to_local") else p  # a DTensor shard under FSDP
            bad += (~torch.isfinite(local)).any()
        return bool(self.world.sum(bad) > 0)
