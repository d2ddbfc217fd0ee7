import itertools

import pytest

from moeforge.parallel.dims import ParallelDims
from moeforge.parallel.groups import coords, group_of, node_ranks, rank_groups, rank_of


def test_documented_example_world8_pp2_ep2():
    d = ParallelDims(8, pp=2, ep=2)
    assert rank_groups("pp", d) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert rank_groups("dp", d) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert rank_groups("ep", d) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert rank_groups("edp", d) == [[0, 2], [1, 3], [4, 6], [5, 7]]


LAYOUTS = [(w, pp, ep) for w in (1, 2, 4, 8, 16) for pp in (1, 2, 4, 8, 16) for ep in (1, 2, 4, 8, 16)
           if w % pp == 0 and (w // pp) % ep == 0]


@pytest.mark.parametrize("w, pp, ep", LAYOUTS)
def test_groups_partition_the_world_and_agree_with_coords(w, pp, ep):
    d = ParallelDims(w, pp, ep)
    sizes = {"pp": d.pp, "dp": d.dp, "ep": d.ep, "edp": d.edp}
    for axis, size in sizes.items():
        groups = rank_groups(axis, d)
        assert sorted(itertools.chain(*groups)) == list(range(w))
        assert all(len(g) == size for g in groups) and len(groups) == w // size
    for r in range(w):
        c = coords(r, d)
        assert rank_of(c.pp, c.edp, c.ep, d) == r and c.dp == c.edp * d.ep + c.ep
        # ep fastest-varying: an ep group is consecutive ranks
        g = group_of(r, "ep", d)
        assert g == list(range(g[0], g[0] + d.ep))
        # edp x ep = dp, and an ep group and an edp group meet in exactly this rank
        assert set(group_of(r, "ep", d)) & set(group_of(r, "edp", d)) == {r}
        assert set(group_of(r, "ep", d)) | set(group_of(r, "edp", d)) <= set(group_of(r, "dp", d))


def test_nodes():
    d = ParallelDims(4, ep=2, ranks_per_node=2)
    assert node_ranks(d) == [[0, 1], [2, 3]]
    assert [coords(r, d).node for r in range(4)] == [0, 0, 1, 1]
    assert node_ranks(ParallelDims(4)) == [[0, 1, 2, 3]]


def test_bad_axis_and_rank():
    with pytest.raises(ValueError, match="axis='tp'"):
        rank_groups("tp", ParallelDims(2))
    with pytest.raises(ValueError, match="rank=2 outside world_size=2"):
        coords(2, ParallelDims(2))
