"""The shared parts of the stage configs, each option declared once with its default and help.

`ModelSpec` (a model and how to run it), `SamplingSpec` (the distribution sampled from),
`EngineSpec` (what samples: the transformers loop or vLLM),
`SourceSpec` (where prompts come from, and their field mapping) and `RenderSpec` (how a record
becomes the model's input: chat rendering, prompt length; rollout and eval alike), and single
options used by several stages (`--limit`, `--worker`, ...).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

from lightopd.data.chat import CHAT_MODES, ChatSettings, Renderer
from lightopd.data.fields import Mapping
from lightopd.data.prompts import LONG_PROMPTS, Encoded, encode_all, provenance, read_prompts
from lightopd.data.sources import Source
from lightopd.errors import InputError
from lightopd.options import MIN_TEMPERATURE, check, flag_of, opt
from lightopd.tasks.verifiers import NAMES, is_checker, is_users

MAX_SAMPLES = 65536  # samples per prompt: beyond any group a step trains on, and short of filling memory with plans

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "float32", "bfloat16", "float16")


def device_option() -> Any:
    return opt("auto", "Device: auto (CUDA when available, else CPU), cpu, cuda, cuda:N or mps.", metavar="DEVICE",
               at_end=True)


def worker_option() -> Any:
    return opt("0/1", "I/N: write only shards i with i % N == I, so N processes (one per GPU, or the tasks of a "
                      "job array on a shared filesystem) fill one store together; rows do not depend on the split.",
               metavar="I/N")


def limit_option() -> Any:
    return opt(None, "Use only the first N prompt records.", metavar="N")


def generation_batch_size_option() -> Any:
    return opt(256, "Most sequences decoded together (prompts are grouped by length); --kv-cache-tokens bounds "
                    "their memory.", metavar="N")


def kv_cache_tokens_option() -> Any:
    return opt(None, "Most KV-cache tokens a decoding batch holds: rows x (longest prompt + max new tokens). "
                     "[default: what half the device's free memory holds (on CPU, of the system's available "
                     "memory)]", metavar="N")


def micro_batch_tokens_option(default: int, what: str) -> Any:
    return opt(default, f"Padded tokens per forward pass{what}; rows are packed longest first to this budget.",
               metavar="N")


def check_device(device: str) -> None:
    check(device in DEVICES or device.startswith("cuda:"), "--device",
          f"must be one of {', '.join(DEVICES)} or cuda:N, got {device!r}")


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """A Hugging Face causal LM and how to run it."""

    path: str = opt(help="A Hugging Face causal LM: a local directory, or a Hub id (org/name[@revision]) read from "
                         "the Hugging Face cache and downloaded when missing, unless HF_HUB_OFFLINE=1 (safetensors "
                         "weights only).", metavar="DIR|ID", parent_name=True)
    device: str = device_option()
    dtype: str = opt("auto", "Precision the model computes in; auto is bfloat16 on CUDA, float32 elsewhere. "
                             "Inference loads the weights in it; train keeps float32 weights and optimizer state "
                             "and computes forward and backward under autocast to it.", choices=DTYPES, metavar="DTYPE",
                     at_end=True)
    trust_remote_code: bool = opt(False, "Allow Python code shipped inside the model directory to run.", at_end=True)
    attn_implementation: str | None = opt(None, "The attention kernel transformers uses: sdpa, eager, "
                                                "flash_attention_2, flex_attention, ... [default: transformers' "
                                                "choice for the model, usually sdpa]", metavar="NAME", at_end=True)

    def __post_init__(self) -> None:
        check_device(self.device)
        check(self.dtype in DTYPES, "--dtype", f"must be one of {', '.join(DTYPES)}, got {self.dtype!r}")


@dataclass(frozen=True, kw_only=True)
class SamplingSpec:
    """The distribution sampled from: exactly this, never a model's own generation defaults."""

    n: int = opt(1, f"Samples per prompt (at most {MAX_SAMPLES:,}).", metavar="N")
    temperature: float = opt(1.0, "Sampling temperature; 0 is greedy decoding.", metavar="T")
    top_p: float = opt(1.0, "Nucleus sampling: draw from the smallest set of most likely tokens holding this much "
                            "probability (of what min-p and top-k left); 1 disables it.", metavar="P")
    top_k: int = opt(0, "Draw from the K most likely tokens only (ties at the K-th kept); 0 disables it.",
                     metavar="K")
    min_p: float = opt(0.0, "Draw only from tokens at least this fraction as likely as the most likely one; 0 "
                            "disables it.", metavar="P")
    repetition_penalty: float = opt(1.0, "Divide the positive logits (multiply the negative ones) of every token "
                                         "already in the prompt or the completion by this; 1 disables it.",
                                    metavar="R")
    presence_penalty: float = opt(0.0, "Subtract this from the logit of every token already in the completion.",
                                  metavar="P")
    frequency_penalty: float = opt(0.0, "Subtract this times its count in the completion from every token's logit.",
                                   metavar="F")
    stop: tuple[str, ...] = opt((), "End a sample at the token that completes this text (repeatable); the "
                                    "token is kept, and the sample ends with finish reason stop.", metavar="TEXT")
    max_new_tokens: int = opt(256, "Most tokens generated per sample (fewer if the model's context ends first).",
                              metavar="N")
    seed: int = opt(0, "Seed of every sample's random stream: the same seed and inputs give the same samples, "
                       "whatever the batching.", metavar="S")

    def __post_init__(self) -> None:
        check(1 <= self.n <= MAX_SAMPLES, "--n", f"samples per prompt must be in 1..{MAX_SAMPLES}, got {self.n}")
        check(self.temperature == 0 or self.temperature >= MIN_TEMPERATURE, "--temperature",
              f"must be 0 (greedy decoding) or at least {MIN_TEMPERATURE}, got {self.temperature}")
        check(0 < self.top_p <= 1, "--top-p", f"must be in (0, 1], got {self.top_p}")
        check(self.top_k >= 0, "--top-k", f"must be >= 0 (0 disables it), got {self.top_k}")
        check(0 <= self.min_p < 1, "--min-p", f"must be in [0, 1), got {self.min_p}")
        check(self.repetition_penalty > 0, "--repetition-penalty", f"must be > 0, got {self.repetition_penalty}")
        for flag, value in (("--presence-penalty", self.presence_penalty),
                            ("--frequency-penalty", self.frequency_penalty)):
            check(-2 <= value <= 2, flag, f"must be in [-2, 2], got {value}")
        object.__setattr__(self, "stop", tuple(self.stop or ()))
        check(all(isinstance(s, str) and s for s in self.stop), "--stop", "must be non-empty text")
        check(self.max_new_tokens >= 1, "--max-new-tokens", f"must be >= 1, got {self.max_new_tokens}")

    @property
    def truncates(self) -> bool:
        """Whether the sampler keeps only part of the vocabulary (top-p, top-k, min-p)."""
        return self.top_p < 1 or self.top_k > 0 or self.min_p > 0

    @property
    def penalizes(self) -> bool:
        """Whether the sampler changes logits by the tokens already seen."""
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0

    def record(self) -> dict:
        """What a store records of the sampling (the manifest's `sampling`)."""
        return {"n": self.n, "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                "min_p": self.min_p, "repetition_penalty": self.repetition_penalty,
                "presence_penalty": self.presence_penalty, "frequency_penalty": self.frequency_penalty,
                "stop": list(self.stop), "max_new_tokens": self.max_new_tokens, "seed": self.seed,
                "policy_logprobs": self.policy_differs}

    @property
    def policy_differs(self) -> bool:
        """Whether a token's log-prob under the model's untruncated softmax at T (ℓold) can differ from
        its log-prob under the sampler (ℓμ): rows store ℓold only then (greedy: ℓold is at T = 1)."""
        return self.temperature == 0 or self.truncates or self.penalizes


