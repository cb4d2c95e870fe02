"""A store's rewards by prompt group: the reward mean, each prompt's pass rate, and how many
prompts' samples all scored alike (a group whose rewards are all equal carries no group-relative
signal: every advantage of a group baseline is 0 there).

A sample passes when its reward is at least 1, as eval's verdicts go. Reads only the `prompt_id`
and `reward` columns, shard by shard.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path

from lightopd.data.reader import iter_batches


def rewards_by_prompt(directory: str | Path, manifest: dict) -> dict[str, list[float]]:
    """{prompt id: the rewards of its samples}, rows without a reward left out."""
    groups: dict[str, list[float]] = defaultdict(list)
    for batch in iter_batches(directory, columns=["prompt_id", "reward"], manifest=manifest):
        for prompt_id, reward in zip(batch.column("prompt_id").to_pylist(), batch.column("reward").to_pylist(),
                                     strict=True):
            if reward is not None:
                groups[prompt_id].append(reward)
    return dict(groups)


def reward_summary(groups: dict[str, list[float]]) -> dict:
    """Reward mean, pass rate, per-prompt pass rates (mean, median, min, max; how many prompts all
    pass, none pass, or mixed) and the share of prompts whose samples' rewards are all equal."""
    rewards = [r for rs in groups.values() for r in rs]
    if not rewards:
        return {"rows": 0}
    rates = [sum(r >= 1.0 for r in rs) / len(rs) for rs in groups.values()]
    return {
        "rows": len(rewards),
        "mean": round(statistics.fmean(rewards), 4),
        "pass_rate": round(sum(r >= 1.0 for r in rewards) / len(rewards), 4),
        "prompts": len(groups),
        "pass_rate_per_prompt": {"mean": round(statistics.fmean(rates), 4), "median": statistics.median(rates),
                                 "min": min(rates), "max": max(rates)},
        "prompts_all_pass": sum(r == 1.0 for r in rates),
        "prompts_none_pass": sum(r == 0.0 for r in rates),
        "prompts_all_equal_share": round(sum(len(set(rs)) == 1 for rs in groups.values()) / len(groups), 4),
    }
