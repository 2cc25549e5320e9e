from collections import Counter

import pytest

from vlmtune.data.conversation import Conversation, Message
from vlmtune.data.split import stratified_split


def conversations(counts: dict[str, int]) -> list[Conversation]:
    out = []
    for answer, n in counts.items():
        for _ in range(n):
            out.append(Conversation([Message("user", "q"), Message("assistant", answer)], [], "f.json", len(out)))
    return out


@pytest.mark.parametrize("counts,val_size", [
    ({"满足要求": 70, "不满足要求": 30}, 0.1),
    ({"满足要求": 91, "不满足要求": 13}, 0.15),
    ({"a": 50, "b": 33, "c": 17}, 0.2),
    ({"满足要求": 7, "不满足要求": 5}, 3),
])
def test_ratio_within_one_sample_per_class(counts, val_size):
    convs = conversations(counts)
    for seed in range(5):
        train, val = stratified_split(convs, val_size, seed)
        assert len(train) + len(val) == len(convs)
        assert {c.index for c in train}.isdisjoint({c.index for c in val})
        n_val = round(len(convs) * val_size) if val_size < 1 else int(val_size)
        assert len(val) == n_val
        per_class = Counter(c.answer for c in val)
        for answer, n in counts.items():
            assert abs(per_class[answer] - n * n_val / len(convs)) <= 1, (answer, per_class)


def test_seeded():
    convs = conversations({"满足要求": 40, "不满足要求": 40})
    ids = lambda split: [c.index for c in split[1]]  # noqa: E731
    assert ids(stratified_split(convs, 0.25, 3)) == ids(stratified_split(convs, 0.25, 3))
    assert ids(stratified_split(convs, 0.25, 3)) != ids(stratified_split(convs, 0.25, 4))


def test_no_split():
    convs = conversations({"a": 3})
    assert stratified_split(convs, 0.0, 0) == (convs, [])