CHECKER_TIMEOUT = 10.0  # seconds: the default of --checker-timeout
MAX_CHECKER_TIMEOUT = 86400.0  # a day (a pipe's poll cannot wait much past 24 days)


@dataclass(frozen=True, kw_only=True)
class CheckerSpec:
    """How a completion is scored against its record's reference answer: eval's verdicts, rollout's rewards."""

    checker: str = opt("auto", "How answers are compared: auto (math when the reference's answer is a number or "
                               "either side has \\boxed{}, else exact), exact, math, reasoning-gym (the task's own "
                               "scoring), or MODULE:FUNCTION / FILE.py:FUNCTION, your own function(completion, "
                               "reference, metadata) -> bool or a score (correct when at least 1). Answers are read "
                               "from <answer> tags, \\boxed{}, '#### x' or 'Answer: x', in the completion and the "
                               "reference alike (README: Checkers).", metavar="NAME")
    checker_timeout: float = opt(CHECKER_TIMEOUT, "Seconds a checker of your own (MODULE:FUNCTION), which runs in a "
                                                  "process of its own, may take on one sample (and to import); then "
                                                  "it is ended, and the command stops naming the sample.",
                                 metavar="SECONDS")

    def __post_init__(self) -> None:
        check(is_checker(self.checker), "--checker",
              f"must be one of {', '.join(NAMES)} or MODULE:FUNCTION, got {self.checker!r}")
        check(0 < self.checker_timeout <= MAX_CHECKER_TIMEOUT, "--checker-timeout",
              f"must be > 0 and at most {MAX_CHECKER_TIMEOUT:g} seconds, got {self.checker_timeout:g}")
        check(is_users(self.checker) or self.checker_timeout == CHECKER_TIMEOUT, "--checker-timeout",
              f"only with a checker of your own (MODULE:FUNCTION), not --checker {self.checker}")


