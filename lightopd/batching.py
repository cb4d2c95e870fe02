"""Group rows into batches: longest first, padded size within a token budget."""

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
