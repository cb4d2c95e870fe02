"""The commands, each a `run(config)` that wires components together: rollout, score (score-teacher),
train, evaluate (eval), inspect_store (inspect) and demo."""
