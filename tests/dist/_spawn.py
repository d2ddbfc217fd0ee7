"""Run a function on N gloo ranks in fresh processes: `run_ranks(fn, world_size, *args, timeout_s=...)`.

Each rank is a fresh process (forked from a fork server that has imported torch once) that joins one
gloo process group (rendezvous through a TCPStore the parent holds, so there is no free-port race and
no rank owns the store), calls `fn(rank, world_size, *args)` and sends back its return value. A rank
that raises makes `run_ranks` raise `RankError` naming the rank and carrying its traceback; a rank
that dies by a signal is named with its exit code; ranks still alive at the deadline are SIGKILLed and
`TimeoutError` is raised. Nothing outlives the call.

`fn` must be importable by the child (a module-level function in a test module or a package).
"""
from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import queue
import socket
import time
import traceback
from typing import Any, Callable, Collection


# The fork server imports these once; each rank is forked from it (a clean, thread-free process), which
# saves every rank the ~4 s torch import on a 2-core machine, and ~2 s more for torch._dynamo: building a
# model on the meta device imports it (nn.init on meta runs torch._refs, wrapped in torch._disable_dynamo).
# Third-party modules only: the fork server skips an ImportError but dies of any other error at import,
# which a project module being edited could raise; none of these reads a rank's `env` at import.
PRELOAD = ["torch", "torch.distributed", "torch.distributed.device_mesh", "torch.distributed.tensor",
           "torch._dynamo", "hydra", "omegaconf"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RankError(RuntimeError):
    """One or more ranks failed; `.failures` maps rank -> traceback text or exit description."""

    def __init__(self, failures: dict[int, str]):
        self.failures = failures
        body = "\n".join(f"--- rank {r} ---\n{msg}" for r, msg in sorted(failures.items()))
        super().__init__(f"ranks {sorted(failures)} failed:\n{body}")


def _child(fn, rank, world_size, args, port, pg_timeout_s, init_pg, results, env):
    os.environ.update(env)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)  # N ranks share 2 cores: intra-op threads only oversubscribe
        if init_pg:
            store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False,
                                  timeout=datetime.timedelta(seconds=pg_timeout_s))
            dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size,
                                    timeout=datetime.timedelta(seconds=pg_timeout_s))
        out = fn(rank, world_size, *args)
        results.put((rank, "ok", out))
        if init_pg and dist.is_initialized():
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - report everything, including SystemExit, to the parent
        results.put((rank, "error", traceback.format_exc()))
        raise SystemExit(1)


def run_ranks(fn: Callable[..., Any], world_size: int, *args, timeout_s: float = 60.0,
              pg_timeout_s: float = 30.0, init_pg: bool = True, env: dict[str, str] | None = None,
              wait_ranks: Collection[int] | None = None) -> list[Any]:
    """Run fn(rank, world_size, *args) on `world_size` gloo ranks; return the per-rank results in rank order.

    `timeout_s` bounds the whole call (spawn, rendezvous, fn): past it every live rank is SIGKILLed.
    `pg_timeout_s` is the process group's collective timeout. With `init_pg=False` fn forms its own
    group: MASTER_ADDR/MASTER_PORT (a free port)/RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE are set.
    `wait_ranks`: wait only for these ranks to report (failure tests: a rank meant to hang is then
    killed instead of running into the deadline).
    """
    wait = set(range(world_size) if wait_ranks is None else wait_ranks)
    import torch.distributed as dist

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    if init_pg:  # the parent holds the store server on a free port (0 picks one), so it outlives any rank
        server = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False,
                               timeout=datetime.timedelta(seconds=timeout_s))
        port = server.port
    else:  # fn forms its own group on MASTER_PORT
        server, port = None, free_port()
    results = ctx.Queue()
    procs = [ctx.Process(target=_child, name=f"rank{r}", daemon=True,
                         args=(fn, r, world_size, args, port, pg_timeout_s, init_pg, results, env or {}))
             for r in range(world_size)]
    for p in procs:
        p.start()
    outs: dict[int, Any] = {}
    failures: dict[int, str] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while not wait <= set(outs) | set(failures):
            try:
                rank, status, payload = results.get(timeout=0.2)
                (outs if status == "ok" else failures)[rank] = payload
                continue
            except queue.Empty:
                pass
            for r, p in enumerate(procs):  # a rank that died without reporting (signal, os._exit)
                if r not in outs and r not in failures and p.exitcode is not None:
                    try:  # its report may still be in flight
                        rank, status, payload = results.get(timeout=1.0)
                        (outs if status == "ok" else failures)[rank] = payload
                    except queue.Empty:
                        failures[r] = f"exited with code {p.exitcode} without reporting"
            if time.monotonic() > deadline:
                alive = [r for r, p in enumerate(procs) if p.is_alive()]
                raise TimeoutError(f"run_ranks({getattr(fn, '__name__', fn)}, {world_size}): ranks {alive} "
                                   f"still running after {timeout_s}s; killed")
    finally:
        for r, p in enumerate(procs):
            if p.is_alive() and r in wait:  # let it tear down its process group
                p.join(timeout=max(0.0, min(5.0, deadline - time.monotonic())))
            if p.is_alive():
                p.kill()
                p.join()
        results.close()
        del server
    if failures:
        raise RankError(failures)
    return [outs.get(r) for r in range(world_size)]
