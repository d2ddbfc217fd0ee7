"""Layout oracle: our pp/dp/ep/edp groups (DeviceMesh via parallel.mesh.build_meshes, and the pure
math in parallel.groups) equal megatron-core's parallel_state.initialize_model_parallel groups
(order "tp-cp-ep-dp-pp", on gloo) for every layout of 4 ranks. One spawn of 4 ranks checks them all."""
import sys
import types

import pytest
from _spawn import run_ranks

WORLD = 4
LAYOUTS = [(pp, ep) for pp in (1, 2, 4) for ep in (1, 2, 4) if (WORLD // pp) % ep == 0]


def import_parallel_state():
    """megatron.core.parallel_state without running megatron/core/__init__.py, which imports the
    whole model zoo and torch inductor (~10 s per process on 2 cores); parallel_state itself is the
    unmodified module."""
    import megatron

    if "megatron.core" not in sys.modules:
        core = types.ModuleType("megatron.core")
        core.__path__ = [megatron.__path__[0] + "/core"]
        sys.modules["megatron.core"] = core
    from megatron.core import parallel_state

    return parallel_state


def _oracle(rank, world):
    import torch
    import torch.distributed as dist

    from moeforge.parallel.dims import ParallelDims
    from moeforge.parallel.groups import group_of
    from moeforge.parallel.mesh import build_meshes

    ps = import_parallel_state()
    out = {}
    for pp, ep in LAYOUTS:
        dims = ParallelDims(world, pp=pp, ep=ep)
        meshes = build_meshes(dims, "cpu", timeout_s=17.0)
        ps.initialize_model_parallel(pipeline_model_parallel_size=pp, expert_model_parallel_size=ep,
                                     order="tp-cp-ep-dp-pp", create_gloo_process_groups=False)
        ranks = dist.get_process_group_ranks
        megatron = {"pp": ranks(ps.get_pipeline_model_parallel_group()), "dp": ranks(ps.get_data_parallel_group()),
                    "ep": ranks(ps.get_expert_model_parallel_group()),
                    "edp": ranks(ps.get_expert_data_parallel_group())}
        ps.destroy_model_parallel()
        ours = {axis: meshes.ranks(axis) for axis in ("pp", "dp", "ep", "edp")}
        pure = {axis: group_of(rank, axis, dims) for axis in ("pp", "dp", "ep", "edp")}
        timeouts = {axis: getattr(meshes, axis)._get_backend(torch.device("cpu")).options._timeout.total_seconds()
                    for axis in ("pp", "dp", "ep", "edp")}
        out[(pp, ep)] = dict(megatron=megatron, ours=ours, pure=pure, timeouts=timeouts,
                             coords=tuple(meshes.coords))
    return out


@pytest.mark.timeout(120)
def test_groups_match_megatron_core_for_every_4_rank_layout():
    results = run_ranks(_oracle, WORLD, timeout_s=100)
    assert len(LAYOUTS) == 6  # (1,1) (1,2) (1,4) (2,1) (2,2) (4,1)
    for rank, res in enumerate(results):
        assert sorted(res) == sorted(LAYOUTS)
        for layout, r in res.items():
            assert r["ours"] == r["megatron"] == r["pure"], (rank, layout, r)
            assert set(r["timeouts"].values()) == {17.0}, (rank, layout, r["timeouts"])
    # a non-trivial layout spelled out, so the oracle cannot agree with us on nonsense
    r = results[3][(2, 2)]
    assert r["ours"] == {"pp": [1, 3], "dp": [2, 3], "ep": [2, 3], "edp": [3]}
    assert results[2][(1, 2)]["ours"]["edp"] == [0, 2] and results[2][(1, 2)]["coords"][:4] == (0, 2, 1, 0)


def _init_single(rank, world):
    import contextlib
    import io

    import torch.distributed as dist

    from moeforge.parallel.env import RuntimeEnv
    from moeforge.parallel.dims import ParallelDims
    from moeforge.parallel.mesh import build_meshes, init_distributed

    with contextlib.redirect_stderr(io.StringIO()) as err:
        backend = init_distributed(RuntimeEnv(), None, timeout_s=9.0)
    meshes = build_meshes(ParallelDims(1), "cpu", timeout_s=9.0)
    return backend, dist.get_world_size(), meshes.ranks("dp"), err.getvalue().strip()


def _init_tcp(rank, world):
    import os

    import torch
    import torch.distributed as dist

    from moeforge.parallel.env import RuntimeEnv
    from moeforge.parallel.mesh import init_distributed

    env = RuntimeEnv(rank=rank, local_rank=rank, world_size=world, local_world_size=world, launcher="slurm",
                     master_addr="127.0.0.1", master_port=int(os.environ["MASTER_PORT"]))
    init_distributed(env, "auto", timeout_s=8.0)
    t = torch.ones(1)
    dist.all_reduce(t)
    return dist.get_backend(), t.item()


@pytest.mark.timeout(60)
def test_init_distributed_single_process_and_explicit_rendezvous():
    [(backend, world, dp, printed)] = run_ranks(_init_single, 1, init_pg=False, timeout_s=50)
    assert (backend, world, dp) == ("gloo", 1, [0])
    assert printed == "moeforge: backend=gloo (auto: no CUDA) world_size=1 launcher=single timeout=9s"
    assert run_ranks(_init_tcp, 2, init_pg=False, timeout_s=50) == [("gloo", 2.0)] * 2
