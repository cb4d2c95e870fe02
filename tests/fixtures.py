"""Tiny Hugging Face models and tokenizers built from configs, saved like real checkpoints."""

from __future__ import annotations

from pathlib import Path

import torch

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
WORDS = [f"w{i}" for i in range(40)] + ["user", "assistant", ":", "?", "what", "is"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)


def make_tokenizer(words: list[str] = WORDS, chat_template: str | None = CHAT_TEMPLATE):
    """A word-level fast tokenizer that prepends <s>; ids: specials first, then `words`."""
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


def make_model(
    path: Path,
    vocab_words: list[str] = WORDS,
    seed: int = 0,
    hidden: int = 32,
    layers: int = 2,
    context: int = 64,
    chat_template: str | None = CHAT_TEMPLATE,
    generation_defaults: dict | None = None,
    arch: str = "llama",
) -> Path:
    """Save a randomly initialised tiny Llama (rotary positions) or GPT-2 (learned absolute
    positions) and its tokenizer to `path`."""
    from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    tokenizer = make_tokenizer(vocab_words, chat_template)
    special = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(seed)
    if arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(
            vocab_size=len(tokenizer), n_embd=hidden, n_layer=layers, n_head=4, n_positions=context, **special))
    else:
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
            num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=context, **special))
    with torch.no_grad():  # sharper logits than the default init, so sampling settings matter
        model.lm_head.weight.mul_(40.0)
    if generation_defaults:
        model.generation_config = GenerationConfig(**generation_defaults)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path
