"""DualPipe overlap benchmark: step time and exposed communication, ours vs torch.distributed.pipelining.

    .venv/bin/python bench/overlap_bench.py                  # 4 ranks, one network namespace each, ep links 120 Mbit/s
    .venv/bin/python bench/overlap_bench.py --rate 60        # another bandwidth (Mbit/s each way)
    .venv/bin/python bench/overlap_bench.py --no-netns       # loopback, no limit (the all-to-all is nearly free)
    .venv/bin/python bench/overlap_bench.py --smoke --no-netns   # tiny, 1 step: tests/dist/test_overlap_bench.py
    .venv/bin/python bench/overlap_bench.py --rate 38 --n-micro 64 --micro-batch 1 --cpu-per-rank 0.5 --comm-nice -10
                                                             # each rank a fixed-speed device (below)

Each rank a device (--cpu-per-rank, --comm-nice; root). By default the 4 ranks share the 2 cores, so a
rank blocked in an all-to-all hands its core to another rank: every schedule then overlaps one rank's
communication with another rank's compute, which no GPU cluster does (a GPU waiting for its all-to-all
idles). --cpu-per-rank 0.5 puts every rank in its own cgroup with a CPU quota of half a core (2 ms
period), so each rank computes at a fixed speed and its waits are its own, as on a GPU. --comm-nice -10
runs every thread but the main one (the ep stream thread, gloo's threads) at a higher priority, so an
exchange progresses as soon as its data can move, as the NIC and the SMs DeepSeek reserves for
communication do, instead of queueing behind the same rank's compute for the scheduler's time slice.
Both apply to every variant alike.

Layout: 4 gloo ranks, pp 2 x ep 2. Global rank = 2·pp_rank + ep_rank: two pipelines side by side, on
ranks [0, 2] and [1, 3], each with its own micro-batches; ep groups [0, 1] and [2, 3] (the two ranks that
hold the same stages send tokens to each other's experts). Every rank runs in its own network namespace
with its own NIC (a veth into a bridge), as every GPU has its own InfiniBand NIC in DeepSeek-V3's
cluster; on each NIC an htb class limits the traffic to the rank's ep peer to --rate Mbit/s (both NICs
of a pair are shaped, so both directions are limited), and leaves everything else (pipeline p2p, the
timing barrier) at veth speed. So the all-to-all is the one slow, known-bandwidth traffic, as with EP
across nodes in the TR (§3.2.1: the cross-node all-to-all is what DualPipe's F&B overlap must hide),
and the two ep pairs do not share a link. The ranks are forked from one process that imported torch
and enter their namespace with setns(2) before they connect. `tc netem` is not available on this
kernel; htb is (and tbf).

Model (--dim etc.): every block MoE (n_dense_layers = 0), 7 blocks + 1 MTP module, split so that every
DualPipeV stage holds 2 MoE layers and every 1F1B stage 4 (COSTS below): the two chunks of an F&B pair
have the same number of all-to-alls to hide behind each other. Routed experts top-4 of 8 with a wide
hidden size make the expert pieces big enough to hide an all-to-all (top-k barely changes the bytes at
ep = 2: a token crosses to the other rank once however many of its experts live there).

Variants, all on the same model (init seed 5, so the same routing), the same micro-batches and the same
process groups, interleaved step by step (the order rotates), so that background load hits all alike:
  ours dualpipev, overlap    PipelineRuntime("dualpipev"): each F&B pair runs its forward and backward
                             piece by piece around the all-to-all handles (dualpipe/stage.py)
  ours dualpipev, no overlap the same runtime, overlap=False: every all-to-all is waited for at once
  ours 1f1b                  PipelineRuntime("1f1b")
  torch dualpipev            torch.distributed.pipelining.ScheduleDualPipeV (its F&B pair runs F, then B)
  torch 1f1b                 torch.distributed.pipelining.Schedule1F1B
Every MoE layer uses comm.AllToAllDispatcher on the ep group, in every variant.

Measured per step and rank; the bench wraps functions from outside and edits no library code:
  step      wall time from a world barrier to the end of the step, max over ranks; median over steps.
  a2a exp.  time the main thread is blocked waiting for an exchange (comm.streams.ThreadCommStream.wait:
            the row-count exchange, packing, the all-to-alls and unpacking all run on the ep group's
            stream thread); mean over ranks.
  stream    time the stream thread spent running the exchanges waited in the step (_Job.seconds), the
            all-to-all time whether hidden or not; mean over ranks.
  p2p       time blocked on pipeline send/recv (PipelineRuntime._wait; torch's
            pipelining.schedules._wait_batch_p2p); mostly waiting for the neighbour stage, not for bytes.
  CPU       process CPU seconds (all threads) of the step, summed over the 4 ranks.
  hidden    1 - a2a exp. / a2a exp. of "ours dualpipev, no overlap": with overlap off every all-to-all
            is waited for right after it starts, so that is the all-to-all time of this work.
  per kind  for ours (overlap on / off), per exchange kind (forward dispatch and combine, their reverse
            exchanges in backward): exposed wait, run time on the stream, time queued behind earlier
            exchanges, and slack (from its start to the main thread's wait).
Bytes over the link per step and rank come from comm's ByteCounters; bytes / rate is the least link time.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

WORLD, PP, EP = 4, 2, 2
VARIANTS = (  # (label, schedule, implementation, overlap)
    ("ours dualpipev, overlap", "dualpipev", "ours", True),
    ("ours dualpipev, no overlap", "dualpipev", "ours", False),
    ("ours 1f1b", "1f1b", "ours", False),
    ("torch dualpipev", "dualpipev", "torch", False),
    ("torch 1f1b", "1f1b", "torch", False),
)


@dataclass(frozen=True)
class Config:
    dim: int = 256
    n_layers: int = 7
    n_heads: int = 4
    moe_inter_dim: int = 512
    n_experts: int = 8
    topk: int = 4
    seq: int = 64
    micro_batch: int = 2
    n_micro: int = 16  # DualPipeV pp 2: 84% / 88% of rank 0 / 1's chunks run in F&B pairs
    steps: int = 3
    warmup: int = 1
    rate_mbit: float = 120.0  # ep link, each way; 0: no limit
    threads: int = 1  # torch intra-op threads per rank
    switch_interval_ms: float = 0.0  # sys.setswitchinterval in every rank (0: Python's default, 5 ms)
    cpu_per_rank: float = 0.0  # cap every rank at this many cores (a cgroup cpu quota each); 0: no cap
    cpu_period_us: int = 2000  # the cgroup quota's period (the quota is cpu_per_rank x this; >= 1 ms)
    fb_weight_split: int = 0  # 1: ours with overlap runs each pair's backward as B then W piece by piece
    comm_nice: int = 0  # nice value for every thread but the main one (ep stream, gloo's); 0: unchanged
    timeout_s: float = 300.0

    def model_args(self):
        from moeforge.model.args import load_preset

        # every block MoE (n_dense_layers=0) so that every layer has all-to-alls to hide; one MTP module
        return load_preset("tiny", dim=self.dim, n_layers=self.n_layers, n_dense_layers=0, n_heads=self.n_heads,
                           moe_inter_dim=self.moe_inter_dim, inter_dim=4 * self.dim, n_routed_experts=self.n_experts,
                           n_activated_experts=self.topk, max_seq_len=max(256, self.seq))


# imported once by the fork server the ranks are forked from (torch alone takes ~6 s on 2 loaded cores,
# torch.distributed.pipelining as much again)
PRELOAD = ["torch", "torch.distributed", "torch.distributed.pipelining", "moeforge.comm.all_to_all", "moeforge.dualpipe.runtime",
           "moeforge.model.split", "moeforge.parallel.apply_ep"]
# Stage costs for model.split: with a 257-token vocabulary the embedding and the head cost next to
# nothing, the MTP module as much as a block. With 7 blocks + MTP every DualPipeV stage (4) holds 2 MoE
# layers and every 1F1B stage (2) holds 4, so the two chunks of every F&B pair have the same number of
# all-to-alls to hide behind each other (with the default unit costs stage 3 would hold only the MTP block).
COSTS = dict(embed_cost=0.0, head_cost=0.0, mtp_cost=1.0)
SMOKE = dict(dim=64, n_layers=3, moe_inter_dim=32, seq=16, n_micro=4, steps=1, warmup=0, timeout_s=120.0)


# ---- instrumentation: time the main thread spends blocked on communication ---------------------------
class Blocked:
    """Seconds per kind since reset(): a2a (main thread waiting for exchanges), stream (the stream thread
    running them), p2p (main thread waiting for pipeline send/recv); and per exchange kind (dispatch /
    combine, forward / backward: the program's name) [exposed wait, run on the stream, queued behind
    earlier exchanges, slack = start to wait, count]."""

    KINDS = ("_dispatch_fwd", "_combine_fwd", "_combine_bwd", "_dispatch_bwd")

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.s = {"a2a": 0.0, "stream": 0.0, "p2p": 0.0}
        self.by_kind = {k: [0.0] * 5 for k in self.KINDS}

    def timed(self, kind: str, fn, *args, **kw):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kw)
        finally:
            self.s[kind] += time.perf_counter() - t0


def instrument(blocked: Blocked) -> None:
    """Wrap the ep stream's submit and wait (main thread; the wait also adds each waited job's run time on
    the stream thread), the stream's job run (its start time), our runtime's p2p wait and torch
    pipelining's p2p wait."""
    import torch.distributed.pipelining.schedules as tsched

    from moeforge.comm.streams import ThreadCommStream, _Job
    from moeforge.dualpipe.runtime import PipelineRuntime

    stream_submit, stream_wait, job_run = ThreadCommStream.submit, ThreadCommStream.wait, _Job.run
    our_wait, their_wait = PipelineRuntime._wait, tsched._wait_batch_p2p

    def submit(self, program, inputs=()):
        kind, t = getattr(program, "__name__", "?"), time.perf_counter()
        job = stream_submit(self, program, inputs)
        job.bench = [kind, t, t]  # kind, submitted, started on the stream
        return job

    def run(self, failed):
        if hasattr(self, "bench"):
            self.bench[2] = time.perf_counter()
        return job_run(self, failed)

    def wait(self, job):  # the job's run time is final once it is done, which the wait guarantees
        t0 = time.perf_counter()
        out = blocked.timed("a2a", stream_wait, self, job)
        blocked.s["stream"] += job.seconds
        kind, t_submit, t_start = getattr(job, "bench", ("?", t0, t0))
        row = blocked.by_kind.get(kind)
        if row is not None:
            for i, x in enumerate((time.perf_counter() - t0, job.seconds, t_start - t_submit, t0 - t_submit, 1)):
                row[i] += x
        return out

    ThreadCommStream.submit, ThreadCommStream.wait, _Job.run = submit, wait, run
    PipelineRuntime._wait = lambda self, works, what: blocked.timed("p2p", our_wait, self, works, what)
    tsched._wait_batch_p2p = lambda work: blocked.timed("p2p", their_wait, work)


