"""Does the EP all-to-all overlap compute on a GPU? One NCCL rank (world size 1), the real dispatcher on
a CudaCommStream (comm/streams.py), traced with torch.profiler; the answer comes from kernel intervals.

The pattern is DualPipe's F&B pair as the runtime drives it (dualpipe/stage.py interleave): micro-batch A's
dispatch is started, progress(), the other chunk's compute is queued (here a chain of bf16 matmuls), and
progress() again: A's count read happens behind that queued compute and A's payload all-to-all is issued
on the comm stream while the compute stream still works; then A's experts and combine, the same for B.
At world size 1 NCCL's all-to-all is a send/recv to self: still NCCL kernels on NCCL's stream, which is
what the overlap is about.

From the trace: every GPU kernel's [start, end) and name; NCCL kernels (name contains "nccl") against
all others. Reported: NCCL kernel time, how much of it intersects compute kernels, and the fraction.
    python bench/stream_overlap.py --json OUT.json [--trace OUT_trace.json]
Without a GPU it says so and exits 0 (bench/gpu_check.sh runs it only on one).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import time


def intervals_overlap(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """Total length of the union of `a` that lies inside the union of `b` (intervals [start, end))."""
    def union(xs):
        out: list[list[float]] = []
        for s, e in sorted(xs):
            if out and s <= out[-1][1]:
                out[-1][1] = max(out[-1][1], e)
            else:
                out.append([s, e])
        return out

    ua, ub, total, j = union(a), union(b), 0.0, 0
    for s, e in ua:
        while j < len(ub) and ub[j][1] <= s:
            j += 1
        k = j
        while k < len(ub) and ub[k][0] < e:
            total += min(e, ub[k][1]) - max(s, ub[k][0])
            k += 1
    return total


def kernels(trace_path: str) -> list[tuple[str, float, float]]:
    """(name, start us, end us) of every GPU kernel in a chrome trace written by torch.profiler."""
    with open(trace_path) as fh:
        events = json.load(fh)["traceEvents"]
    return [(e["name"], float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in events
            if e.get("cat") == "kernel" and "dur" in e]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", required=True)
    ap.add_argument("--trace", default=None, help="where to keep the chrome trace (default: beside --json)")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--matmuls", type=int, default=24, help="compute queued per progress point")
    a = ap.parse_args()

    import torch
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    if not torch.cuda.is_available():
        print("stream_overlap: no CUDA GPU, skipped")
        return
    from moeforge.model.args import ModelArgs
    from moeforge.model.moe import MoE
    from moeforge.parallel.apply_ep import apply_ep

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(s.getsockname()[1]))
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    args = ModelArgs(dim=a.dim, moe_inter_dim=1024, n_routed_experts=16, n_activated_experts=4, n_expert_groups=1,
                     n_limited_groups=1, n_shared_experts=1)
    moe = MoE(args, device="cuda", dtype=torch.bfloat16)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.02)
    apply_ep(moe, None, 0, 1, ranks_per_node=1, device="cuda")
    disp, stream = moe.dispatcher, moe.dispatcher.stream
    assert type(stream).__name__ == "CudaCommStream", stream
    w = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    xs = [torch.randn(1, a.tokens, a.dim, device="cuda", dtype=torch.bfloat16) for _ in range(2)]

    def other_chunk():  # the other micro-batch's piece of an F&B pair
        y = w
        for _ in range(a.matmuls):
            y = (y @ w) * 1e-3
        return y

    def pair():
        with torch.no_grad():
            (xA, wA, iA, _), (xB, wB, iB, _) = (moe.route_tokens(x) for x in xs)
            handles = [disp.dispatch_async(xA, iA, wA)]
            stream.progress()
            other_chunk()
            stream.progress()  # A: its count read waits behind the queued matmuls; its payload is issued
            handles.append(disp.dispatch_async(xB, iB, wB))
            other_chunk()
            stream.progress()
            for h in handles:
                x_RD, ctx = h.wait()
                combine = disp.combine_async(disp.compute(x_RD, ctx, moe.experts), ctx)
                other_chunk()
                stream.progress()
                combine.wait()

    for _ in range(2):  # warm-up: NCCL communicator, cuBLAS handles, allocator
        pair()
    torch.cuda.synchronize()
    trace = a.trace or os.path.splitext(a.json)[0] + "_trace.json"
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        pair()
        torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - t0) * 1e3
    prof.export_chrome_trace(trace)
    ks = kernels(trace)
    nccl = [(s, e) for n, s, e in ks if "nccl" in n.lower()]
    comp = [(s, e) for n, s, e in ks if "nccl" not in n.lower()]
    nccl_us = intervals_overlap(nccl, nccl)
    hidden_us = intervals_overlap(nccl, comp)
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "tokens": a.tokens, "dim": a.dim,
           "nccl_kernels": len(nccl), "compute_kernels": len(comp), "nccl_ms": nccl_us / 1e3,
           "nccl_overlapped_ms": hidden_us / 1e3, "overlap_fraction": hidden_us / nccl_us if nccl_us else None,
           "overlaps": (hidden_us > 0) if nccl else None,  # None: NCCL ran no kernel (e.g. a copy to self)
           "wall_ms": wall_ms, "trace": trace,
           "nccl_names": sorted({n for n, _, _ in ks if "nccl" in n.lower()})}
    print(json.dumps(res, indent=1))
    with open(a.json, "w") as fh:
        json.dump(res, fh, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
