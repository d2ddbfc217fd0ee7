"""`moeforge launch`: torch's own elastic launcher (torch.distributed.run), not a re-implementation.

    opts = options_from_args(ns)                       # from add_launch_arguments' flags
    argv = build_torchrun_argv(opts, "moeforge.launcher.cli", ["train", *overrides])   # pure
    rc = launch(opts, "moeforge.launcher.cli", ["train", *overrides])   # NVML preflight, then torchrun

One node with no --rdzv-endpoint runs `--standalone`; otherwise c10d rendezvous at the endpoint
(every node runs the same command; the host of the endpoint adds `--rdzv-conf is_host=true` where
hostnames do not resolve to the address, see ENVIRONMENT.md). Under a multi-node Slurm allocation
with no endpoint given, nnodes / rdzv endpoint / rdzv id default to SLURM_NNODES, the first host of the
node list (port 29400) and SLURM_JOB_ID. torchrun runs as a child process, so signals it handles
(SIGTERM, SIGUSR1, ... where the installed torch has --signals-to-handle) reach the workers.

Run any module the same way: `python -m moeforge.launcher.torchrun [launch flags] MODULE [ARGS...]`.
"""
from __future__ import annotations

import argparse
import functools
import os
import subprocess
import sys
from dataclasses import dataclass, field, replace

SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
RDZV_PORT = 29400


@dataclass(frozen=True)
class LaunchOptions:
    nproc_per_node: str = "1"  # int, or torchrun's auto|cpu|gpu
    nnodes: str = "1"  # N or MIN:MAX
    node_rank: int | None = None  # only used by static rendezvous
    rdzv_endpoint: str | None = None  # HOST:PORT; None with nnodes 1: --standalone
    rdzv_id: str = "moeforge"
    rdzv_backend: str = "c10d"
    rdzv_conf: str | None = None  # e.g. "is_host=true"
    max_restarts: int = 0
    monitor_interval: float | None = None
    local_addr: str | None = None  # the address this node advertises
    log_dir: str | None = None
    preflight: bool = True  # NVML report before starting; problems abort
    extra: tuple[str, ...] = field(default_factory=tuple)  # passed verbatim to torchrun


def add_launch_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--nproc-per-node", default="1", help="workers per node: an int or auto|cpu|gpu (default 1)")
    p.add_argument("--nnodes", default=None, help="nodes, N or MIN:MAX (default 1, or SLURM_NNODES under Slurm)")
    p.add_argument("--node-rank", type=int, default=None, help="this node's rank (static rendezvous only)")
    p.add_argument("--rdzv-endpoint", default=None, help="HOST:PORT of the c10d rendezvous (multi-node)")
    p.add_argument("--rdzv-id", default=None, help="job id shared by every node (default moeforge / SLURM_JOB_ID)")
    p.add_argument("--rdzv-backend", default="c10d")
    p.add_argument("--rdzv-conf", default=None, help="extra rendezvous config, e.g. is_host=true")
    p.add_argument("--max-restarts", type=int, default=0, help="worker-group restarts before failing (default 0)")
    p.add_argument("--monitor-interval", type=float, default=None, help="seconds between worker health checks")
    p.add_argument("--local-addr", default=None, help="address this node advertises to the others")
    p.add_argument("--log-dir", default=None, help="torchrun's per-worker log directory")
    p.add_argument("--skip-preflight", action="store_true", help="start even if the GPU preflight finds problems")
    return p


def options_from_args(ns: argparse.Namespace, environ=None) -> LaunchOptions:
    opts = LaunchOptions(
        nproc_per_node=str(ns.nproc_per_node), nnodes=str(ns.nnodes or "1"), node_rank=ns.node_rank,
        rdzv_endpoint=ns.rdzv_endpoint, rdzv_id=ns.rdzv_id or "moeforge", rdzv_backend=ns.rdzv_backend,
        rdzv_conf=ns.rdzv_conf, max_restarts=ns.max_restarts, monitor_interval=ns.monitor_interval,
        local_addr=ns.local_addr, log_dir=ns.log_dir, preflight=not ns.skip_preflight)
    e = os.environ if environ is None else environ
    if ns.nnodes is None and ns.rdzv_endpoint is None and int(e.get("SLURM_NNODES", "1")) > 1:
        opts = slurm_defaults(opts, e, rdzv_id_given=ns.rdzv_id is not None)
    return opts