# ---- the variants ----------------------------------------------------------------------------------------
def _build(args, schedule: str, pp_rank: int, ep_group, ep_rank: int):
    """meta -> apply_ep -> split -> materialise -> init (the order of docs/pipeline.md)."""
    import torch

    from moeforge.comm.counters import ByteCounters
    from moeforge.dualpipe.schedule import num_stages, stage_placement
    from moeforge.model.split import build_stages
    from moeforge.model.transformer import Transformer
    from moeforge.parallel.apply_ep import apply_ep

    with torch.device("meta"):
        model = Transformer(args)
    counters = ByteCounters()
    apply_ep(model, ep_group, ep_rank, EP, ranks_per_node=1, counters=counters)  # each ep rank its own node
    stages = build_stages(model, stage_placement(schedule, PP)[pp_rank], num_stages(schedule, PP), **COSTS)
    model.to_empty(device="cpu")
    model.init_weights(5)
    return model, stages, counters


def _ours(cfg: Config, args, schedule, pp_rank, pp_group, ep_group, ep_rank):
    from moeforge.dualpipe.runtime import PipelineRuntime
    from moeforge.dualpipe.schedule import num_stages
    from moeforge.model.stages import stage_layers

    model, stages, counters = _build(args, schedule, pp_rank, ep_group, ep_rank)
    rt = PipelineRuntime.for_schedule(schedule, stages, pp_group, cfg.n_micro, timeout_s=cfg.timeout_s,
                                      plan=stage_layers(args, num_stages(schedule, PP), **COSTS))

    def step(rows, overlap: bool):
        rt.overlap = overlap
        rt.fb_weight_split = bool(cfg.fb_weight_split)
        rt.step(rows)

    return model, step, counters


