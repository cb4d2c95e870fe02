"""Configuration dataclasses read by every stage; each default lives here and only here.

The CLI builds these from its options (its defaults are read from the class attributes below),
and each dataclass validates itself so that a bad value is reported before any work starts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

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
    device: str = "auto"
    dtype: str = "auto"
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        _check(self.n >= 1, "--n", f"samples per prompt must be >= 1, got {self.n}")
        _check(self.limit is None or self.limit >= 1, "--limit", f"must be >= 1, got {self.limit}")
        _check(self.batch_size >= 1, "--batch-size", f"must be >= 1, got {self.batch_size}")
        _check(self.prompts_per_shard >= 1, "--prompts-per-shard", f"must be >= 1, got {self.prompts_per_shard}")
        _check_device_dtype(self.device, self.dtype)
        SamplingConfig(self.temperature, self.top_p, self.max_new_tokens)  # validates those three

    @property
    def sampling(self) -> SamplingConfig:
        return SamplingConfig(self.temperature, self.top_p, self.max_new_tokens)

    def to_dict(self) -> dict:
        return asdict(self)


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
