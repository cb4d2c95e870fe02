"""Which tokens teach: a per-position weight that any objective's loss is multiplied by.

`--token-select KIND` chooses the completion positions a step learns from; every objective
composes with it (the trainer multiplies the objective's per-position loss by the weight, as it
does the reward-based row weights), so no objective knows of it. Kinds:
- `all` (the default): every position, weight 1, and no arithmetic at all (today's loss, bit for bit).
- `entropy`: the `--token-keep` share of the step's positions with the highest student entropy
  (TIP's high-entropy region; the student is the current one, from a no-gradient pass first).
- `divergence`: the share with the highest student–teacher divergence: KL(q̂ ‖ p̂) on the teacher's
  top-k plus the exact tail bucket where the store has top-k, else |lq_y − ℓT| at the sampled token.
- `confident-wrong`: TIP's low-entropy, high-divergence region: among the positions whose student
  entropy is below the step's median (the lower middle value), the `--token-keep` share (below
  0.5) of all positions with the highest divergence.
- `tip`: TIP's type-aware union: `entropy` at `--token-keep`, or `confident-wrong` at
  `--token-low-keep`.
- `position`: the first `--token-keep` share of each row's completion tokens (`--token-from end`:
  the last), rounded up.
- `decay`: no position dropped, each weighted 2^(−t / h) by its index t in the row (from 0; from the
  end with `--token-from end`), h = max(1, `--token-keep`·|y|) a half-life: the early-token
  emphasis of CORD and of the studies that find a trace's first part carries most of the gain.
- `curriculum`: `position` with a share that grows from `--token-keep` at the first step to 1 at
  the last, linearly or in `--token-stages` equal steps (TCOD's depth curriculum, forward or, with
  `--token-from end`, backward).
- `spans`: the positions inside the spans marked for each row (data/spans.py: a field of its
  metadata, `--token-spans FIELD`, or a file of annotations, `--token-spans-file`; token or
  character offsets), those of `--token-span-kinds` only if given: TRACE's key and error spans.
  A loss per span kind is `--span-loss` (objectives/span_losses.py), with or without a selection.
- `random`: each position kept with probability `--token-keep`, from a stream keyed by (`--seed`,
  step, the row's prompt id and sample index): the same positions whatever the batching, chunking
  or number of ranks. The control every selection needs.
Where the kept positions are known before the forward (`position`, `curriculum`, `random`,
`spans`), the dropped ones skip the output layer and the loss altogether (the decoder still reads
them, as the context of what follows); the step's diagnostics are then means over the kept
positions. Shares over a step are exact over all ranks (the k-th largest value of the step's
positions, k = ⌈keep·N⌉; ties at the threshold are all kept). `--token-norm kept` (the default)
divides the step's loss by the kept positions (weight N / N_kept on each kept one: the mean over
what is kept, as masking tokens out of a loss does); `all` divides by every completion position (a
kept position weighs 1).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lightopd.options import check, opt

if TYPE_CHECKING:
    from collections.abc import Callable

    from torch import Tensor

KINDS = ("all", "entropy", "divergence", "confident-wrong", "tip", "position", "decay", "curriculum", "random",
         "spans")
NEEDS_STUDENT = ("entropy", "divergence", "confident-wrong", "tip")  # computed from the current student
NORMS = ("kept", "all")
SCHEDULES = ("linear", "step")
FROM = ("start", "end")
UNITS = ("tokens", "characters")


@dataclass(frozen=True, kw_only=True)
class SelectionSpec:
    """Which completion positions each step learns from (see the module doc)."""

    token_select: str = opt("all", "Which completion tokens teach: all, entropy (highest student entropy), "
                                   "divergence (highest student–teacher KL on the stored support), confident-wrong "
                                   "(low entropy, high divergence: TIP), tip (entropy or confident-wrong), position "
                                   "(each row's first tokens), decay (a weight halving every --token-keep share "
                                   "of the row), curriculum (position with a share growing to 1: "
                                   "TCOD), random (the control), spans (inside the spans marked for each row: "
                                   "TRACE). Works with every objective.", choices=KINDS)
    token_keep: float = opt(0.5, "The share of positions kept (for curriculum, at the first step).", metavar="F")
    token_low_keep: float = opt(0.1, "tip: the share of all positions added from the low-entropy, high-divergence "
                                     "region.", metavar="F")
    token_norm: str = opt("kept", "kept: the step's loss is the mean over kept positions; all: over every "
                                  "completion position (dropped ones count as 0).", choices=NORMS)
    token_from: str = opt("start", "position and curriculum: keep each row's first (start) or last (end) tokens.",
                          choices=FROM)
    token_schedule: str = opt("linear", "curriculum: the share grows linearly, or in --token-stages equal steps.",
                              choices=SCHEDULES)
    token_stages: int = opt(4, "curriculum with --token-schedule step: the number of stages.", metavar="N")
    token_spans: str = opt("spans", "spans: the metadata field of each row's spans ([start, end] or [start, end, "
                                    "kind] token offsets into the completion, end excluded).", metavar="FIELD")
    token_span_kinds: str | None = opt(None, "spans: keep only spans of these kinds (comma-separated). [default: "
                                             "every span]", metavar="KINDS")
    token_spans_file: str | None = opt(None, "Read each row's spans from this JSONL file of annotations, one line "
                                             "per trained row: {\"prompt_id\", \"sample_index\", FIELD: spans}, "
                                             "FIELD as --token-spans. [default: the row's metadata]", metavar="FILE")
    token_span_units: str = opt("tokens", "Span offsets count completion tokens, or characters of the completion's "
                                          "text as the checkers read it (decoded without special tokens; a token "
                                          "is inside when any of its characters is).", choices=UNITS)
    span_loss: tuple[str, ...] = opt((), "A loss per span kind (TRACE): KIND=OBJECTIVE or KIND=OBJECTIVE:WEIGHT, "
                                         "repeatable. Positions in spans of KIND take OBJECTIVE's loss (with its "
                                         "default parameters and --objective's τ) times WEIGHT; every other "
                                         "position takes --objective's. A position in spans of two listed kinds "
                                         "takes the first listed.", metavar="KIND=OBJ[:W]")
    span_anneal: int | None = opt(None, "The --span-loss weights fall linearly to 0 over the first N optimizer "
                                        "steps and stay 0 (TRACE anneals its KL channel after a warm-up). "
                                        "[default: constant]", metavar="N")

    def __post_init__(self) -> None:
        check(self.token_select in KINDS, "--token-select", f"must be one of {', '.join(KINDS)}, "
                                                            f"got {self.token_select!r}")
        check(0 < self.token_keep <= 1, "--token-keep", f"must be in (0, 1], got {self.token_keep}")
        check(0 <= self.token_low_keep <= 1, "--token-low-keep", f"must be in [0, 1], got {self.token_low_keep}")
        check(self.token_norm in NORMS, "--token-norm", f"must be kept or all, got {self.token_norm!r}")
        check(self.token_from in FROM, "--token-from", f"must be start or end, got {self.token_from!r}")
        check(self.token_schedule in SCHEDULES, "--token-schedule",
              f"must be linear or step, got {self.token_schedule!r}")
        check(self.token_stages >= 2, "--token-stages", f"must be >= 2, got {self.token_stages}")
        check(self.token_span_units in UNITS, "--token-span-units",
              f"must be tokens or characters, got {self.token_span_units!r}")
        check(self.span_anneal is None or self.span_anneal >= 1, "--span-anneal",
              f"must be >= 1, got {self.span_anneal}")
        check(self.span_anneal is None or bool(self.span_loss), "--span-anneal", "anneals --span-loss, which is unset")
        kinds = [span_loss_entry(entry)[0] for entry in self.span_loss]
        for kind in {k for k in kinds if kinds.count(k) > 1}:
            check(False, "--span-loss", f"the kind {kind} is listed twice")
        check(self.token_select != "confident-wrong" or self.token_keep < 0.5, "--token-keep",
              f"confident-wrong takes its share from the low-entropy half of the positions, so it must be below "
              f"0.5 (TIP: 0.1), got {self.token_keep}")

    @property
    def reads_spans(self) -> bool:
        """Whether training reads each row's spans (the spans selection, or losses per span kind)."""
        return self.token_select == "spans" or bool(self.span_loss)

    @property
    def active(self) -> bool:
        return self.token_select != "all"

    @property
    def known_before(self) -> bool:
        """Whether the kept positions are known before the forward, so the dropped ones can skip the
        output layer and the loss."""
        return self.token_select in ("position", "curriculum", "random", "spans")

    @property
    def needs_student(self) -> bool:
        """Whether the selection reads the current student (a no-gradient pass before the step)."""
        return self.token_select in NEEDS_STUDENT


