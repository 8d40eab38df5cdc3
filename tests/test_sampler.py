"""MicroBatchSampler: DP slicing, resumption, and collation."""
import pytest
import torch

from megatron_aquila.data.sampler import MicroBatchSampler, collate_samples


def reference_stream(total, consumed, micro, dp_size, drop_last):
    """Megatron's pretraining sampler, written from its definition: fill a global step, slice per rank."""
    steps = []
    step = []
    for index in range(consumed, total):
        step.append(index)
        if len(step) == micro * dp_size:
            steps.append(step)
            step = []
    if step and not drop_last:
        steps.append(step)
    return steps


@pytest.mark.parametrize("total,micro,dp_size", [(100, 2, 4), (37, 3, 2), (64, 4, 1), (10, 1, 3)])
@pytest.mark.parametrize("drop_last", [True, False])
def test_dp_ranks_are_disjoint_and_cover_the_stream(total, micro, dp_size, drop_last):
    per_rank = [list(MicroBatchSampler(total, 0, micro, rank, dp_size, drop_last)) for rank in range(dp_size)]
    for rank in range(dp_size):
        assert len(MicroBatchSampler(total, 0, micro, rank, dp_size, drop_last)) == len(per_rank[rank])
    steps = reference_stream(total, 0, micro, dp_size, drop_last)
    for number, step in enumerate(steps):
        pieces = [per_rank[rank][number] for rank in range(dp_size) if number < len(per_rank[rank])]
        assert sum(pieces, []) == step  # rank order concatenation is exactly the global step
        for rank, batch in enumerate(pieces):
            assert batch == step[rank * micro:(rank + 1) * micro]
    flat = [i for batches in per_rank for batch in batches for i in batch]
    assert len(flat) == len(set(flat))
    single = [i for batch in MicroBatchSampler(total, 0, micro * dp_size, 0, 1, drop_last) for i in batch]
    assert sorted(flat) == single


@pytest.mark.parametrize("consumed", [0, 8, 24, 40, 96])
def test_resume_equals_tail_of_uninterrupted_stream(consumed):
    total, micro, dp_size = 100, 2, 4
    for rank in range(dp_size):
        full = list(MicroBatchSampler(total, 0, micro, rank, dp_size))
        resumed = list(MicroBatchSampler(total, consumed, micro, rank, dp_size))
        assert resumed == full[consumed // (micro * dp_size):]


def test_bad_arguments():
    with pytest.raises(ValueError, match="exhausted"):
        MicroBatchSampler(10, 10, 1, 0, 1)
    with pytest.raises(ValueError, match="data_parallel_rank"):
        MicroBatchSampler(10, 0, 1, 2, 2)
    with pytest.raises(ValueError, match="micro_batch_size"):
        MicroBatchSampler(10, 0, 0, 0, 1)


def test_collate_stacks_to_batch_by_sequence():
    samples = [{"tokens": torch.arange(5) + i, "loss_mask": torch.ones(5)} for i in range(3)]
    batch = collate_samples(samples)
    assert batch["tokens"].shape == (3, 5) and batch["loss_mask"].shape == (3, 5)
    assert torch.equal(batch["tokens"][2], torch.arange(5) + 2)
    with pytest.raises(ValueError, match="keys"):
        collate_samples([{"tokens": torch.zeros(2)}, {"labels": torch.zeros(2)}])


def test_works_as_dataloader_batch_sampler():
    data = [{"tokens": torch.full((4,), i)} for i in range(20)]
    loader = torch.utils.data.DataLoader(data, batch_sampler=MicroBatchSampler(20, 4, 2, 1, 2),
                                         collate_fn=collate_samples)
    firsts = [int(batch["tokens"][0, 0]) for batch in loader]
    assert firsts == [6, 10, 14, 18]
