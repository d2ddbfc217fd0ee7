"""Pure routing arithmetic for expert-parallel dispatch: who sends which rows where (CPU-testable).

Placement: ep rank r owns the global experts [r·E/ep, (r+1)·E/ep) (contiguous), and the ep group's
ranks sit on nodes in consecutive blocks (ep is the fastest mesh dim). `EPTopology` holds that
picture; every function here maps routing decisions (global expert ids [N, K]) to *send plans*:

    send_order(mask_RP) -> rows [P·R]        hop_counts(mask_RP, ids_RK, topo) -> counts [P, 1 (+ E/P)]

where mask[r, p] says "row r goes to ep rank p". The S = mask.sum() sent rows are
`rows[send_order(mask)[:S]]`, ordered by destination (then by row), which is exactly the layout
`all_to_all_single` wants with `input_split_sizes = counts[:, 0]`. Each row goes to a rank at most once,
however many of that rank's experts it picked (DeepEP dedups the same way): the receiver expands it
over its local experts, and `counts[p, 1:]` (the last hop) tells it how many (row, expert) pairs it
gets per expert, so its grouped GEMM is sized without looking at the rows.

Static shapes, one host read. Everything here is a device op whose output shape depends on shapes
only (no `nonzero`, no boolean indexing, no `.tolist()`): a data-dependent shape is a hidden host sync
on CUDA and cannot run on fake tensors. The host learns S (and the receive sizes) from ONE read per
hop of the exchanged counts (comm/all_to_all.py, through model.host.routing_counts) and slices the
static-shape order with it. `plan_sends` (the planner's API) is send_order + that read.

Flat dispatch is one hop with mask = "the token picked an expert on p". Two-hop dispatch (TR §3.2.2)
is hop 1 with mask = "p is the relay of a node the token picked", where the relay is the rank on that
node with the same local index as the sender (so hop 1 is inter-node only), then hop 2 at the relay
with mask = "p is on my node and the row picked an expert on p" (intra-node only).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

from moeforge.model.host import even_split

# torch is imported inside the functions that build tensors: EPTopology and the link arithmetic are plain
# Python, so the planner prices link bytes with them without building any tensor.
if TYPE_CHECKING:
    import torch

LINKS = ("inter", "intra")


class TopoTables(NamedTuple):
    """EPTopology as device tensors (built once per device: EPTopology.tables)."""

    expert_rank: torch.Tensor  # [E] owner ep rank of each expert
    expert_node: torch.Tensor  # [E] node of each expert
    node_of: torch.Tensor  # [P] node of each ep rank


@dataclass(frozen=True)
class EPTopology:
    """The ep group as ranks on nodes. `node_of[p]`: node id (0, 1, ...) of ep rank p."""

    n_experts: int
    node_of: tuple[int, ...]
    _tables: dict = field(default_factory=dict, init=False, repr=False, compare=False, hash=False)

    def __post_init__(self):
        ep = len(self.node_of)
        assert ep >= 1 and self.n_experts % ep == 0, f"n_experts={self.n_experts} must be divisible by ep={ep}"
        assert list(self.node_of) == sorted(self.node_of), f"ep ranks must fill nodes in order, got {self.node_of}"
        assert sorted(set(self.node_of)) == list(range(self.n_nodes)), f"node ids must be 0..n-1, got {self.node_of}"

    @classmethod
    def from_ranks(cls, global_ranks: list[int], n_experts: int, ranks_per_node: int | None) -> "EPTopology":
        """From the ep group's global ranks (in ep order); ranks_per_node=None: one node."""
        nodes = [g // ranks_per_node for g in global_ranks] if ranks_per_node else [0] * len(global_ranks)
        renumber = {n: i for i, n in enumerate(sorted(set(nodes)))}
        return cls(n_experts, tuple(renumber[n] for n in nodes))

    @property
    def ep_size(self) -> int:
        return len(self.node_of)

    @property
    def n_nodes(self) -> int:
        return self.node_of[-1] + 1

    @property
    def experts_per_rank(self) -> int:
        return self.n_experts // self.ep_size

    def expert_range(self, rank: int) -> tuple[int, int]:
        return rank * self.experts_per_rank, (rank + 1) * self.experts_per_rank

    def ranks_on(self, node: int) -> list[int]:
        return list(self._ranks_by_node.get(node, ()))

    @functools.cached_property
    def _ranks_by_node(self) -> dict[int, tuple[int, ...]]:
        """ranks_on's table, built once: relay() and local_index() call it per (src, node)."""
        by_node: dict[int, list[int]] = {}
        for p, n in enumerate(self.node_of):
            by_node.setdefault(n, []).append(p)
        return {n: tuple(ranks) for n, ranks in by_node.items()}

    def local_index(self, rank: int) -> int:
        return rank - self.ranks_on(self.node_of[rank])[0]

    def relay(self, src: int, node: int) -> int:
        """The rank on `node` with src's local index: hop 1 of a two-hop dispatch lands there."""
        return self.ranks_on(node)[self.local_index(src)]

    def link(self, src: int, dst: int) -> str:
        """'self' (no link), 'intra' (same node: NVLink) or 'inter' (different nodes: InfiniBand)."""
        if src == dst:
            return "self"
        return "intra" if self.node_of[src] == self.node_of[dst] else "inter"

    def check_two_hop(self) -> None:
        sizes = {len(self.ranks_on(n)) for n in range(self.n_nodes)}
        if len(sizes) != 1:
            raise ValueError(f"two-hop dispatch needs the same number of ep ranks on every node, got "
                             f"node_of={self.node_of}")

    def tables(self, device) -> TopoTables:
        """The topology as tensors on `device`, built on the first call per device (a dispatcher's
        topology is its own, so once per dispatcher): no host-to-device copy per dispatch."""
        import torch

        device = torch.device(device)
        if device not in self._tables:
            expert_rank = torch.arange(self.n_experts, device=device) // self.experts_per_rank
            node_of = torch.tensor(self.node_of, device=device)
            self._tables[device] = TopoTables(expert_rank, node_of[expert_rank], node_of)
        return self._tables[device]

    def expert_node_table(self) -> torch.Tensor:
        return self.tables("cpu").expert_node  # [E]: node of each expert


def send_order(mask_RP: torch.Tensor) -> torch.Tensor:
    """mask [R rows, P ranks] -> [P·R] row indices: the rows to send, grouped by destination (then by
    row), first; rows not sent after. The first mask.sum() entries are the send order. A stable argsort
    of "not sent" over the destination-major flattening is what `mask.t().nonzero()` would give, with a
    shape that does not depend on the data."""
    import torch

    R = mask_RP.size(0)
    return (~mask_RP.t().reshape(-1)).to(torch.uint8).argsort(stable=True) % max(R, 1)


def plan_sends(mask_RP: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """mask [R, P] -> (src_rows [S], send_splits [P]) with host splits: the planner's form of one hop
    (launcher/plan.py reads the host freely; the dispatcher reads it once per hop, comm/all_to_all.py)."""
    send_splits = mask_RP.sum(dim=0).tolist()
    return send_order(mask_RP)[:sum(send_splits)], send_splits


def hop_counts(mask_RP: torch.Tensor, ids_RK: torch.Tensor, topo: EPTopology, per_expert: bool) -> torch.Tensor:
    """int64 [P, 1] rows this rank sends to each ep rank, or [P, 1 + E/P] with, per rank p, the (row, k)
    pairs those rows carry for each of p's experts (the last hop: the receiver's grouped-GEMM sizes).
    A pair counts for p when its row goes to p and its expert lives on p."""
    import torch

    rows_P = mask_RP.sum(dim=0).unsqueeze(1)
    if not per_expert:
        return rows_P
    owner_RK = topo.tables(ids_RK.device).expert_rank[ids_RK]
    sent_RK = mask_RP.gather(1, owner_RK).long()  # the row goes to the rank of that expert
    pairs_E = torch.zeros(topo.n_experts, dtype=torch.int64, device=ids_RK.device)
    pairs_E.scatter_add_(0, ids_RK.reshape(-1), sent_RK.reshape(-1))
    return torch.cat([rows_P, pairs_E.view(topo.ep_size, topo.experts_per_rank)], dim=1)


def dest_rank_mask(ids_RK: torch.Tensor, topo: EPTopology) -> torch.Tensor:
    """[R, P] bool: row r picked an expert owned by ep rank p (flat dispatch)."""
    import torch

    mask = torch.zeros(ids_RK.size(0), topo.ep_size, dtype=torch.bool, device=ids_RK.device)
    return mask.scatter_(1, topo.tables(ids_RK.device).expert_rank[ids_RK], True)


def two_hop_first_mask(ids_RK: torch.Tensor, topo: EPTopology, src: int) -> torch.Tensor:
    """[R, P] bool: hop 1 sends row r once to the relay (same local index as src) of every node it picked.
    The relays of src are ep ranks local_index(src) + i·L on nodes i = 0..M-1 (L ranks per node, the same
    on every node: check_two_hop), so the [R, M] node hits are the mask's columns of those ranks."""
    import torch

    R, P, M = ids_RK.size(0), topo.ep_size, topo.n_nodes
    node_hit_RM = torch.zeros(R, M, dtype=torch.bool, device=ids_RK.device)
    node_hit_RM.scatter_(1, topo.tables(ids_RK.device).expert_node[ids_RK], True)
    mask = torch.zeros(R, M, P // M, dtype=torch.bool, device=ids_RK.device)
    mask[:, :, topo.local_index(src)] = node_hit_RM
    return mask.view(R, P)


def two_hop_second_mask(ids_RK: torch.Tensor, topo: EPTopology, relay: int) -> torch.Tensor:
    """[R, P] bool: hop 2 forwards row r from `relay` to the ranks of relay's node that own experts it picked."""
    same_node_P = topo.tables(ids_RK.device).node_of == topo.node_of[relay]
    return dest_rank_mask(ids_RK, topo) & same_node_P


def group_by_expert(ids_RK: torch.Tensor, lo: int, hi: int, n_pairs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Received rows -> (row [M], slot [M]) for the M = n_pairs (row, k) pairs whose expert is in [lo, hi).

    Pairs are ordered by local expert (stable in row order), so with counts[e] pairs of local expert e,
    its inputs are rows[row[sum(counts[:e]) : sum(counts[:e+1])]]; slot = r·K + k indexes the flattened
    weights. n_pairs and counts come from the exchanged hop counts (hop_counts' per-expert columns), so
    this is one stable argsort (non-local pairs sort last) and a slice: no host read here.
    """
    import torch

    K = ids_RK.size(1)
    flat = ids_RK.reshape(-1)  # [R·K]
    key = torch.where((flat >= lo) & (flat < hi), flat - lo, hi - lo)
    slot = key.argsort(stable=True)[:n_pairs]
    return slot // K, slot


# ---- the dry run's routing: evenly spread (model.host.routing_counts' uniform stand-in) -------------------
# Each gives [sent, received]: per ep rank p, [rows (, pairs per expert of the receiver)], as hop_counts and
# the count exchange would with routing that spreads every rank's N·K (token, expert) pairs evenly: over
# the destinations (flat), the nodes (hop 1), the ranks of the relay's node (hop 2); a destination gets
# min(pairs, rows available) rows (each pair on its own row as far as rows go), its pairs spread evenly
# over its experts. Every rank is assumed to have the same N. Internally consistent: the received rows
# and pairs are what the peers' stand-ins send, pairs >= rows >= 1 where anything arrives.
def _dest(rows: int, pairs: int, per_rank: int | None) -> list[int]:
    return [rows] if per_rank is None else [rows] + even_split(pairs, per_rank)


def uniform_flat_counts(N: int, K: int, topo: EPTopology, me: int) -> list[list[list[int]]]:
    P, epr = topo.ep_size, topo.experts_per_rank
    pairs = even_split(N * K, P)
    send = [_dest(min(pairs[p], N), pairs[p], epr) for p in range(P)]
    return [send, [send[me]] * P]


def uniform_two_hop_counts(N: int, K: int, topo: EPTopology, me: int, hop: int) -> list[list[list[int]]]:
    P, M, L, epr = topo.ep_size, topo.n_nodes, topo.ep_size // topo.n_nodes, topo.experts_per_rank
    node_pairs = even_split(N * K, M)
    node_rows = [min(c, N) for c in node_pairs]
    node, li = topo.node_of[me], topo.local_index(me)
    if hop == 0:  # to the relay of every node; from the senders with my local index
        send = [[node_rows[topo.node_of[p]]] if topo.local_index(p) == li else [0] for p in range(P)]
        return [send, [[node_rows[node]] if topo.local_index(q) == li else [0] for q in range(P)]]
    # at the relay: M senders' rows for this node, their pairs spread over the node's L ranks
    rows_in, pairs = M * node_rows[node], even_split(M * node_pairs[node], L)
    zero = [0] * (1 + epr)
    send = [_dest(min(pairs[topo.local_index(p)], rows_in), pairs[topo.local_index(p)], epr)
            if topo.node_of[p] == node else zero for p in range(P)]
    return [send, [send[me] if topo.node_of[q] == node else zero for q in range(P)]]


# ---- node-limited routing (TR §2.1.2: each token goes to at most M nodes) ----------------------------

def nodes_per_token(ids_NK: torch.Tensor, topo: EPTopology) -> torch.Tensor:
    """[N]: how many distinct nodes a token's selected experts lie on."""
    import torch

    hit = torch.zeros(ids_NK.size(0), topo.n_nodes, dtype=torch.bool, device=ids_NK.device)
    return hit.scatter_(1, topo.tables(ids_NK.device).expert_node[ids_NK], True).sum(dim=1)


def node_limit(n_expert_groups: int, n_limited_groups: int, topo: EPTopology) -> int | None:
    """The most nodes one token's experts can span under the router's group limit, or None if unbounded.

    The router keeps `n_limited_groups` groups of contiguous experts per token. When every group lies
    inside one node (the group count is a multiple of the node count), a token touches at most
    min(n_limited_groups, n_nodes) nodes: with n_expert_groups == n_nodes this is node-limited routing
    with M = n_limited_groups (DeepSeek-V3: 8 groups on 8 nodes, M = 4). Otherwise a group may straddle
    two nodes and the router gives no bound (returns None); `node_limited_groups` gives a group count
    that does bound it.
    """
    E = topo.n_experts
    assert E % n_expert_groups == 0, f"{E=} not divisible by {n_expert_groups=}"
    per_group = E // n_expert_groups
    node = topo.expert_node_table()
    nested = all(len(set(node[g * per_group:(g + 1) * per_group].tolist())) == 1 for g in range(n_expert_groups))
    return min(n_limited_groups, topo.n_nodes) if nested else None


def node_limited_groups(topo: EPTopology) -> int:
    """n_expert_groups that makes groups = nodes, so the router's group limit is the node limit M."""
    return topo.n_nodes
