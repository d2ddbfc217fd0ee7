"""`moeforge dryrun`: one rank of any layout on a fake GPU (train/dryrun.py), in a process of its own.

The fake CUDA library (train/fake_device.py) must be loaded BEFORE torch:

ATen decides once, when something first asks, whether CUDA exists, and the fake hooks must be registered
by then. So `moeforge dryrun` runs `python -m moeforge.launcher.dryrun`, which imports no torch until
the library is loaded; the library is compiled (or found in the cache) by a child process of its own.
"""
from __future__ import annotations

import argparse
import ctypes
import dataclasses
import importlib.util
import os
import subprocess
import sys


def preload() -> None:
    if "torch" in sys.modules:
        raise RuntimeError("the dry run must load its fake CUDA library before torch: run `moeforge dryrun`")
    out = subprocess.run([sys.executable, "-m", "moeforge.train.fake_device"], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"building the fake CUDA library failed (needs g++ and ninja):\n{out.stderr[-3000:]}")
    torch_lib = os.path.join(importlib.util.find_spec("torch").submodule_search_locations[0], "lib")
    for lib in ("libc10.so", "libtorch_cpu.so"):  # the library's own dependencies, shared with torch's
        ctypes.CDLL(os.path.join(torch_lib, lib), mode=ctypes.RTLD_GLOBAL)
    ctypes.CDLL(out.stdout.strip().splitlines()[-1], mode=ctypes.RTLD_GLOBAL)


def parse(argv: list[str]):
    p = argparse.ArgumentParser(prog="moeforge dryrun", description="one rank of a layout on a fake GPU: "
                                "peak memory by category and host syncs per step (train/dryrun.py)")
    add_arguments(p)
    return p.parse_intermixed_args(argv)  # overrides may come before and after the flags


def check(args):
    """What `moeforge dryrun` checks before anything runs: the config, the cluster, the world and the rank, the
    layout (train.build.check_layout). -> (cfg, cluster, world, procs per node); ValueError/ConfigError."""
    from moeforge.train.build import check_layout

    from .plan import load_job_and_cluster

    cfg, cluster, _ = load_job_and_cluster(args.overrides)
    world = args.world_size or cluster.world
    per_node = min(world, cluster.gpus_per_node)
    if not 0 <= args.rank < world:
        raise ValueError(f"--rank {args.rank} not in [0, {world})")
    check_layout(cfg, world, per_node)
    return cfg, cluster, world, per_node


def main(argv: list[str] | None = None) -> int:
    """`moeforge dryrun [--rank R] [--world-size W] [--steps N] [--plan] [--max-syncs N] overrides...`"""
    args = parse(sys.argv[1:] if argv is None else argv)
    preload()
    from moeforge.train.dryrun import dry_run

    from .config import ConfigError
    from .plan import evaluate

    try:
        cfg, cluster, world, per_node = check(args)
        report = dry_run(cfg, world, args.rank, per_node, args.steps, int(cluster.memory_gib * 2 ** 30))
    except (ConfigError, ValueError) as e:  # bad input: named before any process group forms
        print(f"moeforge dryrun: {e}", file=sys.stderr)
        return 2
    if args.plan:
        if world != cluster.world:
            cluster = dataclasses.replace(cluster, nodes=world // per_node, gpus_per_node=per_node)
        from moeforge.train.build import validate_schedule

        dp = world // cfg.parallel.pp
        mbs, _ = validate_schedule(cfg, cfg.parallel.pp, dp)  # the micro-batch the run derived, if null
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, micro_batch_size=mbs))
        plan = evaluate(cfg, cluster, chosen=cfg.schedule.name if cfg.parallel.pp > 1 else None)
        r = plan.best
        pp_rank = args.rank // (world // cfg.parallel.pp)  # pp is the slowest mesh dim (parallel/groups.py)
        mem = r.memory_by_rank[pp_rank]
        pick = lambda *prefixes: sum(v for k, v in mem.items() if k.startswith(prefixes))  # noqa: E731
        report.plan = {"parameters": pick("weights"), "gradients": pick("grads"),
                       "optimizer state": pick("master", "moments"), "activations": pick("activations"),
                       "total": sum(mem.values())}
        report.plan_rank = f"plan: pp rank {pp_rank}, schedule {r.name}"
    print(report.render())
    if args.max_syncs is not None and report.syncs.per_step() > args.max_syncs:
        print(f"moeforge dryrun: {report.syncs.per_step()} host syncs per step > --max-syncs {args.max_syncs}",
              file=sys.stderr)
        return 1
    return 0


def add_arguments(p) -> None:
    p.add_argument("overrides", nargs="*", help="job overrides (model=671b parallel.pp=16 ...) and cluster.gpu=h800 "
                                                "cluster.nodes=N (conf/cluster/): the world is nodes x gpus_per_node")
    p.add_argument("--rank", type=int, default=0, help="the global rank to run (default 0)")
    p.add_argument("--world-size", type=int, default=None, help="instead of cluster.nodes x gpus_per_node")
    p.add_argument("--steps", type=int, default=2, help="optimizer steps (default 2; the last is reported)")
    p.add_argument("--plan", action="store_true", help="print moeforge plan's memory for the layout beside")
    p.add_argument("--max-syncs", type=int, default=None, help="exit 1 when a step makes more host syncs")


if __name__ == "__main__":
    sys.exit(main())
