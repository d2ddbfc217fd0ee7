"""comm.layout: send plans, two-hop relays, node-limited routing — pure functions, no process group.

`simulate` runs a whole exchange for every rank in one process (an all-to-all is a transpose of the
per-destination chunks), so flat and two-hop routing are checked end to end: every (token, rank that
owns one of its experts) pair arrives exactly once, and hop 1 / hop 2 use only the links they should.
"""
import pytest
import torch

from moeforge.comm.all_to_all import RowFormat
from moeforge.comm.layout import (EPTopology, dest_rank_mask, group_by_expert, hop_counts, node_limit,
                                  node_limited_groups, nodes_per_token, plan_sends, send_order, two_hop_first_mask,
                                  two_hop_second_mask, uniform_flat_counts, uniform_two_hop_counts)
from moeforge.model.args import ModelArgs
from moeforge.model.moe import Gate

TOPO = EPTopology.from_ranks([0, 1, 2, 3], n_experts=8, ranks_per_node=2)  # 2 nodes x 2, 2 experts per rank


@pytest.mark.timeout(10)
def test_topology():
    assert TOPO.node_of == (0, 0, 1, 1) and TOPO.n_nodes == 2 and TOPO.experts_per_rank == 2
    assert [TOPO.local_index(p) for p in range(4)] == [0, 1, 0, 1]
    assert [TOPO.relay(0, n) for n in range(2)] == [0, 2] and [TOPO.relay(3, n) for n in range(2)] == [1, 3]
    assert [TOPO.link(1, p) for p in range(4)] == ["intra", "self", "inter", "inter"]
    assert TOPO.expert_node_table().tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    # an ep group of ranks 4..7 on nodes 2, 3 (ranks_per_node=2) is renumbered to nodes 0, 1
    assert EPTopology.from_ranks([4, 5, 6, 7], 8, 2).node_of == (0, 0, 1, 1)
    assert EPTopology.from_ranks([0, 1], 8, None).node_of == (0, 0)
    with pytest.raises(ValueError, match="same number of ep ranks"):
        EPTopology(6, (0, 0, 1)).check_two_hop()
    with pytest.raises(AssertionError, match="divisible"):
        EPTopology(6, (0, 0, 1, 1))


@pytest.mark.timeout(10)
def test_plan_sends_groups_by_destination_and_dedups():
    ids = torch.tensor([[0, 1], [5, 2], [4, 5], [7, 0]])  # token 0 picks two experts of rank 0
    mask = dest_rank_mask(ids, TOPO)
    assert mask.tolist() == [[True, False, False, False], [False, True, True, False],
                             [False, False, True, False], [True, False, False, True]]
    rows, splits = plan_sends(mask)
    assert splits == [2, 1, 2, 1]  # token 0 goes to rank 0 once, not twice
    assert rows.tolist() == [0, 3, 1, 1, 2, 3]  # by destination, then by token


@pytest.mark.timeout(10)
def test_two_hop_masks_use_only_their_links():
    ids = torch.tensor([[4, 6], [0, 7], [2, 3]])
    first = two_hop_first_mask(ids, TOPO, src=1)  # src 1 (node 0, local index 1): relays are ranks 1 and 3
    assert first.tolist() == [[False, False, False, True], [False, True, False, True], [False, True, False, False]]
    second = two_hop_second_mask(ids, TOPO, relay=3)  # at rank 3 (node 1): forward to ranks 2, 3 only
    assert second.tolist() == [[False, False, True, True], [False, False, False, True], [False, False, False, False]]


def simulate(ids_per_rank, topo, two_hop):
    """Run the routing of every rank; returns (received (src, token) tags per rank, link use per hop)."""
    P = topo.ep_size
    rows = {p: torch.stack([torch.full((len(ids),), p), torch.arange(len(ids))], 1)  # [N, 2] (src, token) tags
            for p, ids in enumerate(ids_per_rank)}
    ids = dict(enumerate(ids_per_rank))
    links = []
    for hop in range(2 if two_hop else 1):
        chunks, used = {}, set()
        for p in range(P):
            if hop == 0:
                mask = two_hop_first_mask(ids[p], topo, p) if two_hop else dest_rank_mask(ids[p], topo)
            else:
                mask = two_hop_second_mask(ids[p], topo, p)
            src, splits = plan_sends(mask)
            for q, (r, i) in enumerate(zip(src.split(splits), ids[p][src].split(splits))):
                chunks[(p, q)] = (rows[p][r], i)
                if len(r):
                    used.add(topo.link(p, q))
        rows = {q: torch.cat([chunks[(p, q)][0] for p in range(P)]) for q in range(P)}
        ids = {q: torch.cat([chunks[(p, q)][1] for p in range(P)]) for q in range(P)}
        links.append(used)
    return {q: sorted(map(tuple, rows[q].tolist())) for q in range(P)}, links