ENGINES = ("hf", "vllm")


@dataclass(frozen=True, kw_only=True)
class EngineSpec:
    """What runs the model for sampling: lightopd's own transformers loop, or vLLM."""

    engine: str = opt("hf", "What samples: hf (transformers, lightopd's own batched decoding loop) or vllm "
                            "(continuous batching with paged attention, much faster on GPUs; pip install "
                            "'lightopd[vllm]'). Both write the same columns with the same meaning; the tokens "
                            "drawn for a seed differ between them.", choices=ENGINES)
    tensor_parallel_size: int = opt(1, "vllm: GPUs one copy of the model is split over.", metavar="N")
    gpu_memory_utilization: float = opt(0.9, "vllm: share of each GPU's memory it may take (weights, activations "
                                             "and its KV cache).", metavar="F")
    max_model_len: int | None = opt(None, "vllm: longest sequence (prompt + completion) it plans KV cache for. "
                                          "[default: the model's context]", metavar="N")

    def __post_init__(self) -> None:
        check(self.engine in ENGINES, "--engine", f"must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        check(self.tensor_parallel_size >= 1, "--tensor-parallel-size",
              f"must be >= 1, got {self.tensor_parallel_size}")
        check(0 < self.gpu_memory_utilization <= 1, "--gpu-memory-utilization",
              f"must be in (0, 1], got {self.gpu_memory_utilization}")
        check(self.max_model_len is None or self.max_model_len >= 2, "--max-model-len",
              f"must be >= 2, got {self.max_model_len}")
        if self.engine == "hf":  # the other options are vLLM's: each must keep its declared default
            changed = [flag_of(f.name) for f in dataclasses.fields(self)
                       if f.name != "engine" and getattr(self, f.name) != f.default]
            check(not changed, changed[0] if changed else "--engine", "only with --engine vllm")


