"""Configuration dataclasses read by every stage; each default lives here and only here.

The CLI builds these from its options (its defaults are read from the class attributes below),
and each dataclass validates itself so that a bad value is reported before any work starts.
"""

from __future__ import annotations

from dataclasses import dataclass

from lightopd.errors import InputError

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "float32", "bfloat16", "float16")
TOPK_DTYPES = ("float16", "float32")


def _check(ok: bool, option: str, message: str) -> None:
    if not ok:
        raise InputError(f"{option}: {message}")


def _check_device_dtype(device: str, dtype: str) -> None:
    _check(device in DEVICES or device.startswith("cuda:"), "--device",
           f"must be one of {', '.join(DEVICES)} or cuda:N, got {device!r}")
    _check(dtype in DTYPES, "--dtype", f"must be one of {', '.join(DTYPES)}, got {dtype!r}")


@dataclass(frozen=True)
class SamplingConfig:
    """The distribution a rollout samples from; exactly this, never a model's own defaults."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256

    def __post_init__(self) -> None:
        _check(self.temperature >= 0, "--temperature", f"must be >= 0 (0 means greedy), got {self.temperature}")
        _check(0 < self.top_p <= 1, "--top-p", f"must be in (0, 1], got {self.top_p}")
        _check(self.max_new_tokens >= 1, "--max-new-tokens", f"must be >= 1, got {self.max_new_tokens}")


@dataclass(frozen=True)
class RolloutConfig:
    """`lightopd rollout`: sample a model on a prompt file into a rollout store."""

    model: str
    prompts: str
    out: str
    n: int = 1
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    limit: int | None = None
    batch_size: int = 64
    prompts_per_shard: int = 256
    worker: str = "0/1"  # I/N: write only shards i with i % N == I
    device: str = "auto"
    dtype: str = "auto"
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        _check(self.n >= 1, "--n", f"samples per prompt must be >= 1, got {self.n}")
        _check(self.limit is None or self.limit >= 1, "--limit", f"must be >= 1, got {self.limit}")
        _check(self.batch_size >= 1, "--batch-size", f"must be >= 1, got {self.batch_size}")
        _check(self.prompts_per_shard >= 1, "--prompts-per-shard", f"must be >= 1, got {self.prompts_per_shard}")
        _check_device_dtype(self.device, self.dtype)
        parse_worker(self.worker)
        SamplingConfig(self.temperature, self.top_p, self.max_new_tokens)  # validates those three

    @property
    def sampling(self) -> SamplingConfig:
        return SamplingConfig(self.temperature, self.top_p, self.max_new_tokens)


def parse_worker(spec: str) -> tuple[int, int]:
    """`I/N` -> (I, N), with 0 <= I < N."""
    try:
        index, count = (int(x) for x in spec.split("/"))
    except ValueError:
        raise InputError(f"--worker: expected I/N (e.g. 0/4), got {spec!r}") from None
    _check(count >= 1 and 0 <= index < count, "--worker", f"expected 0 <= I < N, got {spec!r}")
    return index, count


@dataclass(frozen=True)
class ScoreConfig:
    """`lightopd score-teacher`: the teacher's log-probs over a rollout store, into a teacher store."""

    teacher: str
    rollouts: str
    out: str
    top_k: int = 32
    temperature: float = 1.0
    worker: str = "0/1"
    max_batch_tokens: int = 8192
    chunk_elements: int = 1 << 23  # logits entries reduced at once: bounds the float32 scratch (32 MiB each)
    topk_dtype: str = "float16"
    device: str = "auto"
    dtype: str = "auto"
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        _check(self.top_k >= 1, "--top-k", f"must be >= 1, got {self.top_k}")
        _check(self.temperature > 0, "--temperature", f"must be > 0, got {self.temperature}")
        _check(self.max_batch_tokens >= 1, "--max-batch-tokens", f"must be >= 1, got {self.max_batch_tokens}")
        _check(self.chunk_elements >= 1, "chunk_elements", f"must be >= 1, got {self.chunk_elements}")
        _check(self.topk_dtype in TOPK_DTYPES, "--topk-dtype",
               f"must be one of {', '.join(TOPK_DTYPES)}, got {self.topk_dtype!r}")
        _check_device_dtype(self.device, self.dtype)
        parse_worker(self.worker)

    @property
    def worker_index(self) -> tuple[int, int]:
        return parse_worker(self.worker)


# ---- objective parameters (OBJECTIVES.md); `--set objective.<field>=value` sets them ----

