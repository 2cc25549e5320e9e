"""Validation split stratified by the final assistant answer.

A random split of a 2-label dataset can leave the validation set lopsided, which makes its F1 noisy;
stratifying keeps each answer's share within one sample of the whole set's.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict

from vlmtune.data.conversation import Conversation


def validation_count(n: int, val_size: float) -> int:
    """val_size < 1 is a fraction of n, ≥ 1 a count; at least one sample stays for training."""
    if val_size <= 0 or n < 2:
        return 0
    count = round(n * val_size) if val_size < 1 else int(val_size)
    return max(1, min(count, n - 1))


def stratified_split(conversations: list[Conversation], val_size: float, seed: int
                     ) -> tuple[list[Conversation], list[Conversation]]:
    """(train, val): per answer class, a seeded shuffle; class quotas by largest remainder."""
    n_val = validation_count(len(conversations), val_size)
    if n_val == 0:
        return list(conversations), []
    by_answer: dict[str, list[int]] = defaultdict(list)
    for i, conv in enumerate(conversations):
        by_answer[conv.answer or ""].append(i)
    answers = sorted(by_answer)  # a fixed order, so the split depends only on the data and seed
    exact = {a: len(by_answer[a]) * n_val / len(conversations) for a in answers}
    quota = {a: math.floor(exact[a]) for a in answers}
    leftover = n_val - sum(quota.values())
    for a in sorted(answers, key=lambda a: (-(exact[a] - quota[a]), a))[:leftover]:
        quota[a] += 1
    rng = random.Random(seed)
    val_indices: set[int] = set()
    for a in answers:
        indices = list(by_answer[a])
        rng.shuffle(indices)
        val_indices.update(indices[:quota[a]])
    train = [c for i, c in enumerate(conversations) if i not in val_indices]
    val = [c for i, c in enumerate(conversations) if i in val_indices]
    return train, val