def span_loss_entry(entry: str) -> tuple[str, str, float]:
    """(kind, objective, weight) of a `--span-loss KIND=OBJECTIVE[:WEIGHT]` entry."""
    kind, _, rest = entry.partition("=")
    name, _, weight = rest.partition(":")
    valid = bool(kind and name) and kind.replace("-", "").replace("_", "").isalnum() and kind != "other"
    check(valid, "--span-loss", f"{entry!r} is not KIND=OBJECTIVE[:WEIGHT] with KIND letters, digits, - or _ "
                                "(other than 'other', the name of the unmarked positions)")
    try:
        value = float(weight) if weight else 1.0
    except ValueError:
        value = -1.0
    check(value >= 0, "--span-loss", f"{entry!r}: the weight must be a number >= 0")
    return kind, name, value


def curriculum_share(spec: SelectionSpec, step: int, total_steps: int) -> float:
    """The share of each row a curriculum keeps at optimizer step `step` (1-based) of `total_steps`."""
    progress = (step - 1) / max(1, total_steps - 1)
    if spec.token_schedule == "step":
        progress = math.floor(progress * spec.token_stages) / (spec.token_stages - 1) if progress < 1 else 1.0
    return spec.token_keep + (1 - spec.token_keep) * progress


def row_positions(mask: Tensor, from_end: bool) -> tuple[Tensor, Tensor]:
    """([R, T] each position's 0-based index in its row, counted from the start or the end; [R, 1]
    each row's length)."""
    lengths = mask.sum(-1, keepdim=True)
    index = mask.cumsum(-1) - 1
    return (lengths - 1 - index if from_end else index), lengths


