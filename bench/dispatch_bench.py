"""EP dispatch/combine benchmark: flat vs two-hop vs FP8 payload on 4 gloo ranks acting as 2 nodes x 2.

    .venv/bin/python bench/dispatch_bench.py [--tokens 2048 --dim 1024 --experts 32 --topk 8 --iters 5]

Every mode runs in the same job on the same tokens and routing (DeepSeek-V3's router: sigmoid scores,
groups = nodes, so with --limit 2 a token may use both nodes and picks several experts per node). One
iteration = dispatch -> local experts (identity, to time the communication) -> combine, forward only;
tokens/s counts the tokens of all ranks over the slowest rank's median iteration (modes interleaved
iteration by iteration). Bytes are summed over
the 4 ranks per iteration and split by link class (inter-node / intra-node) from comm's ByteCounters.
On one machine both link classes are loopback TCP, so tokens/s shows the software cost of each mode
(packing, extra hop, quantization); the byte columns are what a real cluster's InfiniBand would carry.
"""
from __future__ import annotations

import argparse
import datetime
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

WORLD, RPN = 4, 2
MODES = [("flat", False, False), ("two-hop", True, False), ("flat + fp8", False, True), ("two-hop + fp8", True, True)]


def _rank(rank: int, port: int, args, out_q):
    from torch import nn

    from moeforge.comm.all_to_all import AllToAllDispatcher
    from moeforge.comm.counters import ByteCounters
    from moeforge.model.args import ModelArgs
    from moeforge.model.moe import Gate

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))
    margs = ModelArgs(dim=args.dim, n_routed_experts=args.experts, n_activated_experts=args.topk,
                      n_expert_groups=WORLD // RPN, n_limited_groups=args.limit)
    gate = Gate(margs)
    nn.init.normal_(gate.weight, 0, 0.02, generator=torch.Generator().manual_seed(0))
    x = torch.randn(args.tokens, args.dim, generator=torch.Generator().manual_seed(rank)).to(torch.bfloat16)
    with torch.no_grad():
        w, ids, _ = gate(x)
    E = args.experts
    experts = nn.ModuleDict({str(e): nn.Identity() for e in range(rank * E // WORLD, (rank + 1) * E // WORLD)})
    setups = {name: (ByteCounters(), two_hop, fp8) for name, two_hop, fp8 in MODES}
    disps = {name: AllToAllDispatcher(None, rank, WORLD, E, RPN, two_hop=th, fp8=f8, counters=c)
             for name, (c, th, f8) in setups.items()}
    times = {name: [] for name in disps}
    ys = {}
    for it in range(args.warmup + args.iters):  # modes interleaved, so background load hits all alike
        for name, disp in disps.items():
            disp.counters.reset()
            dist.barrier()
            t0 = time.perf_counter()
            with torch.no_grad():
                ys[name] = disp(x, ids, w, experts)
            dt = torch.tensor([time.perf_counter() - t0])
            dist.all_reduce(dt, op=dist.ReduceOp.MAX)
            if it >= args.warmup:
                times[name].append(dt.item())
    rows, ref = {}, ys["flat"].float()
    for name, disp in disps.items():
        c = disp.counters  # holds the last iteration (every iteration moves the same bytes)
        b = torch.tensor([c.get(ev, link) for ev in ("dispatch_fwd", "combine_fwd") for link in ("inter", "intra")],
                         dtype=torch.float64)
        dist.all_reduce(b)
        err = torch.tensor([((ys[name].float() - ref).norm() / ref.norm()).item()])
        dist.all_reduce(err, op=dist.ReduceOp.MAX)
        rows[name] = dict(t=statistics.median(times[name]), bytes=b.tolist(), err=err.item())
    if rank == 0:
        out_q.put(rows)
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=2048, help="tokens per rank")
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--limit", type=int, default=2, help="node limit M (groups = nodes = 2)")
    p.add_argument("--iters", type=int, default=7)
    p.add_argument("--warmup", type=int, default=1)
    args = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, port, args, q)) for r in range(WORLD)]
    for pr in procs:
        pr.start()
    rows = q.get(timeout=1800)
    for pr in procs:
        pr.join()
    MB = 1e6
    print(f"# EP dispatch+combine (forward), {WORLD} gloo ranks as {WORLD // RPN} nodes x {RPN}: "
          f"{args.tokens} tokens/rank, dim {args.dim} bf16, {args.experts} experts, top-{args.topk}, "
          f"node limit M={args.limit}; bytes summed over ranks per iteration")
    print("| mode | tokens/s | dispatch inter MB | dispatch intra MB | combine inter MB | combine intra MB "
          "| dispatch inter vs flat | combine inter vs flat | rel. error vs flat |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    flat = rows["flat"]["bytes"]
    for name, _, _ in MODES:
        r = rows[name]
        di, da, ci, ca = r["bytes"]
        tps = WORLD * args.tokens / r["t"]
        print(f"| {name} | {tps:,.0f} | {di / MB:.2f} | {da / MB:.2f} | {ci / MB:.2f} | {ca / MB:.2f} "
              f"| {di / flat[0]:.2f} | {ci / flat[2]:.2f} | {r['err']:.1e} |")


if __name__ == "__main__":
    main()