def _torch(cfg: Config, args, schedule, pp_rank, pp_group, ep_group, ep_rank):
    """torch.distributed.pipelining on the same stages, set up as tests/dist/test_pipeline.py does."""
    import torch
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleDualPipeV

    from moeforge.dualpipe.schedule import num_stages, stage_placement

    class _TorchStage(torch.nn.Module):
        """A StageModule as torch.distributed.pipelining wants it: one tensor in, one out (the first stage takes
        the token rows; the last stage's loss runs in loss_fn with the rows as target). As in
        tests/dist/test_pipeline.py."""

        def __init__(self, stage):
            super().__init__()
            self.stage = stage

        def forward(self, x):  # the first stage gets the token rows as x
            return self.stage.hidden(None, x) if self.stage.is_first else self.stage.hidden(x)

    model, stages, counters = _build(args, schedule, pp_rank, ep_group, ep_rank)
    S = num_stages(schedule, PP)
    last = stages.get(S - 1)
    rows0 = torch.zeros(cfg.micro_batch, cfg.seq + 1 + args.n_mtp_modules, dtype=torch.long)
    act = torch.empty(cfg.micro_batch, cfg.seq, args.dim, requires_grad=True)  # static shapes: no inference
    pstages = [PipelineStage(_TorchStage(stages[s]), s, S, torch.device("cpu"), group=pp_group,
                             input_args=(rows0 if s == 0 else act,), output_args=(act,))
               for s in stage_placement(schedule, PP)[pp_rank]]

    def loss_fn(h, r):
        return last.loss(h, r)

    sched = (Schedule1F1B(pstages[0], cfg.n_micro, loss_fn=loss_fn, scale_grads=False) if schedule == "1f1b"
             else ScheduleDualPipeV(pstages, cfg.n_micro, loss_fn=loss_fn, scale_grads=False))

    def step(rows, overlap: bool):
        batch = torch.cat(rows)
        kw = {"target": batch, "losses": []} if last is not None else {}
        sched.step(*([batch] if 0 in stages else []), **kw)

    return model, step, counters


