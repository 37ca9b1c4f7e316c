"""Block names (maas/mesh/kvblocks.py): chained, namespaced; the built-in engine's prefix cache
reports exactly the blocks its index holds; a router's index follows reports, snapshots
and gaps; vLLM's events are renamed into the same names (engines/vllm_kv.py)."""

from __future__ import annotations

import random
from types import SimpleNamespace

import torch

from maas.mesh import kvblocks
from maas.mesh.kvblocks import CLEARED, REMOVED, STORED, KvEvents, KvIndex, block_hashes
from maas.services.worker.engines.prefix import PrefixCache
from maas.services.worker.engines.vllm_kv import translate


def test_a_blocks_name_stands_for_its_whole_prefix():
    a = list(range(40))
    b = [*range(16), *range(100, 124)]  # shares only the first block with a
    names_a, names_b = block_hashes(a, 16), block_hashes(b, 16)
    assert len(names_a) == 2  # 40 tokens: two full blocks, the partial third has no name
    assert names_a[0] == names_b[0] and names_a[1] != names_b[1]
    # the same second block after a different first block is another name (chained)
    c = [*range(200, 216), *range(16, 32)]
    assert block_hashes(c, 16)[1] != names_a[1]
    assert block_hashes(a, 16, "tuned@1") != names_a  # an adapter's blocks are its own
    assert block_hashes(a[:15], 16) == []
    assert block_hashes(a, 8)[1] != names_a[0]  # block size is part of what a name means


def _kv(tokens: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.zeros(1, 1, tokens, 2), torch.zeros(1, 1, tokens, 2))]


def test_the_prefix_caches_reports_follow_its_index_through_evictions():
    events = KvEvents(16)
    cache = PrefixCache(budget_tokens=96, block=16, events=events)
    rng = random.Random(0)
    system = [rng.randrange(1000) for _ in range(32)]
    prompts = [system + [rng.randrange(1000) for _ in range(rng.randrange(1, 40))] for _ in range(30)]
    mirror = KvIndex()
    for seq, prompt in enumerate(prompts, 1):
        cache.insert("", prompt, _kv(len(prompt)))
        mirror.apply("r", 16, seq, events.take())
        # what the router believes the replica holds is what the cache would find
        for other in prompts:
            names = block_hashes(other, 16)
            found = cache.lookup("", other)
            expected = found[0] // 16 if found else 0
            matched = mirror.matched("r", names[:(len(other) - 1) // 16])
            assert matched == expected, (seq, other)
    assert mirror.matched("r", block_hashes(system, 16)) == 2  # the shared prefix outlived the evictions


def test_a_relay_that_falls_behind_gets_a_snapshot(monkeypatch):
    monkeypatch.setattr(kvblocks, "MAX_PENDING", 10)
    events = KvEvents(16)
    events.stored([1, 2, 3])
    assert events.take() == [(STORED, [1, 2, 3])]
    events.stored(range(4, 20))  # more than 10 names pending: the changes give way to the whole set
    events.removed([1])
    ops = events.take()
    assert ops[0] == (CLEARED, []) and sorted(ops[1][1]) == list(range(2, 20))
    assert events.take() == []
    events.stored([2, 30])  # 2 is held already: only 30 is news
    events.removed([30, 99])  # 99 was never held
    assert events.take() == [(STORED, [30]), (REMOVED, [30])]


def test_the_index_counts_lost_reports_and_a_snapshot_repairs_it():
    index = KvIndex()
    index.apply("r", 16, 1, [(STORED, [1, 2, 3])])
    index.apply("r", 16, 4, [(REMOVED, [3])])  # 2 and 3 lost
    assert index.lost == 2
    assert index.matched("r", [1, 2, 3]) == 2
    index.apply("r", 16, 5, [(CLEARED, []), (STORED, [7, 8])])
    assert index.matched("r", [1, 2]) == 0 and index.matched("r", [7, 8, 9]) == 2
    index.apply("r", 16, 1, [(STORED, [5])])  # the worker restarted its count: start over
    assert index.matched("r", [7]) == 0 and index.matched("r", [5]) == 1
    index.forget("r")
    assert index.block_size("r") is None and index.matched("r", [5]) == 0


def _stored(hashes, parent, tokens, size=4, lora=None):
    return SimpleNamespace(block_hashes=hashes, parent_block_hash=parent, token_ids=tokens, block_size=size,
                           lora_name=lora, group_idx=0)


def test_vllm_events_are_renamed_with_the_routers_names():
    events, names = KvEvents(4), {}
    tokens = list(range(12))
    translate([_stored([b"v1", b"v2"], None, tokens[:8])], names, events)
    translate([_stored([b"v3"], b"v2", tokens[8:12])], names, events)  # a later step extends the chain
    want = block_hashes(tokens, 4)
    assert all(n in events for n in want) and len(events) == 3
    translate([_stored([b"x1"], b"unknown", [1, 2, 3, 4])], names, events)  # orphan: cannot be named
    assert len(events) == 3
    translate([_stored([b"a1"], None, tokens[:4], lora="tuned@1")], names, events)
    assert block_hashes(tokens[:4], 4, "tuned@1")[0] in events
    translate([SimpleNamespace(block_hashes=[b"v3", b"nope"], medium="GPU", group_idx=0)], names, events)
    assert want[2] not in events and want[1] in events
    translate([SimpleNamespace()], names, events)  # AllBlocksCleared
    assert len(events) == 0 and not names


def test_the_router_counts_the_leading_blocks_each_replica_holds():
    from maas.services.router.kvroute import KvRouter
    from maas.v1 import mesh_pb2

    router = KvRouter(known=lambda rid: rid != "gone")
    ids = list(range(12))
    router.index.apply("a", 4, 1, [(STORED, block_hashes(ids[:8], 4))])
    router.index.apply("b", 4, 1, [(STORED, block_hashes(ids[:4], 4))])
    a, b = mesh_pb2.ReplicaInfo(replica_id="a"), mesh_pb2.ReplicaInfo(replica_id="b")
    assert [m for _, m in router._matches(ids, 4, [a, b])] == [2, 1]
    # a prompt of exactly two blocks: its last token is computed by any engine, so only one counts
    assert [m for _, m in router._matches(ids[:8], 4, [a, b])] == [1, 1]
    assert [m for _, m in router._matches([99, *ids[1:]], 4, [a, b])] == [0, 0]
    router.observe(mesh_pb2.KvEvents(replica_id="gone", block_size=4, seq=1, events=[
        mesh_pb2.KvEvent(kind=mesh_pb2.KvEvent.STORED, block_hashes=[1])]))
    assert "gone" not in router.index.replicas()  # a replica etcd does not list leaves no trace
