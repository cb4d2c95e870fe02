"""Group rows into batches, longest first: by padded tokens for forwards, by rows for sampling."""

from __future__ import annotations

from collections.abc import Sequence


def pack_by_tokens(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Row indices grouped so that rows × longest row ≤ `max_tokens` in every batch.

    Rows are taken longest first, so each batch holds rows of similar length (little padding);
    a row longer than the budget gets a batch of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= max_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def plan_generation(lengths: list[int], n: int, batch_size: int) -> list[list[tuple[int, range]]]:
    """Group (prompt, sample range) pieces into batches of at most `batch_size` rows.

    Longest prompts first, so similar lengths share a batch (little padding) and a batch too
    large for memory fails at the start rather than at the end.
    """
    pieces = [(i, range(s, min(s + batch_size, n))) for i in range(len(lengths)) for s in range(0, n, batch_size)]
    pieces.sort(key=lambda piece: -lengths[piece[0]])
    batches, current, rows = [], [], 0
    for piece in pieces:
        if rows + len(piece[1]) > batch_size:
            batches.append(current)
            current, rows = [], 0
        current.append(piece)
        rows += len(piece[1])
    if current:
        batches.append(current)
    return batches
