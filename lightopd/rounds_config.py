"""The configuration of `lightopd rounds`: the stages' options it passes on (the student and its
sampling, the teacher's scoring, the training keys) and when a round ends and the next samples."""

from __future__ import annotations

from dataclasses import dataclass

from lightopd.config import Config
from lightopd.options import check, opt
from lightopd.specs import (
    CheckerSpec,
    EngineSpec,
    ModelSpec,
    RenderSpec,
    SamplingSpec,
    SourceSpec,
    generation_batch_size_option,
    limit_option,
)
from lightopd.stopping import stop_rule


@dataclass(frozen=True, kw_only=True)
class RoundsConfig(Config):
    """`lightopd rounds`: rollout, score-teacher and train (and a held-out check) round after round."""

    student: ModelSpec = opt(help="The student (its SFT model): round 1 samples and trains it; round r samples "
                                  "and trains round r−1's.")
    teacher: str = opt(help="The teacher that scores every round's rollouts (the student's SFT teacher): a "
                            "directory or a Hub id.", metavar="MODEL")
    prompts: SourceSpec = opt(help="The prompts every round samples, with a seed of its own (--seed + round − 1).")
    render: RenderSpec = opt(RenderSpec())
    out: str = opt(help="Directory of the run: OUT/round-N/ holds that round's rollouts, teacher-store, student "
                        "and held-out check; OUT/rounds.jsonl one line per round.", metavar="DIR")
    rounds: int = opt(2, "Rounds: every round samples the current student afresh (with --refresh-when, the "
                         "rounds go on, shorter, until R × M steps are trained).", metavar="R")
    steps_per_round: int = opt(50, "Optimizer steps of a round (its last step may come sooner with --refresh-when). "
                                   "The run trains R × M steps in all: one round of M = R × M steps is offline "
                                   "OPD (Lightning OPD); M = 1 samples before every step.", metavar="M")
    refresh_when: str | None = opt(None, "End a round early, and sample the next, at the first step whose metric "
                                         "crosses: NAME<X or NAME>X (is_ess<0.8, rollout_kl>0.02, "
                                         "clip_fraction>0.2). The rounds then go on until the R × M steps are "
                                         "trained. [default: every M steps]", metavar="NAME<X")
    refresh_window: int = opt(1, "--refresh-when reads the mean of its metric over the last N steps of the round "
                                 "(a round then lasts at least N steps).", metavar="N")
    prompts_per_round: int | None = opt(None, "Each round samples the next N prompts of the source (cycling "
                                              "through it) instead of all of them: a round of one step needs one "
                                              "batch of prompts. [default: all, every round]", metavar="N")
    objective: str = opt("lightning-opd", "The training objective (train's --objective).", metavar="NAME")
    lr: float = opt(1e-5, "The learning rate of every round (each round starts its optimizer afresh).", metavar="LR")
    batch_size: int = opt(16, "Sequences per optimizer step.", metavar="N")
    sampling: SamplingSpec = opt(SamplingSpec())
    teacher_top_k: int = opt(32, "Teacher log-probs stored per position (score-teacher's --top-k).", metavar="K")
    heldout: str | None = opt(None, "A prompt file with answers checked after every round: the round's student "
                                    "samples it once per prompt (at --temperature) and the teacher scores those "
                                    "samples, for accuracy and the held-out KL to the teacher (beside the training "
                                    "k1: a student that games its teacher shows the two apart).", metavar="FILE")
    checking: CheckerSpec = opt(CheckerSpec())
    engine: EngineSpec = opt(EngineSpec())
    limit: int | None = limit_option()
    generation_batch_size: int = generation_batch_size_option()
    keep_teacher: bool = opt(True, "Keep the teacher loaded from round to round (its memory is then held while "
                                   "the student trains), and hand each round's trained student to the next round "
                                   "in memory; --no-keep-teacher loads the teacher again for each scoring and reads "
                                   "each student from its directory.")
    save_every: int = opt(10, "A resumable checkpoint of each round's training every N steps.", metavar="N")

    def __post_init__(self) -> None:
        check(self.rounds >= 1, "--rounds", f"must be >= 1, got {self.rounds}")
        check(self.steps_per_round >= 1, "--steps-per-round", f"must be >= 1, got {self.steps_per_round}")
        check(self.teacher_top_k >= 1, "--teacher-top-k", f"must be >= 1, got {self.teacher_top_k}")
        check(self.batch_size >= 1, "--batch-size", f"must be >= 1, got {self.batch_size}")
        check(self.lr > 0, "--lr", f"must be > 0, got {self.lr}")
        check(self.prompts_per_round is None or self.prompts_per_round >= 1, "--prompts-per-round",
              f"must be >= 1, got {self.prompts_per_round}")
        check(self.save_every >= 1, "--save-every", f"must be >= 1, got {self.save_every}")
        stop_rule(self.refresh_when, "--refresh-when")
        check(self.refresh_window >= 1, "--refresh-window", f"must be >= 1, got {self.refresh_window}")

    @property
    def budget(self) -> int:
        """Optimizer steps of the whole run."""
        return self.rounds * self.steps_per_round
