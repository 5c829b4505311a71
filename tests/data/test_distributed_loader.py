"""The distributed loader: disjoint per-rank shards of one global order, exact resume, streams."""

import numpy as np
import pytest
import torch
from datasets import Dataset

from muon_recipes.config import ConfigError
from muon_recipes.data import DistributedLoader, StreamingLoader, pack_windows
from muon_recipes.data.packing import pack_stream
from muon_recipes.data.tokenizer import ByteTokenizer

WINDOW = 5


def numbered_windows(n):
    """n packed windows whose first token is the row's index (so a batch tells which rows it holds)."""
    return pack_windows(np.repeat(np.arange(n, dtype=np.int32), WINDOW), WINDOW)


def rows_of(batch):
    inputs, targets = batch
    return inputs[:, 0].tolist()


def take(loader, steps):
    return [next(loader) for _ in range(steps)]


def test_batches_are_shifted_windows():
    data = pack_windows(np.arange(40, dtype=np.int32), WINDOW)
    inputs, targets = next(DistributedLoader(data, batch_size=3, rank=0, world_size=1, seed=0))
    assert inputs.dtype == targets.dtype == torch.long and inputs.shape == targets.shape == (3, WINDOW - 1)
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    assert torch.equal(targets - inputs, torch.ones_like(inputs))  # consecutive stream tokens


@pytest.mark.parametrize("shuffle", [True, False])
def test_two_ranks_split_the_one_rank_batch(shuffle):
    data = numbered_windows(23)  # 23 rows, global batch 6: steps straddle epoch ends
    single = DistributedLoader(data, batch_size=6, rank=0, world_size=1, seed=3, shuffle=shuffle)
    ranks = [DistributedLoader(data, batch_size=3, rank=r, world_size=2, seed=3, shuffle=shuffle) for r in range(2)]
    for step in range(30):
        whole = rows_of(next(single))
        parts = [rows_of(next(loader)) for loader in ranks]
        assert parts[0] + parts[1] == whole, step
        if step % 4 != 3:  # a step that does not straddle two epochs holds 6 distinct rows
            assert not set(parts[0]) & set(parts[1])