@dataclass(frozen=True)
class ObjectiveParams:
    """Shared by every objective: the student's softmax temperature τ."""

    temperature: float = 1.0

    def __post_init__(self) -> None:
        _check(self.temperature > 0, "objective.temperature", f"must be > 0, got {self.temperature}")


@dataclass(frozen=True)
class PolicyGradientParams(ObjectiveParams):
    """lightning-opd, vopd: optional truncated importance sampling against the rollout policy."""

    importance: str = "none"  # "none" or "tis"
    is_cap: float = 2.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.importance in ("none", "tis"), "objective.importance",
               f"must be none or tis, got {self.importance!r}")
        _check(self.is_cap > 0, "objective.is_cap", f"must be > 0, got {self.is_cap}")


@dataclass(frozen=True)
class ImportanceSamplingParams(ObjectiveParams):
    """opd-is: the importance ratio is clipped at `is_cap`."""

    is_cap: float = 2.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.is_cap > 0, "objective.is_cap", f"must be > 0, got {self.is_cap}")


@dataclass(frozen=True)
class GOPDParams(PolicyGradientParams):
    """g-opd: reward extrapolation factor λ (set as `objective.lambda`); λ = 1 is lightning-opd."""

    lambda_: float = 1.25


@dataclass(frozen=True)
class OPDSeqParams(ObjectiveParams):
    """opd-seq: discounted teacher-vs-rollout returns with a group baseline and PPO-style clipping."""

    discount: float = 1.0
    baseline: str = "loo"  # "loo" (leave-one-out mean over the prompt's other samples) or "none"
    normalize: bool = True  # divide advantages by their standard deviation over the optimizer step
    clip_eps: float = 0.2

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(0 <= self.discount <= 1, "objective.discount", f"must be in [0, 1], got {self.discount}")
        _check(self.baseline in ("loo", "none"), "objective.baseline", f"must be loo or none, got {self.baseline!r}")
        _check(0 < self.clip_eps < 1, "objective.clip_eps", f"must be in (0, 1), got {self.clip_eps}")


@dataclass(frozen=True)
class DivergenceParams(ObjectiveParams):
    """rkl, fkl: the support the divergence is taken over."""

    support: str = "tail"  # "tail": top-k plus one bucket for the rest; "renormalized": top-k alone

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.support in ("tail", "renormalized"), "objective.support",
               f"must be tail or renormalized, got {self.support!r}")


@dataclass(frozen=True)
class JSDParams(DivergenceParams):
    beta: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(0 <= self.beta <= 1, "objective.beta", f"must be in [0, 1], got {self.beta}")


@dataclass(frozen=True)
class SkewParams(DivergenceParams):
    alpha: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(0 <= self.alpha < 1, "objective.alpha", f"must be in [0, 1), got {self.alpha}")


@dataclass(frozen=True)
class TAIDParams(DivergenceParams):
    t_start: float = 0.4
    t_end: float = 1.0
    alpha: float = 5e-4
    momentum: float = 0.99

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(0 <= self.t_start <= self.t_end <= 1, "objective.t_start/t_end",
               f"need 0 <= t_start <= t_end <= 1, got {self.t_start}, {self.t_end}")
        _check(0 <= self.momentum < 1, "objective.momentum", f"must be in [0, 1), got {self.momentum}")


SCHEDULES = ("constant", "linear", "cosine")


