"""The trainer's parts: one optimizer step (trainer.py), the step loop with metrics and
checkpoints (loop.py), checkpoints (checkpoints.py), the learning-rate schedule (schedule.py), and
running across ranks (distributed.py: torchrun's process group; parallel.py: DDP or FSDP2)."""