def slurm_defaults(opts: LaunchOptions, environ, rdzv_id_given: bool = False) -> LaunchOptions:
    """One `moeforge launch` per node under srun: nodes, rendezvous host and id from the allocation."""
    from moeforge.parallel.env import slurm_master_addr

    return replace(opts, nnodes=environ["SLURM_NNODES"], node_rank=int(environ.get("SLURM_NODEID", 0)),
                   rdzv_endpoint=f"{slurm_master_addr(environ)}:{RDZV_PORT}",
                   rdzv_id=opts.rdzv_id if rdzv_id_given else environ.get("SLURM_JOB_ID", opts.rdzv_id))


@functools.lru_cache(maxsize=None)
def torchrun_flags() -> frozenset[str]:
    """The option strings the installed torch.distributed.run accepts."""
    from torch.distributed.run import get_args_parser

    return frozenset(s for a in get_args_parser()._actions for s in a.option_strings)


def build_torchrun_argv(opts: LaunchOptions, entry_module: str, entry_args: list[str]) -> list[str]:
    """torchrun's argv (without the program name) that runs `python -m entry_module *entry_args`."""
    single = opts.nnodes == "1" and opts.rdzv_endpoint is None
    if not single and opts.rdzv_endpoint is None:
        raise ValueError(f"launch: --nnodes {opts.nnodes} needs --rdzv-endpoint HOST:PORT (one node hosts it)")
    argv = ["--nproc-per-node", str(opts.nproc_per_node)]
    if single:
        argv += ["--standalone", "--nnodes", "1"]
    else:
        argv += ["--nnodes", opts.nnodes, "--rdzv-backend", opts.rdzv_backend,
                 "--rdzv-endpoint", opts.rdzv_endpoint, "--rdzv-id", opts.rdzv_id]
        if opts.rdzv_conf:
            argv += ["--rdzv-conf", opts.rdzv_conf]
    if opts.node_rank is not None:
        argv += ["--node-rank", str(opts.node_rank)]
    argv += ["--max-restarts", str(opts.max_restarts)]
    if opts.monitor_interval is not None:
        argv += ["--monitor-interval", str(opts.monitor_interval)]
    if opts.local_addr:
        argv += ["--local-addr", opts.local_addr]
    if opts.log_dir:
        argv += ["--log-dir", opts.log_dir]
    if "--signals-to-handle" in torchrun_flags():
        argv += ["--signals-to-handle", SIGNALS]
    argv += list(opts.extra)
    return argv + ["-m", entry_module, *entry_args]


def _nproc_int(nproc: str) -> int | None:
    return int(nproc) if str(nproc).isdigit() else None


def launch(opts: LaunchOptions, entry_module: str, entry_args: list[str]) -> int:
    """Preflight, then `python -m torch.distributed.run ...` as a child; returns its exit code."""
    argv = build_torchrun_argv(opts, entry_module, entry_args)
    if opts.preflight:
        from .doctor import gpu_report

        report = gpu_report(nproc_per_node=_nproc_int(opts.nproc_per_node))
        print(report.format(), file=sys.stderr, flush=True)
        if report.problems:
            print("moeforge launch: preflight found problems (above); not starting. --skip-preflight overrides.",
                  file=sys.stderr, flush=True)
            return 1
    cmd = [sys.executable, "-m", "torch.distributed.run", *argv]
    print("moeforge launch: " + " ".join(cmd), file=sys.stderr, flush=True)
    # torch >= 2.5 lends the rendezvous TCPStore to the workers and keeps it across --max-restarts, so a
    # restarted worker group can read the dead attempt's gloo/NCCL addresses and hang or fail to connect
    # (pytorch/pytorch#135712; seen with torch 2.13 + gloo): a fresh store per attempt avoids it.
    env = {**os.environ, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": os.environ.get("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")}
    proc = subprocess.Popen(cmd, env=env)
    try:
        return proc.wait()
    except KeyboardInterrupt:  # torchrun got the SIGINT too (same process group) and stops the workers
        return proc.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m moeforge.launcher.torchrun", description="launch MODULE under torchrun")
    add_launch_arguments(p)
    p.add_argument("module")
    p.add_argument("args", nargs=argparse.REMAINDER)
    ns = p.parse_args(argv)
    return launch(options_from_args(ns), ns.module, ns.args)


if __name__ == "__main__":
    sys.exit(main())