def test_every_epoch_visits_every_row_once_in_a_new_order():
    n, batch = 12, 4  # three steps per epoch
    loader = DistributedLoader(numbered_windows(n), batch_size=batch, rank=0, world_size=1, seed=5)
    epochs = [sum((rows_of(b) for b in take(loader, n // batch)), []) for _ in range(3)]
    for order in epochs:
        assert sorted(order) == list(range(n))
    assert epochs[0] != epochs[1] != epochs[2]
    again = DistributedLoader(numbered_windows(n), batch_size=batch, rank=0, world_size=1, seed=5)
    assert sum((rows_of(b) for b in take(again, n // batch)), []) == epochs[0]
    other_seed = DistributedLoader(numbered_windows(n), batch_size=batch, rank=0, world_size=1, seed=6)
    assert sum((rows_of(b) for b in take(other_seed, n // batch)), []) != epochs[0]
    in_order = DistributedLoader(numbered_windows(n), batch_size=5, rank=0, world_size=1, seed=5, shuffle=False)
    assert sum((rows_of(b) for b in take(in_order, 3)), []) == [i % n for i in range(15)]


def test_a_dataset_smaller_than_one_global_batch_still_loads():
    loader = DistributedLoader(numbered_windows(3), batch_size=4, rank=1, world_size=2, seed=0, shuffle=False)
    assert rows_of(next(loader)) == [1, 2, 0, 1]


@pytest.mark.parametrize("world_size", [1, 2])
def test_resume_continues_with_the_identical_batches(tmp_path, world_size):
    data = numbered_windows(10)  # global batch 4 with 10 rows: the resumed steps cross epoch ends
    def loaders():
        return [DistributedLoader(data, batch_size=4 // world_size, rank=r, world_size=world_size, seed=1)
                for r in range(world_size)]

    straight = loaders()
    for loader in straight:
        take(loader, 7)
    expected = [take(loader, 6) for loader in straight]

    first = loaders()
    for loader in first:
        take(loader, 7)
    torch.save([loader.state_dict() for loader in first], tmp_path / "state.pt")
    states = torch.load(tmp_path / "state.pt", weights_only=True)  # plain data only
    assert all(type(v) is int for state in states for v in state.values())
    assert states[0]["epoch"] == 2  # 7 steps of 4 rows = 28 rows = 2 epochs + 8
    resumed = loaders()
    for loader, state in zip(resumed, states):
        loader.load_state_dict(state)
    for loader, want in zip(resumed, expected):
        got = take(loader, 6)
        assert all(torch.equal(a, b) for g, w in zip(got, want) for a, b in zip(g, w))


def test_state_of_other_data_is_refused():
    loader = DistributedLoader(numbered_windows(10), batch_size=2, rank=0, world_size=1, seed=0)
    state = loader.state_dict()
    other = DistributedLoader(numbered_windows(11), batch_size=2, rank=0, world_size=1, seed=0)
    with pytest.raises(ConfigError, match="11 windows"):
        other.load_state_dict(state)


def test_bad_layout_and_empty_data_are_one_line():
    with pytest.raises(ConfigError, match="rank=2: must be < world_size=2"):
        DistributedLoader(numbered_windows(4), batch_size=1, rank=2, world_size=2, seed=0)
    with pytest.raises(ConfigError, match="batch_size=0"):
        DistributedLoader(numbered_windows(4), batch_size=0, rank=0, world_size=1, seed=0)
    with pytest.raises(ConfigError, match="empty"):
        DistributedLoader(pack_windows(np.zeros(3, dtype=np.int32), WINDOW), batch_size=1, rank=0, world_size=1, seed=0)


# --------------------------------------------------------------------------------------------------------------
# Streams
# --------------------------------------------------------------------------------------------------------------
def tagged_stream(num_docs=40, num_shards=4):
    """A real `datasets` stream of documents whose windows each start with a unique tag."""
    docs = [f"[{i:03d}]" for i in range(num_docs)]  # 5 bytes + EOS = one window of 6 tokens per document
    stream = Dataset.from_dict({"text": docs}).to_iterable_dataset(num_shards=num_shards)
    return pack_stream(stream, ByteTokenizer(), "text", window=6, group_docs=7)


def tags(batch):
    inputs, _ = batch
    return [bytes(row[1:4].tolist()).decode() for row in inputs]


def test_stream_ranks_read_disjoint_shards_and_cover_the_stream():
    ranks = [DistributedLoader(tagged_stream(), batch_size=4, rank=r, world_size=2, seed=0) for r in range(2)]
    assert all(isinstance(loader, StreamingLoader) for loader in ranks)
    seen = [sum((tags(b) for b in take(loader, 5)), []) for loader in ranks]  # 20 windows each: one epoch
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == [f"{i:03d}" for i in range(40)]
    # Whole source shards (10 documents each) per rank: each rank reads and tokenizes only its own.
    shards = [{int(t) // 10 for t in rank_seen} for rank_seen in seen]
    assert len(shards[0]) == len(shards[1]) == 2 and not shards[0] & shards[1]
    assert tags(next(ranks[0]))[0] == seen[0][0]  # the next epoch starts the stream again


def test_stream_with_fewer_shards_than_ranks_is_split_by_examples():
    ranks = [DistributedLoader(tagged_stream(num_shards=1), batch_size=5, rank=r, world_size=2, seed=0)
             for r in range(2)]
    seen = [sum((tags(b) for b in take(loader, 4)), []) for loader in ranks]
    assert sorted(seen[0] + seen[1]) == [f"{i:03d}" for i in range(40)]


@pytest.mark.parametrize("saved_at", [5, 8])  # 20 windows per rank and epoch: before and after the first epoch end
def test_stream_resume_continues_exactly_across_an_epoch_end(tmp_path, saved_at):
    straight = DistributedLoader(tagged_stream(), batch_size=3, rank=1, world_size=2, seed=0)
    take(straight, saved_at)
    expected = [tags(b) for b in take(straight, 6)]

    first = DistributedLoader(tagged_stream(), batch_size=3, rank=1, world_size=2, seed=0)
    take(first, saved_at)
    torch.save(first.state_dict(), tmp_path / "state.pt")
    resumed = DistributedLoader(tagged_stream(), batch_size=3, rank=1, world_size=2, seed=0)
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert resumed.epoch == saved_at * 3 // 20
    assert [tags(b) for b in take(resumed, 6)] == expected
    assert resumed.epoch == (saved_at + 6) * 3 // 20