@pytest.mark.timeout(20)
@pytest.mark.parametrize("two_hop", [False, True])
def test_simulated_exchange_delivers_each_token_once_per_rank(two_hop):
    g = torch.Generator().manual_seed(0)
    topo = EPTopology.from_ranks(list(range(8)), n_experts=16, ranks_per_node=4)  # 2 nodes x 4
    ids = [torch.stack([torch.randperm(16, generator=g)[:4] for _ in range(10)]) for _ in range(8)]
    got, links = simulate(ids, topo, two_hop)
    for q in range(8):
        want = sorted((p, t) for p in range(8) for t in range(10)
                      if any(topo.expert_range(q)[0] <= e < topo.expert_range(q)[1] for e in ids[p][t].tolist()))
        assert got[q] == want, q
    if two_hop:
        assert links[0] <= {"inter", "self"} and links[1] <= {"intra", "self"}


@pytest.mark.timeout(10)
def test_two_hop_crosses_nodes_once_per_destination_node():
    topo = EPTopology.from_ranks(list(range(8)), 16, 4)
    ids = torch.tensor([[8, 10, 12, 14]])  # one token, four experts on four ranks of node 1, sent from rank 0
    flat = dest_rank_mask(ids, topo)
    first = two_hop_first_mask(ids, topo, 0)
    inter = lambda m: sum(int(m[0, q]) for q in range(8) if topo.link(0, q) == "inter")  # noqa: E731
    assert inter(flat) == 4 and inter(first) == 1


@pytest.mark.timeout(10)
def test_group_by_expert():
    ids = torch.tensor([[3, 0], [2, 3], [1, 2]])
    row, slot = group_by_expert(ids, 2, 4, n_pairs=4)  # local experts 2, 3: 2 pairs each
    assert row.tolist() == [1, 2, 0, 1] and slot.tolist() == [2, 5, 0, 3]
    row, slot = group_by_expert(ids, 4, 6, n_pairs=0)
    assert row.numel() == 0


@pytest.mark.timeout(10)
def test_send_order_is_nonzero_order_with_a_static_shape():
    g = torch.Generator().manual_seed(3)
    for R, P in [(0, 4), (1, 1), (7, 4), (33, 8)]:
        mask = torch.rand(R, P, generator=g) < 0.4
        order = send_order(mask)
        assert order.shape == (R * P,)
        assert torch.equal(order[:int(mask.sum())], mask.t().nonzero()[:, 1])


@pytest.mark.timeout(10)
def test_hop_counts_rows_and_pairs_per_receiver_expert():
    ids = torch.tensor([[0, 1], [5, 2], [4, 5], [7, 0]])
    flat = hop_counts(dest_rank_mask(ids, TOPO), ids, TOPO, per_expert=True)
    # rows per rank [2, 1, 2, 1]; pairs per expert 0..7 = [2, 1, 1, 0, 1, 2, 0, 1]
    assert flat.tolist() == [[2, 2, 1], [1, 1, 0], [2, 1, 2], [1, 0, 1]]
    # hop 2 at relay 3 (node 1): only ranks 2, 3 get rows, and only their experts' pairs count
    second = hop_counts(two_hop_second_mask(ids, TOPO, 3), ids, TOPO, per_expert=True)
    assert second.tolist() == [[0, 0, 0], [0, 0, 0], [2, 1, 2], [1, 0, 1]]
    assert hop_counts(two_hop_first_mask(ids, TOPO, 0), ids, TOPO, per_expert=False).tolist() == [[3], [0], [3], [0]]


