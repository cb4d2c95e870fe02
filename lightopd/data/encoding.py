"""How score-teacher encodes a teacher store's distributions (`StoreEncoding`): the top-k's dtype,
significand bits and order on disk (topk_layout.py), and the optional sampled support: M tokens
drawn per position from the teacher's own distribution with their log-probs (Sparse Logit
Sampling's unbiased alternative to the top-k; support_draws.py)."""

from __future__ import annotations

from dataclasses import dataclass

from lightopd.data.topk_layout import FLOAT16_BITS, ORDERS
from lightopd.options import check, opt

TOPK_DTYPES = ("float16", "float32")
MAX_SUPPORT = 256  # draws per position (a [positions × M] int64 tensor per micro-batch in training)


@dataclass(frozen=True, kw_only=True)
class StoreEncoding:
    """What a teacher store keeps of each position's distribution, and in how many bytes."""

    topk_dtype: str = opt("float16", "Storage dtype of the top-k log-probs (float16 halves the store; its rounding "
                                     "is documented in the README).", choices=TOPK_DTYPES)
    topk_bits: int = opt(7, "Significand bits kept of each float16 top-k log-prob, rounded to nearest: a relative "
                            f"error of at most 2^-BITS ({FLOAT16_BITS}: float16's own; 8: bfloat16's). 7 keeps every "
                            "top-k objective's loss within 0.2% of its float64 value at 64 bytes a token (the README's "
                            "Stores). With --topk-dtype float32 they are stored whole.", metavar="BITS")
    topk_order: str = opt("id", "Layout of each position's top-k on disk: id (the argmax, then the rest by token id, "
                                "which stores the ids in fewer bytes; readers restore the descending order) or "
                                "logprob (descending, as older stores).", choices=ORDERS)
    support_samples: int = opt(0, "Also store M tokens per position drawn from the teacher's distribution at the "
                                  "scoring temperature (with replacement, sorted by id) and their log-probs, in the "
                                  "top-k's dtype and bits: an unbiased sample of the whole distribution (Sparse "
                                  "Logit Sampling) for fkl and rkl with objective.support=sampled. The draws of a "
                                  "row depend on --support-seed, its prompt id and sample index alone. 0: none.",
                               metavar="M")
    support_seed: int = opt(0, "Seed of the --support-samples draws.", metavar="S")

    def __post_init__(self) -> None:
        check(self.topk_dtype in TOPK_DTYPES, "--topk-dtype",
              f"must be one of {', '.join(TOPK_DTYPES)}, got {self.topk_dtype!r}")
        check(2 <= self.topk_bits <= FLOAT16_BITS, "--topk-bits", f"must be 2 to {FLOAT16_BITS}, got {self.topk_bits}")
        check(self.topk_order in ORDERS, "--topk-order", f"must be one of {', '.join(ORDERS)}, got {self.topk_order!r}")
        check(0 <= self.support_samples <= MAX_SUPPORT, "--support-samples",
              f"must be 0 to {MAX_SUPPORT}, got {self.support_samples}")
        check(0 <= self.support_seed < 2**63, "--support-seed", f"must be 0 to 2^63 - 1, got {self.support_seed}")
