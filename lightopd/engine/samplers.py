"""The sampler behind `rollout` and `eval`, one interface over two engines: `--engine hf`
(lightopd's own batched transformers loop, engine/generate.py) and `--engine vllm`
(engine/vllm_engine.py, an optional extra).

`sampler.sample(prompt_ids, names, sampling, on_step, policy)` returns, for every prompt,
`sampling.n` Completions (token ids, their log-probs under the sampling distribution (ℓμ:
penalties, temperature, min-p, top-k, top-p) and, when `policy` asks for them, under the model's
untruncated softmax at the temperature (ℓold; an engine that would need extra work for them
skips it otherwise), finish reason); sample j of prompt `name` is drawn from a random stream keyed by
(seed, name, j) in either engine, so a rerun or a resumed run writes the same rows.
`engine_record(engine)` is what a store records of the engine.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from lightopd.config import SamplingSpec
from lightopd.engine import models
from lightopd.engine.generate import Completion, sample_prompts
from lightopd.engine.stops import StopTexts
from lightopd.specs import EngineSpec, ModelSpec

OnStep = Callable[[int, int], None]  # (new tokens, finished rows), for progress


class Sampler(Protocol):
    def sample(self, prompt_ids: Sequence[Sequence[int]], names: Sequence[str], sampling: SamplingSpec,
               on_step: OnStep | None = None, policy: bool = True) -> list[list[Completion]]: ...

    def close(self) -> None: ...


class HFSampler:
    """A transformers model, decoded by engine.generate in batches of at most `batch_size` rows and
    `kv_tokens` KV-cache tokens; `tokenizer()` gives the tokenizer that decodes rows for stop texts
    (loaded only when a sampling has some)."""

    def __init__(self, model, info: models.ModelInfo, batch_size: int, kv_tokens: int | None,
                 tokenizer: Callable[[], object] | None = None):
        self.model, self.info, self.batch_size, self.kv_tokens = model, info, batch_size, kv_tokens
        self.tokenizer = tokenizer

    def sample(self, prompt_ids, names, sampling, on_step=None, policy=True):  # ℓold costs the loop nothing
        stops = StopTexts(self.tokenizer(), sampling.stop) if sampling.stop else None
        return sample_prompts(self.model, prompt_ids, names, sampling, self.batch_size, self.info,
                              on_step=on_step, kv_tokens=self.kv_tokens, stops=stops)

    def close(self) -> None:
        self.model = None


def open_sampler(model_dir: Path, spec: ModelSpec, engine: EngineSpec, info: models.ModelInfo, batch_size: int,
                 kv_tokens: int | None, seed: int) -> Sampler:
    """The sampler `engine` asks for, with the model loaded."""
    if engine.engine == "vllm":
        from lightopd.engine.vllm_engine import VllmSampler

        return VllmSampler(model_dir, spec, engine, info, seed)
    return HFSampler(models.hf_model(model_dir, spec), info, batch_size, kv_tokens,
                     functools.cache(lambda: models.load_tokenizer(model_dir, spec.trust_remote_code)))


def check_engine(engine: EngineSpec) -> None:
    """Exit 2 before any work when the engine asked for cannot run here."""
    if engine.engine == "vllm":
        from lightopd.engine.vllm_engine import check_installed

        check_installed()


def engine_context(info: models.ModelInfo, engine: EngineSpec) -> models.ModelInfo:
    """`info` with the context vLLM plans for (--max-model-len) where it is shorter than the model's:
    prompts and completion lengths are checked against it."""
    if engine.max_model_len is None or (info.context is not None and info.context <= engine.max_model_len):
        return info
    return dataclasses.replace(info, context=engine.max_model_len)


def engine_record(engine: EngineSpec) -> dict:
    """What a store records of the engine that sampled it (what changes its rows)."""
    if engine.engine == "vllm":
        from lightopd.engine import vllm_engine

        return vllm_engine.engine_record(engine)
    return {"name": "hf"}
