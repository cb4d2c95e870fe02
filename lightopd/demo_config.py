"""The configuration of `lightopd demo`: the sizes, steps and learning rates of the bundled-task
recipe, and which variant runs (the Lightning OPD recipe, or self-distillation of a context)."""

from __future__ import annotations

from dataclasses import dataclass

from lightopd.config import Config
from lightopd.objectives import OBJECTIVES
from lightopd.options import check, opt
from lightopd.specs import check_device, device_option


@dataclass(frozen=True, kw_only=True)
class DemoConfig(Config):
    """`lightopd demo`: the Lightning OPD recipe end to end on the bundled addition task.

    The defaults are the full-size demo (about a minute on 2 CPU cores); tests shrink the counts."""

    out: str = opt("lightopd-demo", "Directory for every prompt file, store and model of the run (must be new).",
                   metavar="DIR")
    seed: int = opt(0, "Seed of the student's initialisation, the prompts, every sampling and the data order.",
                    metavar="S")
    objective: str = opt("opd-seq", "The OPD objective of step 5.", metavar="NAME")
    sft_prompts: int = opt(10000, "Train prompts the teacher answers once each (T = 1): the SFT data.", metavar="N")
    sft_steps: int = opt(1500, "SFT steps.", metavar="N")
    sft_lr: float = opt(3e-3, "SFT learning rate (also of the SFT-more control).", metavar="LR")
    sft_batch_size: int = opt(64, "SFT sequences per step.", metavar="N")
    opd_prompts: int = opt(2000, "Train prompts the SFT student answers --opd-samples times each.", metavar="N")
    opd_samples: int = opt(4, "Samples per OPD prompt.", metavar="N")
    opd_steps: int = opt(600, "OPD steps, and the steps of the SFT-more control.", metavar="N")
    opd_lr: float = opt(3e-4, "OPD learning rate.", metavar="LR")
    opd_batch_size: int = opt(32, "OPD sequences per step (whole prompt groups: 8 prompts x 4 samples).",
                              metavar="N")
    top_k: int = opt(8, "Teacher top-k stored by the scoring step.", metavar="K")
    heldout_prompts: int = opt(2000, "Held-out pairs of the evaluation (one sample each at T = 1; no training "
                                     "prompt uses them).", metavar="N")
    student_hidden: int = opt(64, "Width of the random student.", metavar="N")
    student_layers: int = opt(1, "Layers of the random student.", metavar="N")
    student_heads: int = opt(8, "Attention heads of the random student.", metavar="N")
    student_arch: str = opt("gpt2", "gpt2 (learned positions: the prompt's digits always sit at the same places) "
                                    "or llama.", choices=("gpt2", "llama"))
    student_dropout: bool = opt(True, "Train the student with its dropout (GPT-2's 0.1) on, in SFT and OPD alike: "
                                      "a 52k-parameter student that sees each stored rollout a few times needs the "
                                      "regularisation (train turns dropout off unless asked).")
    context: bool = opt(False, "Self-distillation of a context instead of a bigger teacher: the tagged teacher "
                               "(tasks/teachers/tagged) writes SFT data half of whose prompts carry the tag '+', "
                               "which asks for the worked format; the SFT student scores its own untagged "
                               "rollouts as if tagged (score-teacher --teacher SFT --teacher-prompt '+{prompt}') "
                               "and trains on that store, never seeing the tag. The table adds the SFT student "
                               "given the tag (sft_tagged, the ceiling).")
    device: str = device_option()

    def __post_init__(self) -> None:
        for name in ("sft_prompts", "sft_steps", "sft_batch_size", "opd_prompts", "opd_steps", "opd_batch_size",
                     "top_k", "heldout_prompts", "student_hidden", "student_layers", "student_heads"):
            check(getattr(self, name) >= 1, f"--{name.replace('_', '-')}", f"must be >= 1, got {getattr(self, name)}")
        check(self.sft_lr > 0 and self.opd_lr > 0, "--sft-lr/--opd-lr", "must be > 0")
        step5 = [name for name in OBJECTIVES if name != "sft"]  # sft is the SFT-more control already
        check(self.objective in step5, "--objective",
              f"must be one of {', '.join(step5)} (sft is the SFT-more control), got {self.objective!r}")
        needs = OBJECTIVES[self.objective]().needs()
        check(self.opd_samples >= needs.min_samples, "--opd-samples",
              f"must be >= {needs.min_samples} for {self.objective} ({needs.why}), got {self.opd_samples}")
        check(self.student_hidden % self.student_heads == 0, "--student-heads", "must divide --student-hidden")
        check(self.student_arch in ("gpt2", "llama"), "--student-arch",
              f"must be gpt2 or llama, got {self.student_arch!r}")
        check_device(self.device)
