"""Every loss of docs/objectives.md, each an `Objective` (base.py) beside its parameters.

`OBJECTIVES` maps a name to its class; `create(name, params, total_steps)` makes one for a run.
The package imports without torch: losses use tensor methods, and only `stats` (the student's
and teacher's log-prob statistics) imports torch.
"""

from __future__ import annotations

from lightopd.errors import InputError
from lightopd.objectives.base import Inputs, Objective, ObjectiveParams, Requirements, StepRows
from lightopd.objectives.divergences import JSD, ForwardKL, ReverseKL, SkewForwardKL, SkewReverseKL
from lightopd.objectives.grpo import GRPO, KDRL
from lightopd.objectives.mixed import RLAD, UniOPD
from lightopd.objectives.opd_seq import OPDSeq
from lightopd.objectives.policy_gradient import GOPD, VOPD, LightningOPD, OPDImportanceSampling
from lightopd.objectives.redi import REDI
from lightopd.objectives.routed import SCOPE, SRPO
from lightopd.objectives.sft import SFT
from lightopd.objectives.taid import TAID

OBJECTIVES: dict[str, type[Objective]] = {o.name: o for o in (
    LightningOPD, OPDImportanceSampling, VOPD, GOPD, OPDSeq,
    ReverseKL, ForwardKL, JSD, SkewForwardKL, SkewReverseKL, TAID, SFT, GRPO, KDRL, REDI, SCOPE, SRPO, UniOPD, RLAD,
)}
ALIASES = {"lambda": "lambda_"}  # parameter keys a recipe or --set spells differently from Python


def lookup(name: str) -> type[Objective]:
    """The objective class called `name`, or InputError listing the valid names."""
    if name not in OBJECTIVES:
        raise InputError(f"--objective {name!r}: unknown objective (valid: {', '.join(OBJECTIVES)})")
    return OBJECTIVES[name]


__all__ = ["ALIASES", "OBJECTIVES", "Inputs", "Objective", "ObjectiveParams", "Requirements", "StepRows", "lookup"]