# ---- one rank --------------------------------------------------------------------------------------------
def _micro(cfg: Config, args, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, args.vocab_size, (cfg.micro_batch, cfg.seq + 1 + args.n_mtp_modules), generator=g)
            for _ in range(cfg.n_micro)]


def rank_main(rank: int, master: str, port: int, cfg: Config, out_path: str, variants: list[str]) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(cfg.threads)
    if cfg.switch_interval_ms > 0:  # how soon a thread that wants the GIL (the ep stream) gets it
        sys.setswitchinterval(cfg.switch_interval_ms / 1000)
    timeout = datetime.timedelta(seconds=cfg.timeout_s)
    store = dist.TCPStore(master, port, WORLD, is_master=rank == 0, timeout=timeout)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD, timeout=timeout)
    pp_rank, ep_rank = divmod(rank, EP)
    pp_groups = [dist.new_group([e, EP + e]) for e in range(EP)]
    ep_groups = [dist.new_group([EP * p + e for e in range(EP)]) for p in range(PP)]
    pp_group, ep_group = pp_groups[ep_rank], ep_groups[pp_rank]
    args = cfg.model_args()
    rows = _micro(cfg, args, 100 + ep_rank)  # each pipeline its own micro-batches, the same for every variant

    blocked = Blocked()
    instrument(blocked)
    builders = {}
    for label, schedule, impl, overlap in VARIANTS:
        if label not in variants:
            continue
        key = (schedule, impl)
        if key not in builders:  # overlap on/off share one model and runtime
            builders[key] = (_ours if impl == "ours" else _torch)(cfg, args, schedule, pp_rank, pp_group,
                                                                  ep_group, ep_rank)
    runs = [(label, builders[(schedule, impl)], overlap) for label, schedule, impl, overlap in VARIANTS
            if label in variants]
    if cfg.comm_nice:  # every thread is there by now: gloo's (one set per group) and the ep stream's
        import threading

        main_tid = threading.get_native_id()
        for tid in map(int, os.listdir("/proc/self/task")):
            if tid != main_tid:
                os.setpriority(os.PRIO_PROCESS, tid, cfg.comm_nice)  # Linux: a tid sets that thread only
    samples = {label: [] for label, _, _ in runs}  # per step: wall (max), a2a, stream, p2p (means), CPU (sum)
    by_kind = {label: [] for label, _, _ in runs}  # per step: Blocked.by_kind rows, mean over ranks
    link_bytes = {}
    for it in range(cfg.warmup + cfg.steps):
        k = it % len(runs)
        for label, (model, step, counters), overlap in runs[k:] + runs[:k]:
            for p in model.parameters():
                p.grad = None
            counters.reset()
            dist.barrier()
            blocked.reset()
            t0, c0 = time.perf_counter(), time.process_time()
            step(rows, overlap)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            s = blocked.s
            v = torch.tensor([wall, s["a2a"], s["stream"], s["p2p"], float(counters.get(link="inter")), cpu],
                             dtype=torch.float64)
            allv = [torch.zeros_like(v) for _ in range(WORLD)]
            dist.all_gather(allv, v)
            allv = torch.stack(allv)
            kinds = torch.tensor([blocked.by_kind[k] for k in Blocked.KINDS], dtype=torch.float64)
            dist.all_reduce(kinds)  # summed over ranks; the report divides by WORLD
            if it >= cfg.warmup:
                samples[label].append([allv[:, 0].max().item(), *allv[:, 1:4].mean(0).tolist(),
                                       allv[:, 5].sum().item()])
                by_kind[label].append((kinds / WORLD).tolist())
            link_bytes[label] = allv[:, 4].mean().item()
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump({"samples": samples, "by_kind": by_kind, "link_bytes": link_bytes, "config": asdict(cfg),
                       "model": {k: v for k, v in vars(args).items()}}, f)
    dist.barrier()
    dist.destroy_process_group()


