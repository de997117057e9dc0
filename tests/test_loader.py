"""SequenceLoader: deterministic epochs, exact resume, disjoint rank shares; eval batching."""

import pytest
import torch

from xpar.checks import UserError
from xpar.data import SequenceLoader, TensorSequences, check_token_ids, eval_batches


def source(n=40, length=5):
    # row i holds i everywhere, so a batch names the sequences it took
    return TensorSequences(torch.arange(n).repeat_interleave(length).view(n, length))


def ids(batches):
    return [int(b[0]) for mb in batches for b in mb]


def test_an_epoch_visits_every_full_batch_once_then_reshuffles():
    loader = SequenceLoader(source(40), global_batch=8, micro_batch=4, seed=1)
    epoch0 = [ids(loader.next_step()) for _ in range(5)]
    assert sorted(sum(epoch0, [])) == list(range(40))
    epoch1 = [ids(loader.next_step()) for _ in range(5)]
    assert sorted(sum(epoch1, [])) == list(range(40)) and epoch1 != epoch0
    state = loader.state_dict()
    assert (state["epoch"], state["step"]) == (2, 0)


def test_micro_batches_split_the_rank_share():
    loader = SequenceLoader(source(40), global_batch=8, micro_batch=2)
    mbs = loader.next_step()
    assert [mb.shape for mb in mbs] == [(2, 5)] * 4


def test_resume_gives_the_same_batches():
    a = SequenceLoader(source(45), global_batch=8, micro_batch=8, seed=3)
    for _ in range(7):  # into the second epoch (5 full batches per epoch; tail of 5 skipped)
        a.next_step()
    b = SequenceLoader(source(45), global_batch=8, micro_batch=8, seed=3)
    b.load_state_dict(a.state_dict())
    for _ in range(6):
        assert ids(a.next_step()) == ids(b.next_step())


@pytest.mark.parametrize(
    "changed,message",
    [
        (dict(global_batch=16), r"saved with data\.batch_size=8, this run has 16"),
        (dict(n=60), r"number of training sequences=45, this run has 60"),
        (dict(overfit_batches=2), r"trainer\.overfit_batches or the data=5, this run has 2"),
    ],
)
def test_a_position_from_other_data_or_batch_is_refused(changed, message):
    saved = SequenceLoader(source(45), global_batch=8, micro_batch=8).state_dict()
    kw = dict(global_batch=8, micro_batch=8, overfit_batches=0) | changed
    other = SequenceLoader(source(kw.pop("n", 45)), **kw)
    with pytest.raises(UserError, match=message):
        other.load_state_dict(saved)
    with pytest.raises(UserError, match="position is for stream data"):
        other.load_state_dict({**saved, "kind": "stream"})


def test_ranks_read_disjoint_shares_of_the_same_global_batch():
    single = SequenceLoader(source(40), global_batch=8, micro_batch=8, seed=2)
    ranks = [SequenceLoader(source(40), 8, 2, dp_rank=r, dp_world=2, seed=2) for r in range(2)]
    for _ in range(6):
        union = ids(ranks[0].next_step()) + ids(ranks[1].next_step())
        assert union == ids(single.next_step())


def test_overfit_repeats_the_first_batches():
    loader = SequenceLoader(source(40), global_batch=8, micro_batch=8, seed=0, overfit_batches=2)
    seen = [ids(loader.next_step()) for _ in range(6)]
    assert seen[0] == seen[2] == seen[4] and seen[1] == seen[3] and seen[0] != seen[1]


def test_too_few_sequences_for_a_batch_is_a_clear_error():
    with pytest.raises(UserError, match=r"train split has 3 sequences.*data\.batch_size=8"):
        SequenceLoader(source(3), global_batch=8, micro_batch=8)
    with pytest.raises(UserError, match="has 0 sequences"):
        SequenceLoader(source(0), global_batch=8, micro_batch=8)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_eval_batches_cover_the_split_once_with_equal_batch_counts(world):
    shares = [
        list(eval_batches(source(10), batch=3, dp_rank=r, dp_world=world)) for r in range(world)
    ]
    assert len({len(s) for s in shares}) == 1  # same number of forward passes on every rank
    seen = sorted(int(b[0]) for s in shares for mb in s for b in mb)
    assert seen == list(range(10))
    capped = list(eval_batches(source(10), batch=3, max_batches=2))
    assert sum(len(b) for b in capped) == 6


def test_token_ids_checked_against_vocab():
    check_token_ids(torch.tensor([[0, 9]]), 10, "batch")
    with pytest.raises(UserError, match=r"token id 10 is outside \[0, model\.vocab_size=10\)"):
        check_token_ids(torch.tensor([[0, 10]]), 10, "batch")
    with pytest.raises(UserError, match="token id -1"):
        check_token_ids(torch.tensor([[-1, 3]]), 10, "batch")
