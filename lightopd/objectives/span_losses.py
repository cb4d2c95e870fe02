"""A loss per span kind: TRACE's token routing ("Token-Routed Alignment for Critical rEasoning",
arXiv 2605.10194), composed from objectives that exist on their own.

`--span-loss KIND=OBJECTIVE[:WEIGHT]` (repeatable) routes the completion positions inside a row's
spans of KIND (data/spans.py) to OBJECTIVE's per-position loss, times WEIGHT; the positions in no
listed kind's span take `--objective`'s. TRACE is forward KL on the key spans of correct rollouts,
reverse KL on the error spans of wrong ones and GRPO on every other token:
    --objective grpo --span-loss key=fkl --span-loss error=rkl
with the spans marked by an annotator (so the key spans sit in correct rows, the error spans in
wrong ones). With `--span-anneal N` the span losses' weights fall linearly to 0 over the first N
steps (TRACE anneals its KL channel to 0 after a short warm-up; the schedule is not in what could be
read of the paper, so linear is this project's choice).

Each objective sees its own positions as the row: its `prepare` runs with the step's mask cut to
them (grpo's per-row length normalisation counts only its tokens), and its loss is taken where its
route is 1. Every objective takes `--objective`'s τ (one softmax per position); the span objectives
take their default parameters. The step's loss is the token mean as for any objective:
`span_loss/KIND` is each kind's share of it (`other` the unmarked positions; they sum to `loss`
where no shared weight, a row weight, a token selection or a teacher weight, applies on top), and
`span_frac/KIND` each kind's share of the positions (summing to 1). Once the anneal reaches 0 the
span positions take no loss at all (they are not handed to `--objective`: TRACE's GRPO is on the
other tokens), and still count in the token mean.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from lightopd.errors import InputError
from lightopd.objectives.base import Inputs, Objective, Requirements, StepRows
from lightopd.objectives.selection import span_loss_entry, span_tokens

if TYPE_CHECKING:
    from collections.abc import Callable

    from torch import Tensor

    from lightopd.objectives.selection import SelectionSpec

OTHER = "other"  # the positions in no listed kind's span, which take --objective's loss


def merged(needs: list[Requirements]) -> Requirements:
    """What a store must offer for every one of the routed objectives."""
    widest = max(needs, key=lambda r: r.min_samples)
    return Requirements(tuple(dict.fromkeys(c for r in needs for c in r.columns)), widest.min_samples, widest.why,
                        any(r.behavior_probability for r in needs), any(r.rewards for r in needs),
                        any(r.on_policy for r in needs))


class SpanLosses(Objective):
    """`main` on the unmarked positions, each of `parts` (kind, objective, weight) on its kind's spans."""

    summary = "a loss per span kind (TRACE's routing): --span-loss KIND=OBJECTIVE"

    def __init__(self, main: Objective, parts: list[tuple[str, Objective, float]], anneal: int | None = None):
        super().__init__(main.params, main.total_steps)
        self.main, self.parts, self.anneal = main, parts, anneal
        self.name = f"{main.name}+" + "+".join(f"{kind}={part.name}" for kind, part, _ in parts)
        self.default_temperature = main.default_temperature
        self.done = 0  # optimizer steps finished: the anneal's clock, saved in checkpoints
        self.last: dict[str, Tensor] = {}  # the latest chunk's loss per kind, for its diagnostics

    @property
    def columns(self) -> tuple[str, ...]:  # type: ignore[override]
        return tuple(dict.fromkeys(c for _, o, _ in self.routes() for c in o.columns))

    @property
    def factor(self) -> float:
        """The anneal's factor on the span losses' weights at the coming step (1 without one)."""
        return 1.0 if self.anneal is None else max(0.0, 1.0 - self.done / self.anneal)

    def routes(self) -> list[tuple[str, Objective, float]]:
        """(kind, objective, weight at the coming step) for each route, the unmarked positions last."""
        return [*((kind, o, w * self.factor) for kind, o, w in self.parts), (OTHER, self.main, 1.0)]

    def requirements(self) -> Requirements:
        return merged([o.requirements() for _, o, _ in self.routes()])

    def prepare(self, rows: StepRows) -> dict[str, Tensor]:
        taken, out = rows.mask * 0, {}
        for kind, objective, _ in self.routes():
            if kind == OTHER:
                inside = rows.mask - taken
            else:  # a position in two listed kinds' spans belongs to the first listed
                inside = span_tokens(rows.mask, rows.spans, {kind}) * (1 - taken)
                taken = taken + inside
            out[f"route:{kind}"] = inside
            own = objective.prepare(dataclasses.replace(rows, mask=inside))
            out.update({f"part:{kind}/{name}": values for name, values in own.items()})
        return out

    def loss(self, inputs: Inputs) -> Tensor:
        total, self.last = None, {}
        for kind, objective, weight in self.routes():
            route = inputs.prepared[f"route:{kind}"]
            prefix = f"part:{kind}/"
            own = {n.removeprefix(prefix): v for n, v in inputs.prepared.items() if n.startswith(prefix)}
            value = objective.loss(dataclasses.replace(inputs, prepared=own))
            part = (route * weight) * value.where(route > 0, 0.0)  # a value off its route never reaches the sum
            self.last[kind] = part.detach()
            total = part if total is None else total + part
        return total

    def diagnostics(self, inputs: Inputs) -> dict[str, Tensor]:
        out = {f"span_frac/{kind}": inputs.prepared[f"route:{kind}"] for kind, _, _ in self.routes()}
        return {**out, **{f"span_loss/{kind}": value for kind, value in self.last.items()}}

    def finish_step(self, step: int, loss: float) -> dict[str, float]:
        out = {"span_anneal": self.factor} if self.anneal is not None else {}
        for kind, objective, _ in self.routes():
            for name, value in objective.finish_step(step, loss).items():
                out[name if kind == OTHER else f"{kind}/{name}"] = value
        self.done = step
        return out

    def state_dict(self) -> dict:
        return {"done": self.done, "parts": {kind: o.state_dict() for kind, o, _ in self.routes()}}

    def load_state_dict(self, state: dict) -> None:
        self.done = state.get("done", self.done)
        for kind, objective, _ in self.routes():
            objective.load_state_dict(state.get("parts", {}).get(kind, {}))


def with_span_losses(main: Objective, spec: SelectionSpec, lookup: Callable[[str], type[Objective]],
                     params_for: Callable[[type[Objective]], object]) -> Objective:
    """`main`, or, with `--span-loss`, `main` routed with a loss per span kind; `params_for` gives a span
    objective's parameters (its defaults, resolved for the store, with `main`'s τ)."""
    if not spec.span_loss:
        return main
    parts = []
    for entry in spec.span_loss:
        kind, name, weight = span_loss_entry(entry)
        try:
            cls = lookup(name)
        except InputError as e:
            raise InputError(f"--span-loss {entry!r}: {str(e).split(': ', 1)[1]}") from None
        parts.append((kind, cls(params_for(cls), main.total_steps), weight))
    return SpanLosses(main, parts, spec.span_anneal)