@dataclass(frozen=True)
class TrainConfig:
    """`lightopd train`: fit a student on a store. A recipe's [train] table and `--set key=value`
    override these defaults; objective parameters live in the objective's own dataclass."""

    student: str
    data: str
    out: str
    objective: str = "lightning-opd"
    steps: int | None = None  # optimizer steps; if neither steps nor epochs is set, one epoch
    epochs: float | None = None
    batch_size: int = 16  # sequences per optimizer step (whole prompt groups are kept together)
    micro_batch_tokens: int = 4096  # padded tokens per forward/backward; gradients accumulate over the step
    lr: float = 1e-5
    schedule: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    grad_clip: float = 1.0  # max gradient norm; 0 disables clipping
    shuffle_buffer: int = 256  # prompt groups held per data part (as compact Arrow batches) for the seeded shuffle
    # disjoint parts the store is split into, each read by one rank (a rank may own several); a
    # step takes batch_size / data_parts rows from each. Default: the world size. Fix it to make
    # runs with different numbers of ranks train on identical steps.
    data_parts: int | None = None
    fsdp: bool = False  # under torchrun: shard weights, gradients and optimizer state (FSDP2) instead of DDP
    seed: int = 0
    save_every: int = 0  # checkpoint every N steps (0: only the final model)
    resume: bool = False
    sft_teacher: str | None = None
    allow_teacher_mismatch: bool = False
    device: str = "auto"
    dtype: str = "auto"  # compute dtype: bf16 autocast on CUDA; weights and optimizer stay float32
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        _check(self.steps is None or self.steps >= 1, "--steps", f"must be >= 1, got {self.steps}")
        _check(self.epochs is None or self.epochs > 0, "--epochs", f"must be > 0, got {self.epochs}")
        _check(self.steps is None or self.epochs is None, "--steps/--epochs", "give one of them, not both")
        _check(self.batch_size >= 1, "--batch-size", f"must be >= 1, got {self.batch_size}")
        _check(self.micro_batch_tokens >= 1, "micro_batch_tokens", f"must be >= 1, got {self.micro_batch_tokens}")
        _check(self.lr > 0, "--lr", f"must be > 0, got {self.lr}")
        _check(self.schedule in SCHEDULES, "schedule", f"must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        _check(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        _check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        _check(0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1, "adam_beta1/adam_beta2",
               f"must be in [0, 1), got {self.adam_beta1}, {self.adam_beta2}")
        _check(self.grad_clip >= 0, "grad_clip", f"must be >= 0, got {self.grad_clip}")
        _check(self.shuffle_buffer >= 1, "shuffle_buffer", f"must be >= 1, got {self.shuffle_buffer}")
        _check(self.data_parts is None or self.data_parts >= 1, "data_parts", f"must be >= 1, got {self.data_parts}")
        _check(self.save_every >= 0, "--save-every", f"must be >= 0, got {self.save_every}")
        _check_device_dtype(self.device, self.dtype)
        _check(self.dtype != "float16", "--dtype",
               "float16 training needs loss scaling, which lightopd does not do; use bfloat16 (or float32)")


# Keys a recipe or `--set` may name that are spelled differently in Python.
KEY_ALIASES = {"lambda": "lambda_"}


def _coerce(key: str, value, field):
    """`value` (parsed from TOML or a --set string) as the field's type, or InputError."""
    default = field.default
    if default is not None:
        kind = type(default)
    else:  # optional fields: the annotation is a string such as "int | None"
        kind = {"int": int, "float": float, "str": str}.get(str(field.type).split("|")[0].strip())
        if value is None:
            return None
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind is str:
        if isinstance(value, str):
            return value
    raise InputError(f"{key}: expected {kind.__name__ if kind else 'a value'}, got {value!r}")