# ---- launchers -------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _enter_netns(ns: str) -> None:
    """Move this (freshly forked, not yet communicating) process into network namespace `ns`."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/var/run/netns/{ns}", os.O_RDONLY)
    try:
        if libc.setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
            raise OSError(ctypes.get_errno(), f"setns into network namespace {ns} failed")
    finally:
        os.close(fd)


def _rank_entry(rank: int, master: str, port: int, cfg: Config, out_path: str, variants: list[str],
                host: dict | None, cgroup: str | None) -> None:
    if cgroup is not None:  # before any thread starts: threads made later stay in the process's cgroup
        with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
    if host is not None:
        _enter_netns(host["ns"])
        os.environ["GLOO_SOCKET_IFNAME"] = host["ifname"]
    rank_main(rank, master, port, cfg, out_path, variants)


def run_ranks(master: str, port: int, cfg: Config, out_path: str, variants: list[str], timeout_s: float,
              hosts: list[dict] | None = None, cgroups: list[str] | None = None) -> None:
    """Run the 4 ranks as processes forked from a server that imported torch once; rank r enters
    hosts[r]'s network namespace and cgroups[r] first when they are given."""
    import multiprocessing as mp

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    procs = [ctx.Process(target=_rank_entry, name=f"rank{r}",
                         args=(r, master, port, cfg, out_path, variants, hosts[r] if hosts else None,
                               cgroups[r] if cgroups else None))
             for r in range(WORLD)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    try:
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    bad = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode != 0]
    if bad:
        raise SystemExit(f"overlap_bench: ranks {bad} (rank, exit code) failed or timed out")


@contextlib.contextmanager
def cpu_caps(cores: float, period_us: int):
    """One cgroup per rank whose CPU quota caps it at `cores` CPUs (all its threads together), so that every
    rank computes at a fixed speed, as every GPU does, and time a rank spends blocked on communication is
    not handed to the other ranks' compute (with 4 ranks on 2 shared cores it is, which hides communication
    for every schedule alike). cgroup v1's cpu controller (cfs_quota_us) or v2's cpu.max; a short period
    (2 ms: a 1 ms quota, the kernel's least) bounds how long a thread that wakes in a throttled rank (the
    ep stream, with data arrived) waits for the next period. Yields the 4 directories; removes them afterwards."""
    v1, v2 = "/sys/fs/cgroup/cpu", "/sys/fs/cgroup"
    if os.path.exists(os.path.join(v1, "cpu.cfs_quota_us")):
        root, files = v1, lambda q: {"cpu.cfs_period_us": str(period_us), "cpu.cfs_quota_us": str(q)}
    elif "cpu" in _read(os.path.join(v2, "cgroup.controllers")).split():
        root, files = v2, lambda q: {"cpu.max": f"{q} {period_us}"}
    else:
        raise SystemExit("overlap_bench: --cpu-per-rank needs a cgroup cpu controller (v1 cpu or v2 cpu.max)")
    quota = int(round(cores * period_us))
    if quota < 1000:
        raise SystemExit(f"overlap_bench: --cpu-per-rank {cores} gives a quota under 1 ms per {period_us} us period")
    dirs = [os.path.join(root, f"mfob{os.getpid() % 10000}r{r}") for r in range(WORLD)]
    made = []
    try:
        for d in dirs:
            os.mkdir(d)
            made.append(d)
            for name, value in files(quota).items():
                with open(os.path.join(d, name), "w") as f:
                    f.write(value)
        yield dirs
    except PermissionError as e:
        raise SystemExit(f"overlap_bench: --cpu-per-rank: {e} (needs root)") from None
    finally:
        for d in made:  # the ranks have exited (run_ranks joins or kills them), so the cgroups are empty
            with contextlib.suppress(OSError):
                os.rmdir(d)


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def throttled_s(dirs: list[str]) -> list[float]:
    """Seconds each cgroup spent throttled (its quota used up) so far."""
    out = []
    for d in dirs:
        stat = dict(line.split() for line in _read(os.path.join(d, "cpu.stat")).splitlines() if line.strip())
        out.append(int(stat.get("throttled_time", 0)) / 1e9 if "throttled_time" in stat
                   else int(stat.get("throttled_usec", 0)) / 1e6)
    return out


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