PROMPTS_HELP = ("A .jsonl, .parquet or .csv file, a Hugging Face dataset (hf:org/name[@revision], "
                "with --split and --subset; needs `pip install 'lightopd[datasets]'`) or a directory saved by "
                "datasets' save_to_disk. Fields are recognised (prompt/question/problem, messages/conversations, "
                "answer/solution/..., id) or named with the --*-field options; others are kept as metadata.")


def _field(role: str, example: str) -> Any:
    return opt(None, f"Field holding the {role} (default: recognised by name, e.g. {example}).", metavar="NAME")


@dataclass(frozen=True, kw_only=True)
class SourceSpec:
    """Where prompt records come from, and which of their fields play which role."""

    source: str = opt(help=PROMPTS_HELP, metavar="SOURCE", parent_name=True)
    split: str | None = opt(None, "Split of a Hugging Face dataset. [default: train]", metavar="NAME")
    subset: str | None = opt(None, "Subset (configuration) of a Hugging Face dataset, e.g. main for openai/gsm8k.",
                             metavar="NAME")
    prompt_field: str | None = _field("prompt text", "prompt, question, problem")
    messages_field: str | None = _field("chat messages", "messages, or ShareGPT conversations")
    answer_field: str | None = _field("reference answer", "answer, final_answer, target, ground_truth, solution")
    id_field: str | None = _field("record id", "id, idx, uid, unique_id; else the record's index")

    def open(self) -> Source:
        return Source(self.source, self.split, self.subset)

    def mapping(self) -> Mapping:
        return Mapping(self.prompt_field, self.messages_field, self.answer_field, self.id_field)

    def record(self) -> dict:
        """What a store records of the mapping (its source records itself: Source.identity)."""
        return {"fields": self.mapping().flags()}


@dataclass(frozen=True, kw_only=True)
class RenderSpec:
    """How a prompt record becomes the model's input: chat rendering and prompt length."""

    chat: str = opt("auto", "Whether a plain prompt becomes one user turn of the chat template; auto: when the "
                            "template ends a turn with the model's end token, as a chat model's does. Messages are "
                            "always rendered with the template.", choices=CHAT_MODES)
    system_prompt: str | None = opt(None, "A system turn put first in every chat that has none.", metavar="TEXT")
    chat_template_kwargs: str | None = opt(None, "JSON object passed to the chat template, e.g. "
                                                 "'{\"enable_thinking\": false}' for Qwen3.", metavar="JSON")
    max_prompt_tokens: int | None = opt(None, "Longest prompt, in tokens (always short enough to leave room to "
                                              "generate in the model's context).", metavar="N")
    long_prompts: str = opt("error", "What happens to a longer prompt: error (stop, naming it), skip (leave it "
                                     "out), truncate (keep its last tokens).", choices=LONG_PROMPTS)

    def __post_init__(self) -> None:
        check(self.chat in CHAT_MODES, "--chat", f"must be one of {', '.join(CHAT_MODES)}, got {self.chat!r}")
        check(self.long_prompts in LONG_PROMPTS, "--long-prompts",
              f"must be one of {', '.join(LONG_PROMPTS)}, got {self.long_prompts!r}")
        check(self.max_prompt_tokens is None or self.max_prompt_tokens >= 1, "--max-prompt-tokens",
              f"must be >= 1, got {self.max_prompt_tokens}")
        self.template_kwargs()

    def template_kwargs(self) -> dict:
        return template_kwargs(self.chat_template_kwargs, "--chat-template-kwargs")

    def chat_settings(self) -> ChatSettings:
        return ChatSettings(self.chat, self.system_prompt, self.template_kwargs())


