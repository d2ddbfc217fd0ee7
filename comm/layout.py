"""Pure routing arithmetic for expert-parallel dispatch: who sends which rows where (CPU-testable).

Placement: ep rank r owns the global experts [r·E/ep, (r+1)·E/ep) (contiguous), and the ep group's
ranks sit on nodes in consecutive blocks (ep is the fastest mesh dim). `EPTopology` holds that
picture; every function here maps routing decisions (global expert ids [N, K]) to *send plans*:

    plan_sends(mask_RP) -> (src_rows [S], send_splits [P])

where mask[r, p] says "row r goes to ep rank p". The S sent rows are `rows[src_rows]`, ordered by
destination (then by row), which is exactly the layout `all_to_all_single` wants with
`input_split_sizes=send_splits`. Each row goes to a rank at most once, however many of that rank's
experts it picked (DeepEP dedups the same way): the receiver expands it over its local experts.

Flat dispatch is one hop with mask = "the token picked an expert on p". Two-hop dispatch (TR §3.2.2)
is hop 1 with mask = "p is the relay of a node the token picked", where the relay is the rank on that
node with the same local index as the sender (so hop 1 is inter-node only), then hop 2 at the relay
with mask = "p is on my node and the row picked an expert on p" (intra-node only).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

# torch is imported inside the functions that build tensors: EPTopology and the link arithmetic are plain
# Python, so the planner prices link bytes with them without building any tensor.
if TYPE_CHECKING:
    import torch

LINKS = ("inter", "intra")


@dataclass(frozen=True)
class EPTopology:
    """The ep group as ranks on nodes. `node_of[p]`: node id (0, 1, ...) of ep rank p."""

    n_experts: int
    node_of: tuple[int, ...]

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

    def expert_rank_table(self) -> torch.Tensor:
        import torch

        return torch.arange(self.n_experts) // self.experts_per_rank  # [E]: owner ep rank of each expert

    def expert_node_table(self) -> torch.Tensor:
        import torch

        return torch.tensor(self.node_of)[self.expert_rank_table()]  # [E]: node of each expert


def plan_sends(mask_RP: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """mask [R rows, P ranks] -> (src_rows [S], send_splits [P]): the rows to send, grouped by destination."""
    pairs = mask_RP.t().nonzero()  # [S, 2] = (dest p, row r), sorted by p then r
    send_splits = mask_RP.sum(dim=0).tolist()
    return pairs[:, 1], send_splits


def dest_rank_mask(ids_RK: torch.Tensor, topo: EPTopology) -> torch.Tensor:
    """[R, P] bool: row r picked an expert owned by ep rank p (flat dispatch)."""
    import torch

    mask = torch.zeros(ids_RK.size(0), topo.ep_size, dtype=torch.bool, device=ids_RK.device)
    return mask.scatter_(1, ids_RK // topo.experts_per_rank, True)


def two_hop_first_mask(ids_RK: torch.Tensor, topo: EPTopology, src: int) -> torch.Tensor:
    """[R, P] bool: hop 1 sends row r once to the relay (same local index as src) of every node it picked."""
    import torch

    node_hit_RM = torch.zeros(ids_RK.size(0), topo.n_nodes, dtype=torch.bool, device=ids_RK.device)
    node_hit_RM.scatter_(1, topo.expert_node_table().to(ids_RK.device)[ids_RK], True)
    relays = torch.tensor([topo.relay(src, n) for n in range(topo.n_nodes)], device=ids_RK.device)
    mask = torch.zeros(ids_RK.size(0), topo.ep_size, dtype=torch.bool, device=ids_RK.device)
    mask[:, relays] = node_hit_RM
    return mask


def two_hop_second_mask(ids_RK: torch.Tensor, topo: EPTopology, relay: int) -> torch.Tensor:
    """[R, P] bool: hop 2 forwards row r from `relay` to the ranks of relay's node that own experts it picked."""
    import torch

    mask = dest_rank_mask(ids_RK, topo)
    mask[:, torch.tensor(topo.node_of, device=mask.device) != topo.node_of[relay]] = False
    return mask


def group_by_expert(ids_RK: torch.Tensor, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Received rows -> (row [M], slot [M], counts [hi-lo]) for the (row, k) pairs whose expert is local.

    Pairs are ordered by local expert (stable in row order), so expert e's inputs are
    rows[row[sum(counts[:e]) : sum(counts[:e+1])]]; slot = r·K + k indexes the flattened weights.
    """
    import torch

    K = ids_RK.size(1)
    flat = ids_RK.flatten()  # [R·K]
    local = ((flat >= lo) & (flat < hi)).nonzero().squeeze(1)  # [M] slots with a local expert
    order = (flat[local] - lo).argsort(stable=True)
    slot = local[order]
    counts = torch.bincount(flat[slot] - lo, minlength=hi - lo).tolist()
    return slot // K, slot, counts


# ---- node-limited routing (TR §2.1.2: each token goes to at most M nodes) ----------------------------

def nodes_per_token(ids_NK: torch.Tensor, topo: EPTopology) -> torch.Tensor:
    """[N]: how many distinct nodes a token's selected experts lie on."""
    import torch

    hit = torch.zeros(ids_NK.size(0), topo.n_nodes, dtype=torch.bool, device=ids_NK.device)
    return hit.scatter_(1, topo.expert_node_table().to(ids_NK.device)[ids_NK], True).sum(dim=1)


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
