"""A smoke test of the process groups under a real launcher:

    python -m torch.distributed.run --nproc-per-node 4 -m moeforge.parallel.selfcheck --pp 2 --ep 2
    python -m moeforge.launcher.torchrun --nproc-per-node 2 moeforge.parallel.selfcheck --pp 1 --ep 2

Each rank forms the default group (parallel.mesh.init_distributed), builds the meshes, all-reduces
its rank over every group and checks the sum against the pure rank math, then prints one line:
"selfcheck ok rank=R/W host=... node=N pp=.. dp=.. edp=.. ep=.. groups pp=[..] dp=[..] ep=[..] edp=[..]".
`--die-rank R` makes rank R SIGKILL itself after `--die-after` all-reduces (failure tests only).
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m moeforge.parallel.selfcheck")
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--ranks-per-node", type=int, default=None)
    p.add_argument("--experts", type=int, default=None, help="validate ep against this many routed experts")
    p.add_argument("--timeout", type=float, default=60.0, help="process-group timeout in seconds")
    p.add_argument("--backend", default="auto")
    p.add_argument("--rounds", type=int, default=1, help="all-reduce rounds per group")
    p.add_argument("--die-rank", type=int, default=None)
    p.add_argument("--die-after", type=int, default=0)
    a = p.parse_args(argv)

    import torch
    import torch.distributed as dist

    from moeforge.parallel.env import RuntimeEnv

    from .dims import ParallelDims
    from .groups import group_of
    from .mesh import build_meshes, init_distributed, peer_guard

    env = RuntimeEnv.from_env()
    # fail before any process group forms
    dims = ParallelDims(env.world_size, a.pp, a.ep, a.ranks_per_node or env.local_world_size)
    if a.experts is not None:
        dims.validate(a.experts)
    backend = init_distributed(env, a.backend, a.timeout)
    device = torch.device("cuda", env.local_rank) if backend == "nccl" else torch.device("cpu")
    meshes = build_meshes(dims, device.type, a.timeout)
    done = 0
    for _ in range(a.rounds):
        for axis in ("pp", "dp", "ep", "edp"):
            if a.die_rank == env.rank and done >= a.die_after:
                print(f"selfcheck rank={env.rank}: SIGKILL myself (--die-rank)", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            t = torch.tensor([float(env.rank)], device=device)
            with peer_guard(f"selfcheck all_reduce over {axis}", getattr(meshes, axis), a.timeout):
                dist.all_reduce(t, group=getattr(meshes, axis))
            want = float(sum(group_of(env.rank, axis, dims)))
            if t.item() != want:
                raise RuntimeError(f"rank {env.rank}: all_reduce over {axis} gave {t.item()}, expected {want}")
            done += 1
    c = meshes.coords
    groups = " ".join(f"{axis}={meshes.ranks(axis)}" for axis in ("pp", "dp", "ep", "edp"))
    print(f"selfcheck ok rank={env.rank}/{env.world_size} host={socket.gethostname()} node={c.node} "
          f"pp={c.pp} dp={c.dp} edp={c.edp} ep={c.ep} launcher={env.launcher} backend={backend} groups {groups}",
          flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
