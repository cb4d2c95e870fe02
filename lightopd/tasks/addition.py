"""The bundled demo task: 3-digit addition, with a character-level tokenizer and two solution formats.

A prompt is `123+456=`; the answer is `579`. A solution comes in one of these formats:
- `worked`: the digits of the sum from the least significant one (the order a carry moves),
  then `|`, then the sum: `975|579`.
- `direct`: `|` then the sum straight away: `|579`.
- `plain`: the sum alone, `579` (used by the second teacher of the consistency experiment).
All end with the end-of-sequence token, and the `auto` checker reads the last number in each.
A prompt may carry the tag `TAG` in front (`+123+456=`), which asks for the worked format: a
context for the self- and context-distillation experiment (experiments/context.py).
Held-out pairs are fixed by a hash of (a, b) (one pair in ten), so prompts drawn from the
train and held-out pools never overlap, whatever the seed.
"""

from __future__ import annotations

import random
from pathlib import Path

FORMATS = ("worked", "direct", "plain")
CHARS = list("0123456789+=|")
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
SPLITS = ("train", "heldout")
TAG = "+"  # in front of a prompt: answer in the worked format
CONTEXT = 32  # "<s>" + 8 prompt characters + at most 10 completion tokens fit with room to spare
TEACHERS = Path(__file__).resolve().parent / "teachers"  # the bundled teachers, one directory each


def is_heldout(a: int, b: int) -> bool:
    return (a * 1000 + b) * 2654435761 % 4294967296 % 10 == 0


def draw(rng: random.Random, split: str) -> tuple[int, int]:
    """One pair of 3-digit numbers from the split's pool."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    while True:
        a, b = rng.randrange(100, 1000), rng.randrange(100, 1000)
        if is_heldout(a, b) == (split == "heldout"):
            return a, b


def pairs(count: int, split: str, seed: int) -> list[tuple[int, int]]:
    """`count` distinct pairs from the split's pool, drawn from `seed`."""
    rng = random.Random(f"addition:{split}:{seed}")
    chosen: dict[tuple[int, int], None] = {}
    while len(chosen) < count:
        chosen[draw(rng, split)] = None
    return list(chosen)


def prompt(a: int, b: int) -> str:
    return f"{a}+{b}="


def solution(a: int, b: int, fmt: str) -> str:
    total = str(a + b)
    if fmt == "worked":
        return total[::-1] + "|" + total
    if fmt == "direct":
        return "|" + total
    if fmt == "plain":
        return total
    raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")


def format_of(completion: str) -> str:
    """`worked`, `direct`, `plain`, or `other` (anything else)."""
    head, bar, tail = completion.partition("|")
    if not bar:
        return "plain" if head.isdigit() else "other"
    if not tail.isdigit():
        return "other"
    if not head:
        return "direct"
    return "worked" if head.isdigit() else "other"


def prompt_records(count: int, split: str, seed: int, tagged: float = 0.0, metadata: dict | None = None
                   ) -> list[dict]:
    """Prompt-file records (`id`, `prompt`, `answer`, and any `metadata` fields) for `lightopd rollout`
    and `eval`; the first `tagged` share of them with TAG in front of the prompt."""
    cut = round(tagged * count)
    return [{"id": f"{split}-{a}+{b}", "prompt": (TAG if i < cut else "") + prompt(a, b), "answer": str(a + b),
             **(metadata or {})} for i, (a, b) in enumerate(pairs(count, split, seed))]


def write_prompts(path: str | Path, count: int, split: str, seed: int, tagged: float = 0.0,
                  metadata: dict | None = None) -> Path:
    import json

    path = Path(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in prompt_records(count, split, seed, tagged, metadata)))
    return path


def make_tokenizer():
    """One token per character of `CHARS`; `<s>` is prepended; decoding joins tokens without spaces."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def make_model(path: str | Path, hidden: int, layers: int, heads: int, seed: int, arch: str = "llama") -> Path:
    """A randomly initialised model for this task, saved with its tokenizer: a Llama (rotary
    positions, MLP width 8/3 of the hidden size) or a GPT-2 (learned positions, MLP width 4x)."""
    from lightopd.tiny import build_model

    return build_model(path, make_tokenizer(), arch, hidden, layers, heads, intermediate=round(hidden * 8 / 3),
                       context=CONTEXT, seed=seed, generation={"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0})