@contextlib.contextmanager
def star(rate_mbit: float, subnet: str = "10.231.8"):
    """One network namespace per rank, all joined by a bridge in a switch namespace (each rank its own
    NIC, as each GPU has its own InfiniBand NIC in DeepSeek-V3's cluster). On every rank's NIC an htb
    class limits the traffic to its ep peer to rate_mbit (so both directions of every ep pair run at
    rate_mbit, and the two ep pairs do not share a link); all other traffic (pipeline p2p, the timing
    barrier) is unshaped. Yields [{"ns", "ifname", "addr"} per rank]. Teardown kills what still runs in
    the namespaces and deletes them (their veths go with them)."""
    if shutil.which("ip") is None or shutil.which("tc") is None:
        raise SystemExit("overlap_bench: needs iproute2 (`ip`, `tc`); run with --no-netns instead")
    tag = str(os.getpid() % 10000)
    sw = f"mfob{tag}sw"
    hosts = [{"ns": f"mfob{tag}r{r}", "ifname": f"mfob{tag}r{r}", "addr": f"{subnet}.{r + 1}"} for r in range(WORLD)]
    made: list[str] = []
    try:
        for ns in [sw] + [h["ns"] for h in hosts]:
            _ip("netns", "add", ns)
            made.append(ns)
        _ip("-n", sw, "link", "add", "br0", "type", "bridge")
        _ip("-n", sw, "link", "set", "br0", "up")
        for r, h in enumerate(hosts):
            peer = f"mfob{tag}s{r}"
            _ip("link", "add", h["ifname"], "type", "veth", "peer", "name", peer)
            _ip("link", "set", h["ifname"], "netns", h["ns"])
            _ip("link", "set", peer, "netns", sw)
            _ip("-n", sw, "link", "set", peer, "master", "br0")
            _ip("-n", sw, "link", "set", peer, "up")
            _ip("-n", h["ns"], "addr", "add", f"{h['addr']}/24", "dev", h["ifname"])
            _ip("-n", h["ns"], "link", "set", h["ifname"], "up")
            _ip("-n", h["ns"], "link", "set", "lo", "up")
            if rate_mbit > 0:
                ep_peer = hosts[r ^ 1]["addr"]  # ranks 2p and 2p+1 form an ep group
                tc = ["ip", "netns", "exec", h["ns"], "tc"]
                for cmd in (["qdisc", "add", "dev", h["ifname"], "root", "handle", "1:", "htb", "default", "20"],
                            ["class", "add", "dev", h["ifname"], "parent", "1:", "classid", "1:10", "htb",
                             "rate", f"{rate_mbit:g}mbit", "ceil", f"{rate_mbit:g}mbit", "quantum", "60000"],
                            ["class", "add", "dev", h["ifname"], "parent", "1:", "classid", "1:20", "htb",
                             "rate", "10gbit", "quantum", "60000"],
                            ["filter", "add", "dev", h["ifname"], "parent", "1:", "protocol", "ip", "prio", "1",
                             "u32", "match", "ip", "dst", f"{ep_peer}/32", "flowid", "1:10"]):
                    subprocess.run(tc + cmd, check=True, capture_output=True, text=True, timeout=30)
        yield hosts
    except subprocess.CalledProcessError as e:
        raise SystemExit(f"overlap_bench: `{' '.join(e.cmd)}` failed: {e.stderr.strip()} "
                         f"(needs root; run with --no-netns instead)") from None
    finally:
        for ns in made:
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=30).stdout
            for pid in pids.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), 9)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


