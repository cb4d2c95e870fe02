"""Tiny random Hugging Face models and tokenizers, built from configs and saved like real ones.

For tests, benchmarks, and trying the pipeline without downloading anything:
`python -m lightopd.tiny OUT_DIR [--words N] [--arch llama|gpt2] [--chat-model] [--vocab-from FILE]`.
The tokenizer is word-level (whitespace-separated words `w0 w1 ...`, plus those of FILE),
prepends `<s>`, ends with `</s>`, and has a chat template (with `--chat-model`, one shaped like
Qwen3's: turns end with `</s>`, and `enable_thinking=false` writes an empty think block); the
model is a randomly initialised Llama (rotary positions) or GPT-2 (learned absolute positions).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from lightopd.errors import InputError

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
CHAT_TEMPLATE = (  # a template whose turns do not end with the end token, as a base model's does not
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)
CHAT_MODEL_TEMPLATE = (  # a chat model's, shaped like Qwen3's: a turn ends with </s>; enable_thinking=false
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"  # writes an empty think block
    "{% if add_generation_prompt %}assistant : "
    "{% if enable_thinking is defined and enable_thinking is false %}<think> </think> {% endif %}{% endif %}"
)
CHAT_MODEL_WORDS = ["system", "<think>", "</think>"]


def default_words(count: int) -> list[str]:
    return [f"w{i}" for i in range(count)] + ["user", "assistant", ":", "?", "what", "is"]


PROMPT_FILES = (".jsonl", ".ndjson", ".parquet", ".csv")


def words_from(path: str | Path) -> list[str]:
    """The distinct whitespace-separated words of a text file, or of every string in the records of a
    prompt source (a JSONL, Parquet or CSV file, a save_to_disk directory, hf:org/name), in order of
    appearance: a vocabulary in which that text decodes as it reads."""
    from lightopd.data.sources import Source

    def strings(value):
        if isinstance(value, str):
            yield value
        elif isinstance(value, (list, tuple, dict)):
            for v in value.values() if isinstance(value, dict) else value:
                yield from strings(v)

    spec = str(path)
    if Path(spec).suffix.lower() in PROMPT_FILES or Path(spec).is_dir() or spec.startswith("hf:"):
        text = " ".join(s for _, record in Source(spec).records() for s in strings(record))
    else:
        try:
            text = Path(path).read_text()
        except UnicodeDecodeError:
            raise InputError(f"--vocab-from {path}: not a text file (nor a prompt file: "
                             f"{', '.join(PROMPT_FILES)}, a save_to_disk directory or hf:org/name)") from None
        except OSError as e:
            raise InputError(f"--vocab-from {path}: cannot read it ({e.strerror})") from None
    return list(dict.fromkeys(text.split()))


def make_tokenizer(words: list[str], chat_template: str | None = CHAT_TEMPLATE):
    """A word-level fast tokenizer; ids are the four specials, then `words` in order."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + list(words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    if chat_template:
        fast.chat_template = chat_template
    return fast


def build_model(path: str | Path, tokenizer, arch: str = "llama", hidden: int = 32, layers: int = 2, heads: int = 4,
                kv_heads: int | None = None, intermediate: int | None = None, context: int = 64, seed: int = 0,
                logit_scale: float = 1.0, generation: dict | None = None, vocab_rows: int | None = None) -> Path:
    """Save a randomly initialised Llama or Qwen3 (rotary positions) or GPT-2 (learned positions) for
    `tokenizer` to `path` (safetensors), with the tokenizer; returns the path.

    Ids 0, 1, 2 are pad, BOS and EOS. `logit_scale` multiplies the output layer, so a random model's
    next-token distributions can be peaked like a trained model's; `generation` is saved as its
    generation_config; `vocab_rows` pads the embeddings and output layer beyond the tokenizer, as
    many released checkpoints do."""
    from transformers import (
        GenerationConfig,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    special = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(seed)
    if arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab_rows or len(tokenizer), n_embd=hidden, n_layer=layers,
                                           n_head=heads, n_positions=context, **special))
    elif arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=vocab_rows or len(tokenizer), hidden_size=hidden,
            intermediate_size=intermediate or 2 * hidden,
            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads or heads,
            max_position_embeddings=context, **special))
    elif arch == "qwen3":  # tied input and output embeddings, as in the Qwen3 releases up to 4B
        model = Qwen3ForCausalLM(Qwen3Config(
            vocab_size=vocab_rows or len(tokenizer), hidden_size=hidden, intermediate_size=intermediate or 2 * hidden,
            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads or heads,
            head_dim=hidden // heads, max_position_embeddings=context, **{**special, "tie_word_embeddings": True}))
    else:
        raise ValueError(f"unknown arch {arch!r} (llama, qwen3 or gpt2)")
    if logit_scale != 1.0:
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(logit_scale)
    if generation:
        model.generation_config = GenerationConfig(**generation)
    path = Path(path)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def make_model(
    path: str | Path,
    words: list[str] | None = None,
    arch: str = "llama",
    hidden: int = 32,
    layers: int = 2,
    context: int = 64,
    seed: int = 0,
    logit_scale: float = 40.0,
    chat_template: str | None = CHAT_TEMPLATE,
    generation_defaults: dict | None = None,
    vocab_rows: int | None = None,
) -> Path:
    """A random model with the word-level tokenizer (4 heads, 2 of them KV heads in a Llama).

    `logit_scale` defaults to 40 so the random model's next-token distributions are peaked like
    a trained model's rather than nearly uniform.
    """
    tokenizer = make_tokenizer(words if words is not None else default_words(40), chat_template)
    return build_model(path, tokenizer, arch, hidden, layers, heads=4, kv_heads=2, context=context, seed=seed,
                       logit_scale=logit_scale, generation=generation_defaults, vocab_rows=vocab_rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="directory to write the model to")
    ap.add_argument("--words", type=int, default=40, help="vocabulary words besides specials (default 40)")
    ap.add_argument("--arch", choices=["llama", "qwen3", "gpt2"], default="llama")
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--context", type=int, default=64,
                    help="positions the model takes (default 64): raise it for long prompts, since a prompt and "
                         "its completion must fit (rollout says which record does not)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab-from", metavar="FILE", action="append", default=[],
                    help="also give the vocabulary every word of FILE (text, or every string of the records of a "
                         "prompt source: JSONL, Parquet, CSV, a save_to_disk directory, hf:org/name), so prompts "
                         "written in it decode as they read (repeatable)")
    ap.add_argument("--chat-model", action="store_true",
                    help="a chat model's tokenizer: its template ends each turn with </s> and takes enable_thinking")
    args = ap.parse_args()
    words = default_words(args.words) + (CHAT_MODEL_WORDS if args.chat_model else [])
    try:
        for path in args.vocab_from:
            words += words_from(path)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    words = [w for w in dict.fromkeys(words) if w not in SPECIALS]
    template = CHAT_MODEL_TEMPLATE if args.chat_model else CHAT_TEMPLATE
    path = make_model(args.out, words, args.arch, args.hidden, args.layers, args.context, args.seed,
                      chat_template=template)
    print(json.dumps({"model": str(path), "vocab_size": len(make_tokenizer(words))}))


if __name__ == "__main__":
    main()
