"""Process groups for the (pp, edp, ep) layout. The only module that calls init_process_group.

    env = RuntimeEnv.from_env()
    backend = init_distributed(env, cfg.parallel.backend, cfg.parallel.timeout_s)
    meshes = build_meshes(ParallelDims.from_config(cfg.parallel, env.world_size, env.local_world_size,
                                                   cfg.model.n_routed_experts),
                          device_type="cuda" if backend == "nccl" else "cpu", timeout_s=cfg.parallel.timeout_s)

The DeviceMesh has mesh_dim_names ("pp", "edp", "ep") and a flattened "dp" = (edp, ep); its groups are
checked against the pure rank math in parallel/groups.py. Every group (the default one too) gets the
configured timeout, so a dead or hung peer turns into an error after at most that long, never a hang.
"""
from __future__ import annotations

import contextlib
import datetime
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from moeforge.parallel.env import RuntimeEnv

from .dims import ParallelDims
from .groups import Coords, coords, group_of


class PeerFailure(RuntimeError):
    """A collective failed because another rank died, hung, or became unreachable."""


def pick_backend(backend: str | None) -> str:
    if backend in (None, "auto"):
        return "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"parallel.backend={backend!r} not in auto|gloo|nccl")
    return backend


def init_distributed(env: RuntimeEnv, backend: str | None = None, timeout_s: float = 300.0) -> str:
    """Form the default process group for `env`; returns the backend. Idempotent.

    auto picks nccl when CUDA is available and gloo otherwise, and says so on rank 0. A single process
    gets a world-1 group on an in-memory store (no port), so meshes and groups work the same everywhere.
    """
    if dist.is_initialized():
        return dist.get_backend()
    chosen = pick_backend(backend)
    if env.rank == 0:
        why = "" if backend not in (None, "auto") else (" (auto: CUDA available)" if chosen == "nccl"
                                                        else " (auto: no CUDA)")
        print(f"moeforge: backend={chosen}{why} world_size={env.world_size} launcher={env.launcher} "
              f"timeout={timeout_s:g}s", file=sys.stderr, flush=True)
    timeout = datetime.timedelta(seconds=timeout_s)
    kwargs = {}
    if chosen == "nccl":
        torch.cuda.set_device(env.local_rank)
        kwargs["device_id"] = torch.device("cuda", env.local_rank)  # eager init: subgroups use ncclCommSplit
    if env.launcher == "single" and env.world_size == 1:
        dist.init_process_group(chosen, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout, **kwargs)
    elif env.launcher == "torchrun":
        dist.init_process_group(chosen, init_method="env://", timeout=timeout, **kwargs)
    else:
        dist.init_process_group(chosen, init_method=f"tcp://{env.master_addr}:{env.master_port}",
                                rank=env.rank, world_size=env.world_size, timeout=timeout, **kwargs)
    return chosen


@dataclass(frozen=True)
class Meshes:
    dims: ParallelDims
    mesh: DeviceMesh  # dims ("pp", "edp", "ep"), plus the flattened "dp"
    pp: dist.ProcessGroup
    dp: dist.ProcessGroup  # (edp, ep) flattened: dense grads and dense ZeRO-1 shards
    ep: dist.ProcessGroup  # expert all-to-all
    edp: dist.ProcessGroup  # expert grads and expert ZeRO-1 shards
    coords: Coords  # this rank's (pp, dp, edp, ep, node)
    timeout_s: float

    def ranks(self, axis: str) -> list[int]:
        return dist.get_process_group_ranks(getattr(self, axis))


def _backend_options(backend: str, timeout_s: float):
    """(backend, options) for DeviceMesh's backend_override: the only way it passes a timeout to new_group."""
    if backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts.is_high_priority_stream = False
    elif backend == "fakecuda":  # the dry run's process group (train/dryrun.py)
        from torch._C._distributed_c10d import FakeProcessGroup

        opts = FakeProcessGroup.Options()
    else:
        opts = dist.ProcessGroupGloo._Options()
    opts._timeout = datetime.timedelta(seconds=timeout_s)
    return backend, opts


def build_meshes(dims: ParallelDims, device_type: str = "cpu", timeout_s: float = 300.0) -> Meshes:
    """DeviceMesh (pp, edp, ep) + flattened dp over the default group; every group gets timeout_s."""
    if not dist.is_initialized():
        raise RuntimeError("build_meshes: call parallel.mesh.init_distributed first")
    if dist.get_world_size() != dims.world_size:
        raise ValueError(f"ParallelDims.world_size={dims.world_size} but the process group has "
                         f"{dist.get_world_size()} ranks")
    backend = dist.get_backend()
    override = {name: _backend_options(backend, timeout_s) for name in ("pp", "edp", "ep")}
    mesh = init_device_mesh(device_type, (dims.pp, dims.edp, dims.ep), mesh_dim_names=("pp", "edp", "ep"),
                            backend_override=override)
    mesh["edp", "ep"]._flatten("dp", backend_override=_backend_options(backend, timeout_s))
    rank = dist.get_rank()
    groups = {axis: mesh.get_group(axis) for axis in ("pp", "dp", "ep", "edp")}
    for axis, pg in groups.items():  # the DeviceMesh must agree with the documented rank math
        got, want = dist.get_process_group_ranks(pg), group_of(rank, axis, dims)
        if got != want:
            raise RuntimeError(f"rank {rank}: DeviceMesh {axis} group {got} != parallel.groups {want} ({dims})")
    return Meshes(dims=dims, mesh=mesh, coords=coords(rank, dims), timeout_s=timeout_s, **groups)


_PEER_SIGNS = ("connection closed", "connection reset", "connection refused", "broken pipe", "timed out",
               "timeout", "socket", "gloo", "nccl", "unreachable", "watchdog")


def _is_peer_error(e: BaseException) -> bool:
    """Backend errors (DistError, or gloo's plain RuntimeError about the transport); not shape/dtype bugs."""
    return isinstance(e, dist.DistError) or any(s in str(e).lower() for s in _PEER_SIGNS)


@contextlib.contextmanager
def peer_guard(what: str, group: dist.ProcessGroup | None = None, timeout_s: float | None = None):
    """Turn a backend error inside a collective into PeerFailure naming the operation, group and rank."""
    try:
        yield
    except RuntimeError as e:
        if isinstance(e, PeerFailure) or not _is_peer_error(e):
            raise
        ranks = dist.get_process_group_ranks(group) if group is not None else "world"
        limit = f" within the {timeout_s:g}s timeout" if timeout_s else ""
        raise PeerFailure(f"rank {dist.get_rank()}: {what} over ranks {ranks} failed{limit}: a peer rank died, "
                          f"hung or became unreachable ({type(e).__name__}: {str(e).strip()[:400]})") from e
