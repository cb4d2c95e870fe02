"""`score-teacher --engine vllm`: per-token teacher statistics from vLLM's prompt log-probs, for
teachers that need its tensor parallelism, behind the same `score` interface as engine.scoring.

Each rollout row (prompt + completion) is one request whose prompt log-probs vLLM returns at
every position: the k most likely tokens and the token that follows. These give, exactly, the
sampled token's log-prob and the top-k ids and log-probs at temperature 1 (vLLM's prompt
log-probs are the raw distribution, so other temperatures are refused). They do not give the
mass outside the top-k to useful precision (1 − Σ top-k cancels when the teacher is confident)
nor the entropy: those columns are written empty and the manifest lists them as `unavailable`,
so that an objective that reads them refuses the store. Where the output layer has rows
beyond the tokenizer (padding), vLLM normalises over them too, and the top-k is taken among
the tokenizer's ids from enough candidates to be sure to find k of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from lightopd.engine import models
from lightopd.engine.vllm_engine import generate, open_llm
from lightopd.objectives.stats import LogprobStats
from lightopd.specs import EngineSpec, ModelSpec

UNAVAILABLE = ("teacher_log_tail", "teacher_entropy")  # columns this scorer cannot fill


class VllmScorer:
    """Teacher statistics (sampled-token log-prob, top-k) through a vLLM engine."""

    unavailable = UNAVAILABLE

    def __init__(self, model_dir: Path, spec: ModelSpec, engine: EngineSpec, info: models.ModelInfo, k: int):
        self.k, self.vocab = k, info.vocab
        # candidates per position: k, plus as many as there are padding rows that could outrank real ids
        self.candidates = k + max(0, (info.output_rows or info.vocab) - info.vocab)
        self.llm = open_llm(model_dir, spec, engine, 0, "--teacher", max_logprobs=self.candidates)

    def score(self, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
              keys: Sequence[tuple[str, int]] = ()) -> list[LogprobStats]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        requests = [TokensPrompt(prompt_token_ids=list(p) + list(c)) for p, c in zip(prompts, completions, strict=True)]
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=self.candidates, detokenize=False)
        outputs = generate(self.llm, requests, params, "--teacher")
        return [self._row(out.prompt_logprobs, len(p), list(c))
                for out, p, c in zip(outputs, prompts, completions, strict=True)]

    def _row(self, positions, start: int, completion: list[int]) -> LogprobStats:
        sampled, top_ids, top_lps = [], [], []
        for t, token in enumerate(completion):
            found = positions[start + t]  # {id: Logprob} of the distribution that predicts this token
            sampled.append(found[token].logprob)
            ranked = sorted(((lp.rank, i, lp.logprob) for i, lp in found.items() if i < self.vocab))[:self.k]
            top_ids.append([i for _, i, _ in ranked])
            top_lps.append([lp for _, _, lp in ranked])
        n = len(completion)
        nan = torch.full((n,), float("nan"))
        top = torch.tensor(top_lps, dtype=torch.float32).view(n, self.k)
        return LogprobStats(sampled=torch.tensor(sampled, dtype=torch.float32), entropy=nan,
                            argmax=torch.tensor([ids[0] for ids in top_ids], dtype=torch.long).view(n),
                            topk_logprobs=top, topk_ids=torch.tensor(top_ids, dtype=torch.long).view(n, self.k),
                            topk_rest=nan.clone())