@pytest.mark.timeout(10)
@pytest.mark.parametrize("N,K", [(1, 1), (1, 2), (5, 3), (64, 8)])
def test_uniform_stand_in_counts_are_consistent(N, K):
    """The dry run's counts: what every rank sends is what its peers say they receive; pairs >= rows, and
    rows <= the rows available; two-hop hop 2 forwards exactly the rows hop 1 brought (<= rows · ranks)."""
    topo = EPTopology.from_ranks(list(range(8)), 16, 4)  # 2 nodes x 4, 2 experts per rank
    P = topo.ep_size
    flat = [uniform_flat_counts(N, K, topo, p) for p in range(P)]
    hop1 = [uniform_two_hop_counts(N, K, topo, p, 0) for p in range(P)]
    hop2 = [uniform_two_hop_counts(N, K, topo, p, 1) for p in range(P)]
    for counts in (flat, hop1, hop2):
        assert all(counts[q][1][p] == counts[p][0][q] for p in range(P) for q in range(P))
    for p in range(P):
        for rows, *pairs in flat[p][0] + hop2[p][0]:
            assert (rows == 0) == (sum(pairs) == 0) and rows <= sum(pairs) <= rows * topo.experts_per_rank
        assert sum(r for r, *_ in flat[p][0]) <= N * P and sum(hop1[p][0][q][0] for q in range(P)) <= N * P
        rows_at_relay = sum(r for r, in hop1[p][1])
        assert all(r <= rows_at_relay for r, *_ in hop2[p][0])
        assert sum(sum(c[1:]) for c in flat[p][1]) <= sum(c[0] for c in flat[p][1]) * K


@pytest.mark.timeout(20)
@pytest.mark.parametrize("M", [1, 2, 3])
def test_node_limited_routing_bounds_nodes_per_token(M):
    """4 nodes of 2 ranks, 32 experts; groups = nodes, so the router's group limit is the node limit M."""
    topo = EPTopology.from_ranks(list(range(8)), n_experts=32, ranks_per_node=2)
    G = node_limited_groups(topo)
    assert G == 4 and node_limit(G, M, topo) == M
    args = ModelArgs(dim=64, n_routed_experts=32, n_activated_experts=6, n_expert_groups=G, n_limited_groups=M)
    gate = Gate(args)
    torch.nn.init.normal_(gate.weight, 0, 1.0, generator=torch.Generator().manual_seed(M))
    with torch.no_grad():
        gate.bias.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))  # the bias moves selection only
        _, ids, _ = gate(torch.randn(512, 64, generator=torch.Generator().manual_seed(2)))
    n = nodes_per_token(ids, topo)
    assert n.max().item() == M  # the bound holds and is reached
    # without the group limit the same scores spread over more nodes
    free = Gate(ModelArgs(dim=64, n_routed_experts=32, n_activated_experts=6, n_expert_groups=1, n_limited_groups=1))
    free.load_state_dict(gate.state_dict())
    with torch.no_grad():
        _, ids_free, _ = free(torch.randn(512, 64, generator=torch.Generator().manual_seed(2)))
    assert nodes_per_token(ids_free, topo).max().item() > M or M >= 3


@pytest.mark.timeout(10)
def test_node_limit_none_when_groups_straddle_nodes():
    topo = EPTopology.from_ranks(list(range(6)), n_experts=12, ranks_per_node=2)  # 3 nodes, 4 experts each
    assert node_limit(3, 1, topo) == 1 and node_limit(6, 2, topo) == 2 and node_limit(12, 5, topo) == 3
    assert node_limit(2, 1, topo) is None  # 6-expert groups straddle nodes


@pytest.mark.timeout(10)
def test_row_format_round_trip():
    fmt = RowFormat(("x", torch.bfloat16, 5, "x"), ("w", torch.float32, 2, "meta"), ("ids", torch.int32, 2, "meta"))
    assert fmt.part_bytes == {"x": 10, "meta": 16}
    t = {"x": torch.randn(3, 5).bfloat16(), "w": torch.rand(3, 2), "ids": torch.tensor([[1, 7], [0, 3], [5, 5]],
                                                                                      dtype=torch.int32)}
    rows = fmt.pack(t)
    assert rows.dtype == torch.uint8 and rows.shape == (3, 26)
    back = fmt.unpack(rows)
    assert all(torch.equal(back[k], t[k]) for k in t)
    assert fmt.unpack(rows[:0])["w"].shape == (0, 2)  # no rows, and one row: field offsets 10, 18 bytes
    assert all(torch.equal(v, t[k][1:2]) for k, v in fmt.unpack(rows[1:2]).items())