def _measure_link(src: dict, dst: dict, seconds: float = 3.0) -> float:
    """Mbit/s of one TCP stream from src to dst (a check of the tc setting)."""
    port = _free_port()
    recv = ("import socket\ns=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
            f"s.bind(('{dst['addr']}',{port}));s.listen();c,_=s.accept()\n"
            "while c.recv(1<<20): pass\n")
    send = (f"import socket,time\ns=socket.create_connection(('{dst['addr']}',{port}));buf=b'x'*(1<<16)\n"
            f"n=0;t=time.time()\nwhile time.time()-t<{seconds}:\n s.sendall(buf);n+=len(buf)\n"
            "s.close();print(n*8/1e6/(time.time()-t))\n")
    srv = subprocess.Popen(["ip", "netns", "exec", dst["ns"], sys.executable, "-c", recv])
    try:
        time.sleep(0.5)
        out = subprocess.run(["ip", "netns", "exec", src["ns"], sys.executable, "-c", send], capture_output=True,
                             text=True, timeout=seconds + 30, check=True)
        return float(out.stdout.strip().splitlines()[-1])
    finally:
        srv.wait(timeout=10)


# ---- report ----------------------------------------------------------------------------------------------
def fb_fraction(n_micro: int) -> list[float]:
    """Per pp rank: the share of its chunks (F or B) that run inside an F&B pair under DualPipeV, pp 2.
    Only those chunks' all-to-alls can be hidden, so this bounds "hidden" from above."""
    from moeforge.dualpipe.schedule import build_schedule

    out = []
    for acts in build_schedule("dualpipev", PP, n_micro):
        fb = sum(a.op == "FB" for a in acts)
        out.append(2 * fb / (2 * fb + sum(a.op in ("F", "B", "BW") for a in acts)))
    return out


