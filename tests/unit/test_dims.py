import pytest

from moeforge.parallel.config import ParallelConfig
from moeforge.parallel.dims import ParallelDims


def test_derived_degrees():
    d = ParallelDims(world_size=16, pp=2, ep=4, ranks_per_node=8)
    assert (d.dp, d.edp, d.n_nodes) == (8, 2, 2)
    assert ParallelDims(world_size=1).dp == 1


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(world_size=4, pp=3), "parallel.pp=3 must be >= 1 and divide world_size=4"),
    (dict(world_size=4, pp=0), "parallel.pp=0"),
    (dict(world_size=8, pp=2, ep=3), "parallel.ep=3 must be >= 1 and divide dp=4 (world_size=8 / parallel.pp=2)"),
    (dict(world_size=4, ep=0), "parallel.ep=0"),
    (dict(world_size=4, ranks_per_node=3), "parallel.ranks_per_node=3 must be >= 1 and divide world_size=4"),
    (dict(world_size=0), "world_size=0"),
])
def test_invalid_layouts_name_the_values(kwargs, fragment):
    with pytest.raises(ValueError) as e:
        ParallelDims(**kwargs)
    assert fragment in str(e.value)


def test_expert_checks():
    d = ParallelDims(world_size=8, ep=8)
    with pytest.raises(ValueError, match=r"parallel.ep=8 expert-parallel ranks exceed model.n_routed_experts=4"):
        d.validate(4)
    with pytest.raises(ValueError, match=r"model.n_routed_experts=12 is not divisible by parallel.ep=8"):
        d.validate(12)
    assert d.validate(16) is d


def test_from_config_defaults_ranks_per_node_to_local_world_size():
    d = ParallelDims.from_config(ParallelConfig(pp=2, ep=2), world_size=8, local_world_size=4, n_routed_experts=8)
    assert (d.pp, d.ep, d.ranks_per_node, d.n_nodes) == (2, 2, 4, 2)
    d = ParallelDims.from_config(ParallelConfig(ranks_per_node=2), world_size=4, local_world_size=4)
    assert d.ranks_per_node == 2
    with pytest.raises(ValueError, match="n_routed_experts=6 is not divisible by parallel.ep=4"):
        ParallelDims.from_config(ParallelConfig(ep=4), world_size=4, n_routed_experts=6)
