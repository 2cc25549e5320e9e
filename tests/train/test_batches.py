from vlmtune.train.batches import EpochBatches


def flatten(windows):
    return [i for window in windows for batch in window for i in batch]


def test_epoch_is_a_seeded_permutation_split_over_ranks():
    one = EpochBatches(10, batch_size=1, grad_accum=4, seed=3)
    assert sorted(flatten(one.windows(0))) == list(range(10))
    assert flatten(one.windows(0)) != flatten(one.windows(1))  # new order each epoch
    assert flatten(EpochBatches(10, 1, 4, seed=3).windows(0)) == flatten(one.windows(0))
    # two ranks with accumulation 2 see, per step, the same samples as one rank with accumulation 4
    ranks = [EpochBatches(10, batch_size=1, grad_accum=2, seed=3, rank=r, world_size=2) for r in range(2)]
    for step, window in enumerate(one.windows(0)):
        together = sorted(i for r in ranks for batch in r.windows(0)[step] for i in batch)
        if len(window) == 4:
            assert together == sorted(i for batch in window for i in batch)


def test_resume_skips_exactly_what_was_done():
    batches = EpochBatches(23, batch_size=2, grad_accum=3, seed=0)
    all_windows = batches.windows(1)
    assert batches.micro_batches_per_epoch == 12 and batches.steps_per_epoch == 4
    assert batches.windows(1, skip_micro_batches=6) == all_windows[2:]


def test_ranks_get_equal_counts_by_wrapping():
    ranks = [EpochBatches(5, batch_size=2, grad_accum=1, seed=0, rank=r, world_size=2) for r in range(2)]
    counts = [len(r.micro_batches(0)) for r in ranks]
    assert counts == [2, 2]
    seen = {i for r in ranks for b in r.micro_batches(0) for i in b}
    assert seen == set(range(5))
