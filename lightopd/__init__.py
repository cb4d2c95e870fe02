"""lightopd: offline on-policy distillation of language models.

Each stage writes a durable store on disk for the next: `rollout` samples the student,
`score-teacher` runs the teacher once over those samples, `train` learns from the stored signal
with no teacher in memory, `eval` measures the result; `inspect` describes and verifies any store
and `demo` runs the whole recipe on a bundled task. The command line is `lightopd.cli`.
"""

__version__ = "0.1.0"