def parse_set(item: str) -> tuple[str, object]:
    """`key=value` with a TOML value (numbers, true/false, quoted strings; bare words are strings)."""
    import tomllib

    if "=" not in item:
        raise InputError(f"--set {item!r}: expected key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key, value


def build_train_config(base: dict, recipe: dict | None, sets: list[tuple[str, object]]) -> tuple[TrainConfig, object]:
    """TrainConfig and objective parameters from defaults < recipe < command-line flags < --set.

    `base` holds the required paths and the flags given on the command line. Unknown keys are
    errors that list the valid ones.
    """
    from dataclasses import fields

    from lightopd.objectives import OBJECTIVES

    train_fields = {f.name: f for f in fields(TrainConfig)}
    train: dict = {}
    objective: dict = {}
    recipe = recipe or {}
    unknown_tables = sorted(set(recipe) - {"train", "objective"})
    if unknown_tables:
        raise InputError(f"recipe: unknown table [{unknown_tables[0]}] (allowed: [train], [objective])")
    train.update(recipe.get("train", {}))
    objective.update(recipe.get("objective", {}))
    if "name" in objective:
        train["objective"] = objective.pop("name")
    train.update({k: v for k, v in base.items() if v is not None})
    for key, value in sets:
        if key.startswith("objective."):
            objective[key.removeprefix("objective.")] = value
        else:
            train[key] = value
    name = train.get("objective", TrainConfig.objective)
    if name not in OBJECTIVES:
        raise InputError(f"--objective {name!r}: unknown objective (valid: {', '.join(OBJECTIVES)})")
    for key in train:
        if key not in train_fields:
            settable = sorted(k for k in train_fields if k not in ("student", "data", "out"))
            raise InputError(f"unknown training key {key!r} (valid: {', '.join(settable)}; objective "
                             "parameters are set as objective.<name>)")
    coerced = {}
    for key, value in train.items():
        coerced[key] = value if key in ("student", "data", "out") else _coerce(key, value, train_fields[key])
    cfg = TrainConfig(**coerced)
    params_cls = OBJECTIVES[name].params
    param_fields = {f.name: f for f in fields(params_cls)}
    params = {}
    for key, value in objective.items():
        field_name = KEY_ALIASES.get(key, key)
        if field_name not in param_fields:
            valid = ", ".join(sorted(k.rstrip("_") for k in param_fields))
            raise InputError(f"objective.{key}: not a parameter of {name} (valid: {valid})")
        params[field_name] = _coerce(f"objective.{key}", value, param_fields[field_name])
    return cfg, params_cls(**params)


@dataclass(frozen=True)
class EvalConfig:
    """`lightopd eval`: verifiable accuracy on prompts with answers, and agreement with a teacher store."""

    model: str
    prompts: str | None = None
    teacher_store: str | None = None
    out: str | None = None
    n: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int = 0
    limit: int | None = None
    checker: str = "auto"
    batch_size: int = 64
    micro_batch_tokens: int = 4096
    device: str = "auto"
    dtype: str = "auto"
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        from lightopd.tasks.checkers import CHECKERS

        _check(self.prompts is not None or self.teacher_store is not None, "--prompts/--teacher-store",
               "give prompts to check answers on, a teacher store to measure agreement with, or both")
        _check(self.n >= 1, "--n", f"samples per prompt must be >= 1, got {self.n}")
        _check(self.checker in CHECKERS, "--checker", f"must be one of {', '.join(CHECKERS)}, got {self.checker!r}")
        _check(self.limit is None or self.limit >= 1, "--limit", f"must be >= 1, got {self.limit}")
        _check(self.batch_size >= 1, "--batch-size", f"must be >= 1, got {self.batch_size}")
        _check(self.micro_batch_tokens >= 1, "micro_batch_tokens", f"must be >= 1, got {self.micro_batch_tokens}")
        SamplingConfig(self.temperature, self.top_p, self.max_new_tokens)
        _check_device_dtype(self.device, self.dtype)

    @property
    def sampling(self) -> SamplingConfig:
        return SamplingConfig(self.temperature, self.top_p, self.max_new_tokens)


@dataclass(frozen=True)
class DemoConfig:
    """`lightopd demo`: the Lightning OPD recipe end to end on the bundled addition task.

    The defaults are the full-size demo (minutes on a 2-core CPU); tests shrink the counts."""

    out: str = "lightopd-demo"
    seed: int = 0  # the student's initialisation, every sampling seed and the training data order
    sft_prompts: int = 10000  # train prompts the teacher answers once each (T = 1): the SFT data
    sft_steps: int = 1500
    sft_lr: float = 3e-3
    sft_batch_size: int = 64
    opd_prompts: int = 2000  # train prompts the SFT student answers opd_samples times each
    opd_samples: int = 4
    opd_steps: int = 600  # also the steps of the SFT-more control
    opd_lr: float = 3e-4
    opd_batch_size: int = 32  # whole prompt groups: 8 prompts x 4 samples
    objective: str = "opd-seq"
    top_k: int = 8
    heldout_prompts: int = 2000  # evaluation: one sample each at T = 1, on pairs no training prompt uses
    student_hidden: int = 64
    student_layers: int = 1
    student_heads: int = 8
    student_arch: str = "gpt2"  # learned positions: the prompt's digits always sit at the same places
    device: str = "auto"

    def __post_init__(self) -> None:
        from lightopd.objectives import OBJECTIVES

        for name in ("sft_prompts", "sft_steps", "sft_batch_size", "opd_prompts", "opd_steps", "opd_batch_size",
                     "top_k", "heldout_prompts", "student_hidden", "student_layers", "student_heads"):
            _check(getattr(self, name) >= 1, f"--{name.replace('_', '-')}", f"must be >= 1, got {getattr(self, name)}")
        _check(self.opd_samples >= (2 if self.objective == "opd-seq" else 1), "--opd-samples",
               f"must be >= 2 for opd-seq (its baseline is the prompt's other samples), got {self.opd_samples}")
        _check(self.sft_lr > 0 and self.opd_lr > 0, "--sft-lr/--opd-lr", "must be > 0")
        _check(self.objective in OBJECTIVES and self.objective != "sft", "--objective",
               f"must be an OPD objective ({', '.join(o for o in OBJECTIVES if o != 'sft')}), got {self.objective!r}")
        _check(self.student_hidden % self.student_heads == 0, "--student-heads", "must divide --student-hidden")
        _check(self.student_arch in ("gpt2", "llama"), "student_arch",
               f"must be gpt2 or llama, got {self.student_arch!r}")
        _check(self.device in DEVICES or self.device.startswith("cuda:"), "--device",
               f"must be one of {', '.join(DEVICES)} or cuda:N, got {self.device!r}")