def report(res: dict, cfg: Config, note: str, load: tuple[float, float]) -> str:
    samples, link_bytes, m = res["samples"], res["link_bytes"], res["model"]
    med = {label: [statistics.median(col) for col in zip(*rows)] for label, rows in samples.items() if rows}
    mb = {round(v / 1e6, 2) for v in link_bytes.values()}
    lines = [
        f"# DualPipe overlap: 4 gloo ranks (pp 2 x ep 2) on {os.cpu_count()} CPU cores, load average "
        f"{load[0]:.1f} before / {load[1]:.1f} after; {note}",
        f"# model: dim {m['dim']}, {m['n_layers']} MoE blocks + {m['n_mtp_modules']} MTP, {m['n_heads']} heads, "
        f"{m['n_routed_experts']} routed experts top-{m['n_activated_experts']} (moe_inter_dim {m['moe_inter_dim']}) "
        f"+ {m['n_shared_experts']} shared, {m['dtype']}; seq {cfg.seq}, micro-batch {cfg.micro_batch}, "
        f"{cfg.n_micro} micro-batches per step; median of {cfg.steps} steps after {cfg.warmup} warm-up; "
        f"{cfg.threads} torch thread(s) per rank; GIL switch interval "
        f"{f'{cfg.switch_interval_ms:g} ms' if cfg.switch_interval_ms > 0 else 'default (5 ms)'}"
        + (f"; every thread but the main one at nice {cfg.comm_nice}" if cfg.comm_nice else "")
        + ("; F&B backward as B then W per piece (fb_weight_split)" if cfg.fb_weight_split else ""),
        f"# all-to-all bytes per step and rank over its ep link, each way: "
        f"{', '.join(f'{x:.2f}' for x in sorted(mb))} MB"
        + (f" = {max(mb) * 8 / cfg.rate_mbit:.2f} s of link time at {cfg.rate_mbit:g} Mbit/s" if cfg.rate_mbit else ""),
        "| variant | step s (min-max) | vs torch dualpipev | a2a exposed s | stream busy s "
        "| a2a hidden | p2p blocked s | CPU s (4 ranks) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    off, ref = med.get("ours dualpipev, no overlap"), med.get("torch dualpipev")
    for label, _, _, _ in VARIANTS:
        if label not in med:
            continue
        wall, a2a, busy, p2p, cpu = med[label]
        steps = [row[0] for row in samples[label]]
        ratio = f"{wall / ref[0]:.2f}" if ref else "-"
        hidden = f"{1 - a2a / off[1]:.0%}" if off and off[1] > 0 else "-"
        lines.append(f"| {label} | {wall:.2f} ({min(steps):.2f}-{max(steps):.2f}) | {ratio} | {a2a:.2f} "
                     f"| {busy:.2f} | {hidden} | {p2p:.2f} | {cpu:.2f} |")
    for label in ("ours dualpipev, overlap", "ours dualpipev, no overlap"):
        rows = res.get("by_kind", {}).get(label)
        if not rows:
            continue
        lines.append(f"# {label}, per exchange kind (s per step and rank, median over steps): "
                     "exposed / run on stream / queued / slack (start to wait), count")
        for i, kind in enumerate(Blocked.KINDS):
            col = [statistics.median(step[i][j] for step in rows) for j in range(5)]
            lines.append(f"#   {kind.strip('_'):12s} {col[0]:6.2f} / {col[1]:6.2f} / {col[2]:6.2f} / {col[3]:6.2f}, "
                         f"{col[4]:.0f}")
    frac = fb_fraction(cfg.n_micro)
    lines.append(f"# DualPipeV chunks inside F&B pairs: "
                 f"{', '.join(f'pp rank {r} {f:.0%}' for r, f in enumerate(frac))} "
                 f"(the other chunks' all-to-alls cannot be hidden)")
    on = med.get("ours dualpipev, overlap")
    if on and off and ref:
        hidden = 1 - on[1] / off[1]
        lines.append(f"# goals: a2a hidden {hidden:.0%} (>= 80%: {'met' if hidden >= 0.8 else 'not met'}); "
                     f"step {on[0] / ref[0]:.2f}x torch ScheduleDualPipeV (<= 0.8x: "
                     f"{'met' if on[0] <= 0.8 * ref[0] else 'not met'}); {on[0] / off[0]:.2f}x ours without overlap")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for f, v in asdict(Config()).items():
        p.add_argument(f"--{f.replace('_', '-')}", type=type(v), default=None)
    p.add_argument("--rate", dest="rate_mbit", type=float, default=None, help="ep link Mbit/s each way; 0 = no limit")
    p.add_argument("--no-netns", action="store_true", help="all ranks on loopback (no tc limit)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, 1 step: checks that the bench runs")
    p.add_argument("--variants", default=json.dumps([v[0] for v in VARIANTS]), help="JSON list of labels")
    p.add_argument("--json", help="also write the raw samples here")
    a = p.parse_args(argv)
    variants = json.loads(a.variants)
    over = dict(SMOKE) if a.smoke else {}
    over.update({k: v for k, v in vars(a).items() if k in Config.__dataclass_fields__ and v is not None})
    if a.no_netns:
        over["rate_mbit"] = 0.0
    cfg = Config(**over)
    if cfg.comm_nice < 0 and os.geteuid() != 0:  # before any rank starts: setpriority would fail in every rank
        raise SystemExit(f"overlap_bench: --comm-nice {cfg.comm_nice} (a higher priority) needs root")
    if cfg.cpu_per_rank < 0:
        raise SystemExit(f"overlap_bench: --cpu-per-rank {cfg.cpu_per_rank} must be >= 0 (0: no cap)")
    tmp = tempfile.mkdtemp(prefix="overlap_bench")
    out = os.path.join(tmp, "result.json")
    budget = cfg.timeout_s * 3
    load0 = os.getloadavg()[0]
    try:
        with contextlib.ExitStack() as stack:
            cgroups = stack.enter_context(cpu_caps(cfg.cpu_per_rank, cfg.cpu_period_us)) if cfg.cpu_per_rank > 0 else None
            if a.no_netns:
                run_ranks("127.0.0.1", _free_port(), cfg, out, variants, budget, None, cgroups)
                note = "all on loopback, no link limit"
            else:
                if os.geteuid() != 0:
                    raise SystemExit("overlap_bench: network namespaces need root; run with --no-netns instead")
                with star(cfg.rate_mbit) as hosts:
                    ep_mbit, pp_mbit = _measure_link(hosts[0], hosts[1]), _measure_link(hosts[0], hosts[2])
                    run_ranks(hosts[0]["addr"], _free_port(), cfg, out, variants, budget, hosts, cgroups)
                note = ("one network namespace per rank (own NIC into a bridge); "
                        + (f"traffic to the ep peer limited by tc htb to {cfg.rate_mbit:g} Mbit/s each way"
                           if cfg.rate_mbit > 0 else "no limit")
                        + f" (one TCP stream measured: to the ep peer {ep_mbit:.0f} Mbit/s, to the pp peer "
                          f"{pp_mbit:.0f} Mbit/s)")
            if cgroups:
                note += (f"; every rank capped at {cfg.cpu_per_rank:g} CPU by a cgroup quota, period "
                         f"{cfg.cpu_period_us / 1000:g} ms (throttled in the "
                         f"whole run: {', '.join(f'{t:.0f}' for t in throttled_s(cgroups))} s per rank)")
        with open(out) as f:
            res = json.load(f)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(report(res, cfg, note, (load0, os.getloadavg()[0])), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