@dataclass(frozen=True, kw_only=True)
class ContextSpec:
    """The teacher's own prompt, built from each row's record (data/context.py)."""

    teacher_prompt: str | None = opt(None, "Template of the teacher's prompt, so the teacher sees more than the "
                                           "student: {prompt} (the student's prompt text), {answer}, and metadata "
                                           "fields by name, e.g. 'Solution: {solution} Problem: {prompt}'. "
                                           "Rendered with the teacher's chat template by --chat's rules; the "
                                           "teacher scores the student's completion after it. [default: the "
                                           "student's prompt ids]", metavar="TEMPLATE")
    teacher_system_prompt: str | None = opt(None, "A system turn first in the teacher's chat.", metavar="TEXT")
    teacher_chat: str = opt("auto", "--chat for the teacher's prompt.", choices=CHAT_MODES)
    teacher_chat_template_kwargs: str | None = opt(None, "--chat-template-kwargs for the teacher's prompt.",
                                                   metavar="JSON")
    teacher_long_prompts: str = opt("error", "A teacher prompt that leaves no room in the teacher's context for its "
                                             "prompt's longest completion: error, skip (leave the prompt's rows "
                                             "out), truncate (keep its last tokens).", choices=LONG_PROMPTS)

    def __post_init__(self) -> None:
        check(self.teacher_chat in CHAT_MODES, "--teacher-chat",
              f"must be one of {', '.join(CHAT_MODES)}, got {self.teacher_chat!r}")
        check(self.teacher_long_prompts in LONG_PROMPTS, "--teacher-long-prompts",
              f"must be one of {', '.join(LONG_PROMPTS)}, got {self.teacher_long_prompts!r}")
        if self.teacher_prompt is None:
            changed = [flag for flag, on in (("--teacher-system-prompt", self.teacher_system_prompt is not None),
                                             ("--teacher-chat-template-kwargs", self.teacher_chat_template_kwargs),
                                             ("--teacher-chat", self.teacher_chat != "auto"),
                                             ("--teacher-long-prompts", self.teacher_long_prompts != "error")) if on]
            check(not changed, changed[0] if changed else "", "only with --teacher-prompt (the teacher otherwise "
                                                               "scores the student's own prompt ids)")
        self.chat_settings()

    def chat_settings(self) -> ChatSettings:
        return ChatSettings(self.teacher_chat, self.teacher_system_prompt,
                            template_kwargs(self.teacher_chat_template_kwargs, "--teacher-chat-template-kwargs"))


def template_kwargs(text: str | None, flag: str) -> dict:
    """The chat template's keyword arguments from a JSON object (standard JSON only: it is written into
    the store's manifest)."""
    if text is None:
        return {}
    try:
        kwargs = json.loads(text, parse_constant=lambda c: _not_standard(c, flag),
                            parse_float=lambda f: _finite_float(f, flag))
    except json.JSONDecodeError as e:
        raise InputError(f"{flag}: not JSON ({e.msg} at column {e.colno})") from None
    check(isinstance(kwargs, dict), flag, f"must be a JSON object such as '{{\"enable_thinking\": false}}', got {text}")
    return kwargs


def _not_standard(constant: str, flag: str):
    raise InputError(f"{flag}: {constant} is not standard JSON (JSON numbers are finite)")


def _finite_float(text: str, flag: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise InputError(f"{flag}: {text} is not a finite number (JSON numbers are finite)")
    return value


def load_prompts(prompts: SourceSpec, render: RenderSpec, limit: int | None, tokenizer, eos_ids: list[int],
                 context: int | None) -> tuple[Encoded, dict]:
    """The prompt records of a source, validated and rendered to token ids under the length policy,
    and what a store records of them (data.prompts.provenance)."""
    source, mapping = prompts.open(), prompts.mapping()
    records = read_prompts(source, mapping, limit)
    renderer = Renderer(tokenizer, render.chat_settings(), eos_ids)
    encoded = encode_all(renderer, records, context, render.max_prompt_tokens, render.long_prompts)
    return encoded, provenance(source, mapping, renderer, encoded, limit, render.max_prompt_tokens,
                               render.long_prompts)