def first_tokens(mask: Tensor, share: float, from_end: bool) -> Tensor:
    """[R, T] 1 on the first (or last) ⌈share·|y_i|⌉ positions of each row."""
    index, lengths = row_positions(mask, from_end)
    return ((index < (lengths * share).ceil()) * mask).to(mask.dtype)


def decaying(mask: Tensor, share: float, from_end: bool) -> Tensor:
    """[R, T] 2^(−t / h) at each row's position t (from its start, or its end), h = max(1, share·|y_i|)."""
    index, lengths = row_positions(mask, from_end)
    return (0.5 ** (index.clamp(min=0) / (lengths * share).clamp(min=1))) * mask


def random_tokens(mask: Tensor, share: float, keys: list[str]) -> Tensor:
    """[R, T] each position kept with probability `share`, from a stream keyed by its row's key."""
    import torch

    draws = torch.zeros(mask.shape, dtype=torch.float64)
    for i, key in enumerate(keys):
        seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
        draws[i] = torch.rand(mask.shape[-1], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return ((draws.to(mask.device) < share) * mask).to(mask.dtype)


def top_share(values: Tensor, candidates: Tensor, count: int, gather: Callable[[Tensor], Tensor]) -> Tensor:
    """[R, T] 1 on the `count` largest `values` among `candidates` over every rank (ties at the
    threshold all kept); `gather` concatenates a 1-D tensor over the ranks."""
    pool = gather(values[candidates.bool()].double().cpu())
    if count <= 0 or pool.numel() == 0:
        return candidates * 0
    threshold = pool.topk(min(count, pool.numel())).values[-1].item()
    return ((values >= threshold) * candidates).to(candidates.dtype)


def median_below(values: Tensor, mask: Tensor, gather: Callable[[Tensor], Tensor]) -> Tensor:
    """[R, T] 1 where a position's value is below the median of the step's positions (all ranks)."""
    pool = gather(values[mask.bool()].double().cpu())
    median = pool.kthvalue((pool.numel() + 1) // 2).values.item() if pool.numel() else 0.0  # any size
    return ((values < median) * mask).to(mask.dtype)


def span_tokens(mask: Tensor, spans: list[list], kinds: set[str] | None) -> Tensor:
    """[R, T] 1 inside each row's spans (`parse_spans`'s (start, end, kind) triples), of `kinds` if given."""
    out = mask * 0
    for i, row in enumerate(spans):
        for start, end, kind in row:
            if kinds is None or kind in kinds:
                out[i, start:end] = 1
    return out * mask


def selected(spec: SelectionSpec, mask: Tensor, step: int, total_steps: int, keys: list[str],
             entropy: Tensor | None, divergence: Tensor | None, gather: Callable[[Tensor], Tensor],
             tokens: int, spans: list[list] | None = None) -> Tensor:
    """[R, T] the positions the selection keeps, 1 each (`decay`: their weights), before normalisation;
    `tokens` is the step's
    completion positions over all ranks, `entropy` and `divergence` the current student's [R, T]."""
    kind, keep = spec.token_select, spec.token_keep
    if kind == "position":
        return first_tokens(mask, keep, spec.token_from == "end")
    if kind == "decay":
        return decaying(mask, keep, spec.token_from == "end")
    if kind == "curriculum":
        return first_tokens(mask, curriculum_share(spec, step, total_steps), spec.token_from == "end")
    if kind == "random":
        return random_tokens(mask, keep, keys)
    if kind == "spans":
        kinds = None if spec.token_span_kinds is None else set(spec.token_span_kinds.split(","))
        return span_tokens(mask, spans, kinds)
    count = math.ceil(keep * tokens)
    if kind == "entropy":
        return top_share(entropy, mask, count, gather)
    if kind == "divergence":
        return top_share(divergence, mask, count, gather)
    low = median_below(entropy, mask, gather)
    if kind == "confident-wrong":
        return top_share(divergence, low, count, gather)
    wrong = top_share(divergence, low, math.ceil(spec.token_low_keep * tokens), gather)
    return (top_share(entropy, mask, count, gather) + wrong).clamp(max=1)


def normalised(kept: Tensor, norm: str, tokens: int, reduce: Callable[[Tensor], Tensor]) -> Tensor:
    """The weights of the kept positions: N / N_kept each (`kept`; with `decay`'s weights w, N / Σw
    times w), or 1 (w) (`all`)."""
    if norm == "all":
        return kept
    n_kept = float(reduce(kept.sum().reshape(1)).item())
    return kept * (tokens / n_kept) if n_kept > 0 else kept
