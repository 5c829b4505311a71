"""The sharded step plan without processes: shard bounds, local blocks, buckets and the all-to-all messages.

Every rank builds its own half of each message from the same inputs; these tests build all ranks' views
side by side and check they agree (what rank a sends to b is what b expects from a), that each matrix has
exactly one owner, that an owner receives exactly one copy of its share and that the work is balanced.
"""

from types import SimpleNamespace

import pytest
import torch

from muon_recipes.optim.sharded import ShardLayout, Topology, _bucket_members, _make_bucket, chunk_bounds
from muon_recipes.optim.blocks import BlockPlan
from muon_recipes.optim.orthogonalize import NSSettings

NS = NSSettings(5, "keller", torch.bfloat16, "torch", 1e-7)


@pytest.mark.parametrize("size", [0, 1, 2, 5, 7, 12, 13])
@pytest.mark.parametrize("parts", [1, 2, 3, 4])
def test_chunk_bounds_follow_torch_chunk(size, parts):
    chunks = torch.arange(size).chunk(parts) if size else ()
    expected = [(int(c[0]) if len(c) else size, len(c)) for c in chunks]
    expected += [(size, 0)] * (parts - len(expected))  # DTensor pads with empty shards, torch.chunk omits them
    assert chunk_bounds(size, parts) == expected


def layout(shape, dim, parts):
    return ShardLayout(tuple(shape), dim, 0, tuple(chunk_bounds(shape[dim], parts)))


def test_local_plans_when_shards_hold_whole_blocks():
    gate_up = BlockPlan.build((28, 20), (14, 14))
    assert layout((28, 20), 0, 2).local_plan(gate_up, 1) == BlockPlan((14, 20), (14,))
    assert layout((28, 20), 0, 3).local_plan(gate_up, 0) is None  # rows 0-9 | 10-19 cut the gate block
    qkv = BlockPlan.build((20, 20), (12, 4, 4))
    assert layout((20, 20), 0, 2).local_plan(qkv, 0) is None
    experts = BlockPlan.build((3, 12, 20), (6, 6), "per_expert")
    assert layout((3, 12, 20), 0, 2).local_plan(experts, 0) == BlockPlan((2, 12, 20), (6, 6))
    assert layout((3, 12, 20), 0, 4).local_plan(experts, 3) == BlockPlan((0, 12, 20), (6, 6))
    fused = BlockPlan.build((3, 12, 20), (6, 6), "fused")
    assert layout((3, 12, 20), 0, 2).local_plan(fused, 0) is None
    # Sharded along the rows of each expert (Shard(1)) at the block boundary: local, even with fused experts.
    assert layout((3, 12, 20), 1, 2).local_plan(fused, 1) == BlockPlan((3, 6, 20), (6,), fuse_experts=True)
    assert layout((12, 20), 1, 2).local_plan(BlockPlan.build((12, 20)), 0) is None  # column shards never


def item(shape, split=None):
    plan = BlockPlan.build(shape, split)
    return SimpleNamespace(plan=plan, ns=NS, param=torch.empty(shape, device="meta"))


def topology(S, t, R=1, j=0):
    grid = [[r * S + s for s in range(S)] for r in range(R)]
    # Group ranks deliberately not in shard order, as a mesh laid out differently could give.
    order = list(reversed(range(S)))
    return Topology(S, R, grid, j, t, None, order, None, [[j2 * S + o for o in order] for j2 in range(R)])


def all_ranks_buckets(items, S, R=1, spread=False, cap=1e9):
    layouts = [layout(it.plan.shape, 0, S) for it in items]
    P = R * S if spread else S
    members = _bucket_members(items, list(range(len(items))), P, cap)
    views = {}
    for j in range(R):
        for t in range(S):
            loads = [0.0] * P
            views[j, t] = [_make_bucket(items, layouts, topology(S, t, R, j), spread, m, loads) for m in members]
    return members, layouts, views


@pytest.mark.parametrize("S", [2, 3, 4])
def test_messages_agree_between_ranks_and_each_owner_gets_one_copy(S):
    items = [item((20, 16), (12, 4, 4)) for _ in range(5)] + [item((16, 12)) for _ in range(3)] + [item((2, 9))]
    members, layouts, views = all_ranks_buckets(items, S)
    for n in range(len(members)):
        buckets = {t: views[0, t][n] for t in range(S)}
        owners = buckets[0].owners
        assert all(b.owners == owners for b in buckets.values())  # the same assignment everywhere
        for t, b in buckets.items():
            order = sorted(range(S), key=lambda s: b.topo.shard_group_rank[s])
            for pos, dest in enumerate(order):  # gather: what t sends to dest is what dest expects from t
                assert b.send1_splits[pos] == buckets[dest].recv1_splits[order.index(t)]
                assert b.send2_splits[pos] == buckets[dest].recv2_splits[order.index(t)]
            owned_numel = sum(items[b.members[k]].param.numel() for k in b.mine)
            assert sum(b.recv1_splits) == owned_numel  # one copy of its share, nothing more
            assert sum(b.send2_splits) == owned_numel
        assert sorted(k for b in buckets.values() for k in b.mine) == list(range(len(owners)))


def test_buckets_are_balanced_multiples_of_the_owner_count():
    qkv = [item((20, 16), (12, 4, 4)) for _ in range(10)]
    cap = 2 * 4 * qkv[0].param.numel() * 2  # room for 2 bf16 matrices per owner, 4 owners
    members, _, views = all_ranks_buckets(qkv, S=4, cap=cap)
    assert [len(m) for m in members] == [8, 2]  # one bucket of 2 per owner, then the 2 left over
    full = views[0, 0][0]
    assert sorted(full.owners) == [0, 0, 1, 1, 2, 2, 3, 3]


def test_hsdp_spread_uses_every_rank_once():
    items = [item((24, 16)) for _ in range(8)]
    members, _, views = all_ranks_buckets(items, S=2, R=2, spread=True)
    owners = [o for b in views[0, 0] for o in b.owners]
    assert sorted(owners) == [0, 0, 1, 1, 2, 2, 3, 3]
    for (j, t), buckets in views.items():
        for b in buckets:
            # Replica j gathers only its owners' matrices; every rank receives every matrix's shard.
            assert all(b.owner_coords(b.owners[k])[0] == j for k in b.send1)
            assert sorted(b.recv2_members) == list(range(len(b.members)))
