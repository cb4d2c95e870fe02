"""Configuration dataclasses read by every stage; each default lives here and only here.

The CLI builds these from its options (its defaults are read from the class attributes below),
and each dataclass validates itself so that a bad value is reported before any work starts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from lightopd.errors import InputError

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "float32", "bfloat16", "float16")


def _check(ok: bool, option: str, message: str) -> None:
    if not ok:
        raise InputError(f"{option}: {message}")


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
        _check(self.device in DEVICES or self.device.startswith("cuda:"), "--device",
               f"must be one of {', '.join(DEVICES)} or cuda:N, got {self.device!r}")
        _check(self.dtype in DTYPES, "--dtype", f"must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        SamplingConfig(self.temperature, self.top_p, self.max_new_tokens)  # validates those three

    @property
    def sampling(self) -> SamplingConfig:
        return SamplingConfig(self.temperature, self.top_p, self.max_new_tokens)

    def to_dict(self) -> dict:
        return asdict(self)
