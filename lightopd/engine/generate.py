"""Batched sampling with the KV cache: the HF decoding loop behind `rollout` and `eval`.

Batches are bounded in rows and in KV-cache tokens (rows × (longest prompt + new tokens)), the
latter by default from the device's free memory, so long completions do not run out of memory.

One call takes a batch of distinct prompts and, for each, the random-stream keys of the samples
to draw from it. Each prompt is prefilled once and its cache copied to its samples; rows that
finish (EOS or their token limit) are dropped from the batch so the rest decode faster. Prompts
are left-padded and positions are counted from each prompt's first real token, so a row's
logits match an unpadded forward of that row alone.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from lightopd.config import SamplingSpec
from lightopd.data.batching import plan_generation
from lightopd.engine.models import ModelInfo
from lightopd.engine.sampling import choose, penalized, row_key, uniforms
from lightopd.engine.stops import StopTexts
from lightopd.errors import NonFiniteLogits


@dataclass
class Completion:
    ids: list[int]
    logprobs: list[float]  # ℓμ: under the distribution sampled from (penalties, temperature, truncation)
    finish_reason: str  # "stop" (an EOS token was sampled, or a stop text completed) or "length"
    policy_logprobs: list[float] | None = None  # ℓold: under the model's untruncated softmax at the temperature


def _selectable(cache) -> bool:
    """True if the cache's batch rows can be reindexed (plain attention KV caches)."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    layers = getattr(cache, "layers", None)
    return isinstance(cache, DynamicCache) and bool(layers) and all(
        isinstance(layer, DynamicLayer) for layer in layers
    )


KV_SHARE = 0.5  # of the free memory, for the KV cache of a decoding batch by default


def kv_bytes_per_token(model) -> int:
    """Bytes of KV cache one token takes in every layer (keys and values, in the model's dtype)."""
    config = model.config.get_text_config()
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    itemsize = next(model.parameters()).dtype.itemsize
    return 2 * config.num_hidden_layers * kv_heads * head_dim * itemsize


