"""Pure rank math for the (pp, edp, ep) layout; no torch.distributed here.

Order: the mesh is (pp, edp, ep) in row-major order, ep fastest-varying, so

    rank = pp_rank · dp + edp_rank · ep + ep_rank,      dp_rank = edp_rank · ep + ep_rank.

An ep group is `ep` consecutive ranks (one node, or neighbouring nodes); a dp group is the `dp`
consecutive ranks of one pipeline stage; an edp group is every ep-th rank inside a stage; a pp group
strides by dp. This is megatron-core's order "tp-cp-ep-dp-pp" with tp = cp = 1 (its expert-dp is our
edp). Example, world 8, pp 2, ep 2 (dp 4, edp 2):

    pp  = [[0, 4], [1, 5], [2, 6], [3, 7]]
    dp  = [[0, 1, 2, 3], [4, 5, 6, 7]]
    ep  = [[0, 1], [2, 3], [4, 5], [6, 7]]
    edp = [[0, 2], [1, 3], [4, 6], [5, 7]]
"""
from __future__ import annotations

from typing import NamedTuple

from .dims import ParallelDims

ORDER = "pp-edp-ep"  # slowest to fastest; megatron-core equivalent: "tp-cp-ep-dp-pp"
AXES = ("pp", "dp", "ep", "edp")


class Coords(NamedTuple):
    pp: int
    dp: int  # = edp · ep_size + ep
    edp: int
    ep: int
    node: int  # rank // ranks_per_node


def coords(rank: int, dims: ParallelDims) -> Coords:
    if not 0 <= rank < dims.world_size:
        raise ValueError(f"rank={rank} outside world_size={dims.world_size}")
    pp, dp = divmod(rank, dims.dp)
    edp, ep = divmod(dp, dims.ep)
    return Coords(pp=pp, dp=dp, edp=edp, ep=ep, node=rank // (dims.ranks_per_node or dims.world_size))


def rank_of(pp: int, edp: int, ep: int, dims: ParallelDims) -> int:
    return pp * dims.dp + edp * dims.ep + ep


def rank_groups(axis: str, dims: ParallelDims) -> list[list[int]]:
    """Every group along `axis` (pp | dp | ep | edp), each sorted, groups ordered by their first rank."""
    ranks = range(dims.world_size)
    key = {  # ranks with the same key form one group along the axis
        "pp": lambda r: (coords(r, dims).dp,),
        "dp": lambda r: (coords(r, dims).pp,),
        "ep": lambda r: (coords(r, dims).pp, coords(r, dims).edp),
        "edp": lambda r: (coords(r, dims).pp, coords(r, dims).ep),
    }.get(axis)
    if key is None:
        raise ValueError(f"axis={axis!r} not in {AXES}")
    groups: dict[tuple, list[int]] = {}
    for r in ranks:
        groups.setdefault(key(r), []).append(r)
    return sorted(groups.values())


def group_of(rank: int, axis: str, dims: ParallelDims) -> list[int]:
    """The group along `axis` that holds `rank`."""
    return next(g for g in rank_groups(axis, dims) if rank in g)


def node_ranks(dims: ParallelDims) -> list[list[int]]:
    """Ranks per node: consecutive blocks of ranks_per_node."""
    n = dims.ranks_per_node or dims.world_size
    return [list(range(s, s + n)) for s in range(0, dims.world_size, n)]
