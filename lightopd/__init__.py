"""lightopd: offline on-policy distillation of language models.

Four commands, each writing a durable store on disk: `rollout` samples the student,
`score-teacher` runs the teacher once over those samples, `train` learns from the stored signal
with no teacher in memory, `eval` measures the result.
"""

__version__ = "0.1.0"