def kv_token_budget(model, requested: int | None) -> int | None:
    """`requested`, else the KV-cache tokens that KV_SHARE of the device's free memory holds (CUDA:
    the GPU's free memory; CPU: the system's available memory; None where it cannot be told)."""
    if requested is not None:
        return requested
    device = next(model.parameters()).device
    try:
        if device.type == "cuda":
            free = torch.cuda.mem_get_info(device)[0]
        else:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return max(1, int(free * KV_SHARE) // kv_bytes_per_token(model))
    except (AttributeError, ValueError, OSError, RuntimeError):
        return None


@torch.inference_mode()
def generate(
    model,
    prompts: Sequence[Sequence[int]],
    keys: Sequence[Sequence[int]],
    sampling: SamplingSpec,
    info: ModelInfo,
    max_new: Sequence[int],
    on_step: Callable[[int, int], None] | None = None,
    stops: StopTexts | None = None,
) -> list[list[Completion]]:
    """Sample `len(keys[i])` completions of at most `max_new[i]` tokens for each prompt i.

    `keys[i][j]` names the random stream of prompt i's j-th sample (see sampling.row_key).
    Tokens are drawn from the tokenizer's ids only (`info.vocab`; padded output rows never).
    A row also ends at the token that completes one of `stops`' texts.
    `on_step(new_tokens, finished_rows)` is called after every decoding step.
    Returns completions in the same nesting as `keys`.
    """
    eos_ids, pad_id, vocab = info.eos_ids, info.pad_id, info.vocab
    device = next(model.parameters()).device
    counts = [len(k) for k in keys]
    prompt_of_row = np.repeat(np.arange(len(prompts)), counts)
    row_keys = np.array([k for ks in keys for k in ks], dtype=np.uint64)
    row_limit = torch.tensor(np.repeat(np.asarray(max_new), counts), device=device)
    n_rows = len(row_keys)

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
        mask[i, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    expand = torch.as_tensor(prompt_of_row, device=device)

    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    # transformers renamed forward's `past_key_values` to `cache` (the old name is deprecated): pass the one it takes
    cache_kw = {"cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values": cache}
    share_prefix = _selectable(cache)
    if not share_prefix:  # caches we cannot reindex: prefill every row
        ids, mask = ids[expand], mask[expand]
    positions = (mask.cumsum(-1) - 1).clamp_(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                use_cache=True, logits_to_keep=1, **cache_kw)
    logits = out.logits[:, -1, :vocab]
    if share_prefix:
        cache.batch_select_indices(expand)
        logits, mask, positions = logits[expand], mask[expand], positions[expand]
    position = positions[:, -1]
    eos = torch.tensor(sorted(eos_ids), dtype=torch.long, device=device)

    rows = torch.arange(n_rows, device=device)  # which row each batch slot holds
    finished = torch.zeros(n_rows, dtype=torch.bool, device=device)
    tokens_out = torch.full((n_rows, int(max(max_new))), pad_id, dtype=torch.long, device=device)
    logprobs_out = torch.zeros(tokens_out.shape, dtype=torch.float32, device=device)
    policy_out = torch.zeros(tokens_out.shape, dtype=torch.float32, device=device)
    # penalties: which tokens each row has seen (prompt or completion) and its completion's counts
    seen = counts = None
    if sampling.penalizes:
        counts = torch.zeros((n_rows, vocab), dtype=torch.float32, device=device)
        if sampling.repetition_penalty != 1:
            seen = torch.zeros((len(prompts), vocab), dtype=torch.bool, device=device)
            for i, p in enumerate(prompts):
                ids_i = torch.tensor(list(p), dtype=torch.long, device=device)
                seen[i, ids_i[ids_i < vocab]] = True
            seen = seen[expand]
    lengths = torch.zeros(n_rows, dtype=torch.long, device=device)
    stopped = torch.zeros(n_rows, dtype=torch.bool, device=device)

    for step in range(tokens_out.shape[1]):
        if not bool(torch.isfinite(logits).all()):
            raise NonFiniteLogits(f"the model's logits are not finite (NaN or inf) at decoding step {step}: its "
                                  "weights hold NaN or inf, or it overflows in this dtype")
        u = torch.from_numpy(uniforms(row_keys[rows.cpu().numpy()], step))
        shaped = logits if counts is None else penalized(
            logits, None if seen is None else seen[rows], counts[rows], sampling.repetition_penalty,
            sampling.presence_penalty, sampling.frequency_penalty)
        tok, lp, policy = choose(shaped, sampling, u, raw=logits)
        live = ~finished[rows]
        live_rows = rows[live]
        tokens_out[live_rows, step] = tok[live]
        logprobs_out[live_rows, step] = lp[live]
        policy_out[live_rows, step] = policy[live]
        lengths[live_rows] += 1
        if counts is not None:
            counts[live_rows, tok[live]] += 1
            if seen is not None:
                seen[live_rows, tok[live]] = True
        hit_eos = torch.isin(tok, eos) & live
        if stops is not None:
            hit_eos |= stops.hit(tokens_out, rows, lengths) & live
        stopped[rows[hit_eos]] = True
        done_now = live & (hit_eos | (lengths[rows] >= row_limit[rows]))
        finished[rows[done_now]] = True
        if on_step is not None:
            on_step(int(live.sum()), int(done_now.sum()))
        if bool(finished.all()):
            break
        keep = ~finished[rows]
        if share_prefix and not bool(keep.all()):
            keep_idx = keep.nonzero().squeeze(-1)
            cache.batch_select_indices(keep_idx)
            rows, tok, mask, position = rows[keep_idx], tok[keep_idx], mask[keep_idx], position[keep_idx]
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
        position = position + 1
        out = model(input_ids=tok.unsqueeze(-1), attention_mask=mask, position_ids=position.unsqueeze(-1),
                    use_cache=True, **cache_kw)
        logits = out.logits[:, -1, :vocab]

    tokens_cpu, logprobs_cpu, policy_cpu = tokens_out.cpu(), logprobs_out.cpu(), policy_out.cpu()
    lengths_cpu, stopped_cpu = lengths.cpu().tolist(), stopped.cpu().tolist()
    result: list[list[Completion]] = [[] for _ in prompts]
    for r in range(n_rows):
        n = lengths_cpu[r]
        result[prompt_of_row[r]].append(Completion(
            tokens_cpu[r, :n].tolist(), logprobs_cpu[r, :n].tolist(), "stop" if stopped_cpu[r] else "length",
            policy_cpu[r, :n].tolist()))
    return result


def sample_prompts(
    model,
    prompt_ids: Sequence[Sequence[int]],
    prompt_names: Sequence[str],
    sampling: SamplingSpec,
    batch_size: int,
    info: ModelInfo,
    on_step: Callable[[int, int], None] | None = None,
    kv_tokens: int | None = None,
    stops: StopTexts | None = None,
) -> list[list[Completion]]:
    """`sampling.n` completions of each prompt, batched by length within `batch_size` rows and
    `kv_tokens` KV-cache tokens (None: see kv_token_budget); sample j of prompt `name` always draws
    from the random stream row_key(sampling.seed, name, j), whatever the batching."""
    completions: list[list[Completion | None]] = [[None] * sampling.n for _ in prompt_ids]
    budget = kv_token_budget(model, kv_tokens)
    for batch in plan_generation([len(x) for x in prompt_ids], sampling.n, batch_size, budget,
                                 sampling.max_new_tokens):
        prompts = [prompt_ids[i] for i, _ in batch]
        keys = [[row_key(sampling.seed, prompt_names[i], j) for j in js] for i, js in batch]
        limits = [sampling.max_new_tokens if info.context is None
                  else min(sampling.max_new_tokens, info.context - len(p)) for p in prompts]
        out = generate(model, prompts, keys, sampling, info, limits, on_step=on_step, stops=stops)
        for (i, js), samples in zip(batch, out, strict=True):
            for j, c in zip(js, samples, strict=True):
                completions[i][j] = c
    return completions
