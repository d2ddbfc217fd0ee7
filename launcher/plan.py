"""`moeforge plan`: what a layout costs before anyone spends a GPU hour.

    moeforge plan model=671b parallel.pp=16 parallel.ep=64 cluster.nodes=256 cluster.gpu=h800
    moeforge plan model=671b cluster.nodes=256 cluster.gpu=h800 --search     # rank (pp, ep, dp) layouts

Overrides are the job's own (model=, train.*, parallel.*, fp8=), composed by launcher.config as for a
run, plus cluster.* (gpu, nodes, gpus_per_node and any field of conf/cluster/<gpu>.yaml), split off here.
train.seq_len, train.micro_batch_size and train.global_batch_size default to model.max_seq_len, 1 and TR
§4.2's 15360 sequences when not given. No process starts; every number comes from one of
  - model/flops.py: parameters, FLOPs per token and per module (the one place of that arithmetic);
  - model/stages.py stage_layers: which modules each pipeline stage holds (model/split.py's, the runtime's split);
  - dualpipe/schedule.py + simulate.py: the action lists, their makespan and bubble (simulate with
    check=False: the generators' lists pass its checks; tests/unit/test_plan_speed.py), the chunks and
    activation bytes in flight (live_peaks);
  - comm/layout.py: the dispatcher's own send plans, flat or two-hop;
  - conf/cluster/*.yaml: memory, link and HBM bandwidths, and published throughput tables (every figure cited);
  - launcher/plan_costs.py: each unit's GEMMs, attention FLOPs and memory-bound bytes, counted from the real
    modules on fake tensors, forward, B and W apart, and the recompute policy's forward;
  - train/activations.py: the bytes per token each unit keeps for its backward, measured the same way;
  - parallel/zero.py: ZeRO-1's memory per rank and data-parallel bytes per step.

The model, explicitly (docs/plan.md has the same with the sources):
  time    a chunk (one micro-batch through one stage) costs the sum of its units' terms: FP8 GEMMs at
          DeepGEMM's published H800 throughput for the nearest published shape, BF16 GEMMs at cuBLAS's, the
          attention core at FlashAttention-3's, memory-bound kernels at the achieved HBM bandwidth; B gets
          the recompute policy's forward. cluster.efficiency (a user override, off by default) prices GEMMs
          and attention at peak x efficiency instead. EP all-to-all per MoE layer = max(inter-node bytes / IB,
          intra-node bytes / NVLink); it adds to F and B, except in DualPipe's overlapped F&B, priced
          max(F+B+W compute, both directions' EP). A rank's chunk costs the mean of the stages it holds
          (DualPipe: two), every chunk is priced as the slowest rank's, and p2p between stages = hidden
          state / link. step = the simulator's makespan + ZeRO-1 reduce-scatter/all-gather (exposed) + the
          optimizer step and the FP8 weight-cache refresh at HBM bandwidth.
  memory  per rank, the stages it holds (DualPipe: two): ZeRO-1's weights, FP32 grads, masters and moments
          (parallel.zero.memory_per_rank), FP8 weight caches, the activations of the chunks in flight, the EP
          receive buffers of the MoE layers in flight; the EMA in host memory, printed apart.
  EP      uniform routing: i.i.d. N(0, 1) router logits through model.routing.route (Gate's routing, bias
          0), a seeded Monte Carlo of 8192 tokens; `ep_bytes_for_routing` turns routing into the bytes each
          rank's comm.counters.ByteCounters records (tests/dist/test_plan_bytes.py checks it against a real run).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import math
from collections import Counter
from dataclasses import dataclass, field, fields
from importlib import resources

TR_BATCH = 15360  # sequences per step at the end of DeepSeek-V3's batch-size ramp (TR §4.2)
TR_GPU_HOURS_PER_T = 180e3  # H800 GPU-hours per trillion tokens (TR Table 1: 2664K for 14.8T)
MC_TOKENS = 8192  # Monte Carlo tokens for the expected EP traffic (over all ep ranks): ~0.1% standard error
EVENTS_FWD, EVENTS_BWD = ("dispatch_fwd", "combine_fwd"), ("dispatch_bwd", "combine_bwd")
GiB = 2.0 ** 30


# ---- hardware ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cluster:
    """A GPU profile (conf/cluster/<gpu>.yaml, every figure cited there). Throughputs are published
    measurements, not fitted: FP8 GEMMs per shape (DeepGEMM's tables), BF16 GEMMs (cuBLAS), the attention core
    (FlashAttention-3), memory-bound kernels at the achieved HBM bandwidth."""
    name: str
    nodes: int = 1
    gpus_per_node: int = 8
    memory_gib: float = 80.0
    reserved_gib: float = 4.0
    bf16_tflops: float = 989.4  # dense peaks: MFU's denominators
    fp8_tflops: float = 1978.9
    nvlink_gbps: float = 160.0
    ib_gbps: float = 50.0
    hbm_gbps: float = 3000.0  # achieved HBM bandwidth of a memory-bound kernel
    bf16_gemm_tflops: float = 789.0  # cuBLAS BF16 GEMM
    fp8_gemm: tuple = ()  # (M, N, K, TFLOP/s): dense FP8 GEMMs
    fp8_grouped_gemm: tuple = ()  # (groups, M per group, N, K, TFLOP/s): m-grouped contiguous FP8 GEMMs
    attn_fwd: tuple = ()  # (head dim, seq len, TFLOP/s): causal attention forward, BF16
    attn_bwd: tuple = ()  # (head dim, seq len, TFLOP/s): attention backward, BF16
    efficiency: float | None = None  # a user override: GEMMs and attention at peak x this (no default)

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node


_TABLES = ("fp8_gemm", "fp8_grouped_gemm", "attn_fwd", "attn_bwd")


def load_cluster(values: dict[str, str]) -> Cluster:
    """conf/cluster/<gpu>.yaml with cluster.<key>=value overrides (values as strings, typed by the field;
    the tables are the profile's own, not overridable; cluster.efficiency=null turns the override off)."""
    import yaml

    values = dict(values)
    gpu = values.pop("gpu", "h800")
    profiles = resources.files("moeforge.conf") / "cluster"
    path = profiles / f"{gpu}.yaml"
    if not path.is_file():
        names = sorted(p.name[:-5] for p in profiles.iterdir() if p.name.endswith(".yaml"))
        raise ValueError(f"cluster.gpu={gpu!r}: no profile; choose one of {names}")
    base = yaml.safe_load(path.read_text())
    types = {f.name: f.type for f in fields(Cluster)}
    for k in base:
        if k not in types:
            raise ValueError(f"conf/cluster/{gpu}.yaml: unknown key {k!r}; known: {sorted(types)}")
    for k in _TABLES:
        base[k] = tuple(tuple(row) for row in base.get(k) or ())
        if not base[k]:
            raise ValueError(f"conf/cluster/{gpu}.yaml: cluster.{k} (a table of published throughputs) is missing")
    for k, v in values.items():
        if k not in types:
            raise ValueError(f"cluster.{k}: unknown key; known: {sorted(types)} and gpu")
        if k in _TABLES:
            raise ValueError(f"cluster.{k}: a table of published figures; edit conf/cluster/{gpu}.yaml instead")
        try:
            if k == "efficiency":
                base[k] = None if v.lower() in ("null", "none", "") else float(v)
            else:
                base[k] = int(v) if types[k] == "int" else float(v) if types[k] == "float" else v
        except ValueError:
            raise ValueError(f"cluster.{k}={v!r}: expected {types[k]}") from None
    c = Cluster(**base)
    if c.nodes < 1 or c.gpus_per_node < 1:
        raise ValueError(f"cluster: need nodes, gpus_per_node >= 1, got {c.nodes}, {c.gpus_per_node}")
    if c.efficiency is not None and not 0 < c.efficiency <= 1:
        raise ValueError(f"cluster.efficiency={c.efficiency}: need 0 < efficiency <= 1 (or null: off)")
    if min(c.hbm_gbps, c.bf16_gemm_tflops, c.nvlink_gbps, c.ib_gbps) <= 0:
        raise ValueError("cluster: hbm_gbps, bf16_gemm_tflops, nvlink_gbps and ib_gbps must be > 0")
    return c


# ---- expert-parallel bytes --------------------------------------------------------------------------
def ep_bytes_for_routing(indices, topo, dim: int, x_bytes: int, fp8: bool, two_hop: bool) -> list[dict]:
    """What each ep rank's ByteCounters records for one MoE layer's dispatch + combine, forward and backward.

    indices[p]: the global expert ids [N_p, K] picked by ep rank p's tokens (CPU tensors). Returns, per
    rank, a dict {(event, link, part): bytes} with the keys of ByteCounters.bytes (zero entries left out).
    The rows are the dispatcher's own (_hop_sends); the backward and the combine send them the other way.
    """
    return _bytes_of_hops(_hop_sends(indices, topo, two_hop), topo, indices[0].size(1), dim, x_bytes, fp8)


def _hop_sends(indices, topo, two_hop: bool) -> list[list[list[int]]]:
    """Per hop of the dispatch, sends[s][p]: rows ep rank s sends to ep rank p, planned as comm/all_to_all.py
    plans them: flat, plan_sends(dest_rank_mask); two-hop, plan_sends(two_hop_first_mask) at each sender,
    then plan_sends(two_hop_second_mask) at each relay over the rows it received."""
    import torch

    from moeforge.comm.layout import dest_rank_mask, plan_sends, two_hop_first_mask, two_hop_second_mask

    if not two_hop:
        return [[plan_sends(dest_rank_mask(ids, topo))[1] for ids in indices]]
    topo.check_two_hop()
    first, received = [], [[] for _ in range(topo.ep_size)]  # the expert ids each relay receives
    for s, ids in enumerate(indices):
        src_rows, send = plan_sends(two_hop_first_mask(ids, topo, s))
        first.append(send)
        rows, start = ids[src_rows], 0
        for r, k in enumerate(send):
            if k:
                received[r].append(rows[start:start + k])
                start += k
    second = [plan_sends(two_hop_second_mask(torch.cat(ids) if ids else indices[0][:0], topo, r))[1]
              for r, ids in enumerate(received)]
    return [first, second]


@functools.lru_cache(maxsize=16)
def _link_masks(topo) -> dict:
    """{link: [P, P] bool, s -> p crosses that link} from EPTopology.link."""
    import torch

    P = topo.ep_size
    links = [topo.link(s, p) for s in range(P) for p in range(P)]
    return {lk: torch.tensor([x == lk for x in links]).view(P, P) for lk in ("intra", "inter")}


def _bytes_of_hops(hops, topo, K: int, dim: int, x_bytes: int, fp8: bool) -> list[dict]:
    import torch

    P = topo.ep_size
    link = _link_masks(topo)
    x_out = dim + 4 * math.ceil(dim / 128) if fp8 else dim * x_bytes  # dispatch direction: E4M3 + fp32 scales
    x_back = dim * x_bytes  # combine forward and dispatch backward stay in the activation dtype
    out = [dict() for _ in range(P)]

    def add(sent_PP, event, part, row_bytes):  # sent_PP[s, p]: rows s sends to p
        for lk, mask in link.items():
            for s, r in enumerate((sent_PP * mask).sum(1).tolist()):
                if r:
                    out[s][(event, lk, part)] = out[s].get((event, lk, part), 0) + r * row_bytes

    for i, sends in enumerate(hops):
        h = torch.tensor(sends, dtype=torch.int64)
        # one count exchange per hop (comm.layout.hop_counts): int64 rows per rank, and on the last hop also
        # the pairs per expert of the receiver
        per_peer = 8 * (1 + (topo.experts_per_rank if i == len(hops) - 1 else 0))
        add(torch.ones(P, P, dtype=torch.int64), "dispatch_fwd", "counts", per_peer)
        add(h, "dispatch_fwd", "x", x_out)
        add(h, "dispatch_fwd", "meta", 8 * K)  # gate weights fp32 + expert ids int32
        add(h, "combine_bwd", "x", x_out)
        add(h.T, "dispatch_bwd", "x", x_back)
        add(h.T, "dispatch_bwd", "meta", 4 * K)  # gate-weight grads
        add(h.T, "combine_fwd", "x", x_back)
    return out


@functools.lru_cache(maxsize=4)
def _uniform_ids(args, seed: int = 0):
    """The expert ids [MC_TOKENS, K] model.routing.route picks for i.i.d. N(0, 1) logits, bias 0."""
    import numpy as np
    import torch

    from moeforge.model.routing import route

    logits = np.random.default_rng(seed).standard_normal((MC_TOKENS, args.n_routed_experts), dtype=np.float32)
    return route(torch.from_numpy(logits), torch.zeros(args.n_routed_experts), args)[1]


def uniform_routing(args, ep: int, seed: int = 0) -> tuple:
    """Per ep rank, MC_TOKENS/ep tokens routed as model.moe.Gate routes i.i.d. N(0,1) logits (bias 0)."""
    return _uniform_ids(args, seed).tensor_split(ep)


@dataclass(frozen=True)
class EPTraffic:
    per_token: dict  # (event, link) -> bytes one rank sends per token of its own, one MoE layer
    per_call: dict  # (event, link) -> bytes per dispatch (the row counts exchanged)
    ranks_per_token: float  # distinct ep ranks a token's experts lie on
    nodes_per_token: float

    def time(self, events, tokens: int, cluster: Cluster) -> float:
        """Seconds for one MoE layer's `events` on `tokens` tokens per rank: the slower of the two links."""
        bw = {"inter": cluster.ib_gbps * 1e9, "intra": cluster.nvlink_gbps * 1e9}
        return max(sum(self.per_token.get((e, lk), 0) * tokens + self.per_call.get((e, lk), 0) for e in events)
                   / bw[lk] for lk in bw)


ALL_MODES = ((False, False), (False, True), (True, False), (True, True))  # (two_hop, fp8)


@functools.lru_cache(maxsize=64)
def ep_traffic(args, ep: int, ranks_per_node: int, x_bytes: int, modes=ALL_MODES) -> dict:
    """{(two_hop, fp8): EPTraffic} of one MoE layer under uniform routing, averaged over the ep ranks."""
    from moeforge.comm.layout import EPTopology

    if ep == 1:
        return {m: EPTraffic({}, {}, 1.0, 1.0) for m in modes}
    topo = EPTopology.from_ranks(list(range(ep)), args.n_routed_experts, ranks_per_node)
    indices = uniform_routing(args, ep)
    with _one_thread():  # a rank's masks are MC_TOKENS/ep rows: a second thread only adds its hand-off
        return _ep_traffic(indices, topo, args, x_bytes, modes)


@contextlib.contextmanager
def _one_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _ep_traffic(indices, topo, args, x_bytes: int, modes) -> dict:
    import torch

    from moeforge.comm.layout import nodes_per_token

    ep, n = topo.ep_size, MC_TOKENS
    hops = {False: _hop_sends(indices, topo, False)}
    ranks = sum(map(sum, hops[False][0])) / n  # flat dispatch sends a token once to each rank it picked
    nodes = nodes_per_token(torch.cat(indices), topo).sum().item() / n
    out = {}
    for two_hop, fp8 in modes:
        if two_hop not in hops:
            try:
                hops[True] = _hop_sends(indices, topo, True)
            except ValueError:  # two-hop needs as many ep ranks on every node
                hops[True] = None
        if hops[two_hop] is None:
            continue
        tok, call = {}, {}
        for d in _bytes_of_hops(hops[two_hop], topo, args.n_activated_experts, args.dim, x_bytes, fp8):
            for (e, lk, part), b in d.items():
                target = call if part == "counts" else tok
                target[(e, lk)] = target.get((e, lk), 0) + b
        out[(two_hop, fp8)] = EPTraffic({k: v / n for k, v in tok.items()}, {k: v / ep for k, v in call.items()},
                                        ranks, nodes)
    return out


# ---- stages -----------------------------------------------------------------------------------------
@dataclass
class Stage:
    fqns: list
    dense: int = 0  # parameters
    expert: int = 0  # routed-expert parameters, all of them (a rank holds 1/ep)
    moe_layers: int = 0
    units: dict = field(default_factory=dict)  # plan_costs kind (embed, dense, moe, head, mtp) -> how many
    act: float = 0.0  # activation bytes per token kept for the backward (train.activations, measured)


def stage_units(args, fqns: list, first: bool) -> dict:
    """{plan_costs kind: count} of a stage's top-level modules. The embedding is priced where it embeds the
    input (stage 0); the last stage's copy serves the MTP modules, whose unit includes that lookup."""
    units: dict = {}
    for f in fqns:
        kind = {"embed": "embed" if first else None, "head": "head", "norm": None}.get(f)
        if f.startswith("layers."):
            kind = "moe" if args.is_moe_layer(int(f.split(".")[1])) else "dense"
        elif f.startswith("mtp."):
            kind = "mtp"
        if kind:
            units[kind] = units.get(kind, 0) + 1
    return units


def build_stages(args, n_stages: int, seq_len: int, fp8, recompute: str = "none", micro_batch: int = 1) -> list[Stage]:
    """Per stage of model.stages.stage_layers (the split the runtime uses): parameters, its units (priced by
    plan_costs) and the activation bytes per token its modules keep (train.activations.saved_bytes_per_token:
    the real modules on fake tensors, with the job's recompute policy and FP8 caches)."""
    from moeforge.model.flops import parts
    from moeforge.model.stages import stage_layers
    from moeforge.train.activations import saved_bytes_per_token

    if fp8.enabled and getattr(fp8, "cache_fp8_weights", False):
        # the FP8 weight caches live once per weight, not per micro-batch: priced as their own category
        # ("FP8 weight caches"), so the activations are measured without them
        fp8 = dataclasses.replace(fp8, cache_fp8_weights=False)
    saved = saved_bytes_per_token(args, seq_len=seq_len, recompute=recompute, fp8=fp8, micro_batch=micro_batch)
    by_fqn: dict[str, list] = {}
    for p in parts(args):
        by_fqn.setdefault(p.fqn, []).append(p)
    stages = []
    for i, fqns in enumerate(stage_layers(args, n_stages)):
        s = Stage(fqns, units=stage_units(args, fqns, i == 0))
        for f in fqns:
            for p in by_fqn[f]:
                if p.is_expert:
                    s.expert += p.params
                else:
                    s.dense += p.params
            s.moe_layers += any(p.name == "routed" for p in by_fqn[f])
        s.act = sum(n * saved[k] for k, n in s.units.items() if k != "embed")
        stages.append(s)
    return stages


def stage_terms(stage: Stage, cfg, cluster: Cluster, ep: int) -> Counter:
    """Seconds per (phase, term) of one micro-batch through `stage` on one rank (plan_costs.price_unit of each
    unit, times its count), with the recompute policy's forward added to B as its own term."""
    from moeforge.launcher.plan_costs import count_unit

    a, t = cfg.model, cfg.train
    rec = {"none": None, "selective": "R_sel", "full": "R_full"}[t.recompute]
    cache = cfg.fp8.enabled and getattr(cfg.fp8, "cache_fp8_weights", False)
    out: Counter = Counter()
    for kind, n in stage.units.items():
        count = count_unit(a, kind, seq_len=t.seq_len, micro_batch=t.micro_batch_size, fp8=cfg.fp8)
        for (phase, term), sec in _priced(count, cluster, a, t.seq_len, ep, cache).items():
            if phase in ("R_sel", "R_full"):
                if phase == rec:
                    out[("B", "recompute")] += n * sec
            else:
                out[(phase, term)] += n * sec
    return out


@functools.lru_cache(maxsize=256)
def _priced(count, cluster: Cluster, args, seq_len: int, ep: int, cache: bool) -> dict:
    from moeforge.launcher.plan_costs import price_unit

    return dict(price_unit(count, cluster, args, seq_len, ep, cache))


# ---- one layout -------------------------------------------------------------------------------------
@dataclass
class ScheduleResult:
    name: str
    error: str | None = None  # why the schedule cannot run this layout
    makespan: float = 0.0  # seconds: the pipeline part of a step
    bubble: float = 0.0  # seconds: the largest bubble of any rank
    sync: float = 0.0  # seconds: ZeRO-1 reduce-scatter + all-gather after the pipeline (exposed)
    optimizer: float = 0.0  # seconds: the AdamW step on the rank's shard, the grad norm and zero_grad (HBM-bound)
    weight_refresh: float = 0.0  # seconds: re-quantizing the FP8 weight caches once per step
    peak_chunks: int = 0  # most micro-batch-stages in flight on one rank
    stages_per_rank: int = 1
    memory: dict = field(default_factory=dict)  # GiB on the fullest rank, by category
    memory_by_rank: list = field(default_factory=list)  # the same for every pp rank (moeforge dryrun compares one)
    host_gib: dict = field(default_factory=dict)  # host memory per GPU of the fullest rank (the EMA)
    rank: int = 0  # the fullest rank
    chunk: dict = field(default_factory=dict)  # seconds per chunk, slowest rank: F_c B_c W_c ep_fwd ep_bwd p2p
    terms: dict = field(default_factory=dict)  # (phase, term) -> seconds per chunk of the slowest rank
    dp_bytes: dict = field(default_factory=dict)  # parallel.zero.dp_bytes_per_step of the fullest rank
    mem_bytes: dict = field(default_factory=dict)  # (phase, category) -> HBM bytes per chunk, slowest rank
    gemms: list = field(default_factory=list)  # (seconds, phase, kind, M, N, K, calls, TFLOP/s, source), slowest rank
    blocks: list = field(default_factory=list)  # transformer blocks per stage
    fits: bool = False

    @property
    def step(self) -> float:
        return self.makespan + self.sync + self.optimizer + self.weight_refresh

    @property
    def total_gib(self) -> float:
        return sum(self.memory.values())


@dataclass
class LayoutPlan:
    cfg: object
    cluster: Cluster
    pp: int
    ep: int
    dp: int
    n_micro: int
    tokens_per_chunk: int
    counts: dict
    flops_per_token: float
    traffic: dict  # (two_hop, fp8) -> EPTraffic
    schedules: dict  # name -> ScheduleResult
    chosen: str
    master: str
    ramp: "RampPlan | None" = None  # train.batch_ramp priced: its first batch and the whole ramp

    @property
    def best(self) -> ScheduleResult:
        return self.schedules[self.chosen]

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.train.global_batch_size * self.cfg.train.seq_len

    def tokens_per_s(self, r: ScheduleResult) -> float:
        return self.tokens_per_step / r.step

    def gpu_hours_per_T(self, r: ScheduleResult) -> float:
        return self.cluster.world * r.step / 3600 * 1e12 / self.tokens_per_step

    def mfu(self, r: ScheduleResult, peak_tflops: float) -> float:
        return self.flops_per_token * self.tokens_per_s(r) / (self.cluster.world * peak_tflops * 1e12)


# The rank whose bubble is the report's formula (dualpipe.simulate's docstring): closed-form makespan.
_FORMULA_RANK = {"1f1b": lambda pp: 0, "zb1p": lambda pp: 0, "dualpipe": lambda pp: pp // 2 - 1,
                 "dualpipev": lambda pp: pp - 1}


@functools.lru_cache(maxsize=256)
def _schedule(name: str, pp: int, n: int):
    from moeforge.dualpipe.schedule import build_schedule

    return build_schedule(name, pp, n)


@functools.lru_cache(maxsize=256)
def _rank_actions(name: str, pp: int, n: int, rank: int):
    from moeforge.dualpipe.schedule import GENERATORS

    return GENERATORS[name](rank, pp, n)


@dataclass(frozen=True)
class _Layout:
    cfg: object
    cluster: Cluster
    pp: int
    ep: int
    dp: int
    n_micro: int
    master: str
    exact: bool  # simulate; False: closed form (--search)

    @property
    def tokens(self) -> int:
        return self.cfg.train.micro_batch_size * self.cfg.train.seq_len


def _price_schedule(name: str, L: _Layout, stages: list[Stage], tr: EPTraffic) -> ScheduleResult:
    """One schedule on one layout: chunk costs, makespan and bubble, the step's tail (ZeRO-1 sync, optimizer,
    FP8 weight refresh), memory of every rank."""
    from moeforge.dualpipe.schedule import stage_placement, validate
    from moeforge.dualpipe.simulate import Costs, bubble_formula, live_peaks, simulate
    from moeforge.parallel.zero import dp_bytes_per_step, memory_per_rank

    res = ScheduleResult(name)
    try:
        validate(name, L.pp, L.n_micro)
    except ValueError as e:
        res.error = str(e).split(": ", 1)[-1]
        return res
    cfg, cl, a, tokens = L.cfg, L.cluster, L.cfg.model, L.tokens
    S, placement = len(stages), stage_placement(name, L.pp)
    res.blocks = [sum(f.startswith("layers.") for f in s.fqns) for s in stages]
    terms = [stage_terms(s, cfg, cl, L.ep) for s in stages]
    per_stage = []
    for s, tm in zip(stages, terms):
        per_stage.append({"F_c": sum(v for (ph, _), v in tm.items() if ph == "F"),
                          "B_c": sum(v for (ph, _), v in tm.items() if ph == "B"),
                          "W_c": sum(v for (ph, _), v in tm.items() if ph == "W"),
                          "ep_fwd": s.moe_layers * tr.time(EVENTS_FWD, tokens, cl),
                          "ep_bwd": s.moe_layers * tr.time(EVENTS_BWD, tokens, cl),
                          "refresh": tm.get(("step", "fp8 weight cache"), 0.0)})
    # A rank runs as many chunks of each stage it holds: its chunk costs the mean of its stages.
    per = [{k: sum(per_stage[s][k] for s in held) / len(held) for k in per_stage[0]} for held in placement]
    work = [c["F_c"] + c["B_c"] + c["W_c"] for c in per]
    slow = max(range(len(per)), key=lambda r: work[r])
    p2p_bw = (cl.nvlink_gbps if cl.world <= cl.gpus_per_node else cl.ib_gbps) * 1e9
    res.chunk = dict(per[slow], p2p=tokens * a.dim * 2 / p2p_bw if L.pp > 1 else 0.0,
                     imbalance=max(work) / (sum(work) / len(work)), rank=slow)
    held = placement[slow]
    res.terms = {k: sum(terms[s].get(k, 0.0) for s in held) / len(held)
                 for k in sorted({k for s in held for k in terms[s]})}
    res.mem_bytes, res.gemms = _slow_rank_details(cfg, cl, L.ep, [stages[s] for s in held])
    # 1F1B/ZB1P expose the all-to-all (it adds to F and B); DualPipe's overlapped F&B hides it behind the
    # other micro-batch's compute: max(F + B + W compute, both directions' EP)
    costs = Costs(F=max(c["F_c"] + c["ep_fwd"] for c in per), B=max(c["B_c"] + c["ep_bwd"] for c in per),
                  W=max(c["W_c"] for c in per), comm=res.chunk["p2p"],
                  FB=max(max(c["F_c"] + c["B_c"] + c["W_c"], c["ep_fwd"] + c["ep_bwd"]) for c in per))
    if L.exact:
        sched = _schedule(name, L.pp, L.n_micro)
        sim = simulate(sched, costs, check=False)  # the generators' lists pass the checks
        res.makespan, res.bubble = sim.makespan, sim.max_bubble
    else:  # busy time of the formula's rank at the real n + the report's bubble; peaks from a short run
        actions = _rank_actions(name, L.pp, L.n_micro, _FORMULA_RANK[name](L.pp))
        busy = sum(costs.price(x) for x in actions if x.is_compute)
        res.bubble = bubble_formula(name, L.pp, costs)
        res.makespan = busy + res.bubble
        n_short = min(L.n_micro, 2 * S + 2)
        sched = _schedule(name, L.pp, n_short + (n_short % 2 if name == "dualpipe" else 0))
    act = [s.act * tokens for s in stages]
    peaks = [live_peaks(acts, act) for acts in sched]
    res.peak_chunks = max(chunks for chunks, _ in peaks)
    edp = L.dp // L.ep
    mb = 2 if cfg.train.moment_dtype == "bfloat16" else 4
    wb = 2 if a.dtype == "bfloat16" else 4
    sync_bw = (cl.ib_gbps if L.dp > cl.gpus_per_node else cl.nvlink_gbps) * 1e9
    hbm = cl.hbm_gbps * 1e9
    in_flight = 2 if name in ("dualpipe", "dualpipev") else 1  # MoE layers whose EP buffers are live at once
    row_out = a.dim + 4 * math.ceil(a.dim / 128) if L.cfg.parallel.fp8_dispatch else a.dim * wb
    comm = in_flight * tokens * tr.ranks_per_token * (row_out + a.dim * wb) if L.ep > 1 else 0.0
    for r, held in enumerate(placement):
        dense = sum(stages[s].dense for s in held)
        if sum("embed" in stages[s].fqns for s in held) > 1:  # one nn.Embedding serves both (model/split.py)
            dense -= a.vocab_size * a.dim
        expert = sum(stages[s].expert for s in held) // L.ep
        z = memory_per_rank(dense, expert, L.dp, edp, weight_bytes=wb, moment_bytes=mb)
        fp8w = _fp8_cache_bytes(cfg, [stages[s] for s in held], L.ep)
        mem = {f"weights ({'BF16' if wb == 2 else 'FP32'})": z["weights"], "grads (FP32)": z["grads"],
               "master (FP32)": 4 * (dense + expert) if L.master == "full" else z["masters"],
               f"moments ({'BF16' if mb == 2 else 'FP32'})": z["moments"],
               "FP8 weight caches": fp8w, "activations": peaks[r][1], "EP comm buffers": comm}
        mem = {k: v / GiB for k, v in mem.items()}
        res.memory_by_rank.append(mem)
        if not res.memory or sum(mem.values()) > res.total_gib:
            res.rank, res.memory, res.stages_per_rank = r, mem, len(held)
            res.host_gib = {"EMA (FP32, host)": 4 * (dense + expert) / GiB} if cfg.train.ema_decay > 0 else {}
        # ZeRO-1 after the pipeline (parallel/zero.py's own byte count): reduce-scatter the FP32 grads and
        # all-gather the updated weights, over dp (dense) and edp (experts), not overlapped
        dpb = dp_bytes_per_step(dense, expert, L.dp, edp, grad_bytes=4, weight_bytes=wb)
        if sum(dpb.values()) / sync_bw >= res.sync:
            res.sync, res.dp_bytes = sum(dpb.values()) / sync_bw, dpb
        # AdamW on the rank's shard: read the FP32 grad, read+write the FP32 master and m, v, write the
        # weight's slice; the grad norm reads the grad once more; zero_grad writes the whole grad buffer
        shard = z["moments"] / (2 * mb)
        opt = shard * (4 + 4 + 8 + 4 * mb + (wb if wb == 2 else 0)) + z["grads"]
        res.optimizer = max(res.optimizer, opt / hbm)
        res.weight_refresh = max(res.weight_refresh, sum(per_stage[s]["refresh"] for s in held))
    res.fits = res.total_gib <= cl.memory_gib - cl.reserved_gib
    return res


def _slow_rank_details(cfg, cluster: Cluster, ep: int, stages: list[Stage]) -> tuple[dict, list]:
    """Per chunk of a rank holding `stages` (their mean): HBM bytes by (phase, category), and every GEMM
    shape with its calls, throughput and source (the recompute policy's forward filed under phase R)."""
    from moeforge.launcher.plan_costs import count_unit, gemm_tflops, mem_by_category

    t, a = cfg.train, cfg.model
    rec = {"none": None, "selective": "R_sel", "full": "R_full"}[t.recompute]
    rows = t.micro_batch_size * t.seq_len * a.n_activated_experts * ep / max(a.n_routed_experts, 1)
    cache = cfg.fp8.enabled and getattr(cfg.fp8, "cache_fp8_weights", False)
    mem: Counter = Counter()
    gemms: dict = {}
    for s in stages:
        for kind, n in s.units.items():
            c = count_unit(a, kind, seq_len=t.seq_len, micro_batch=t.micro_batch_size, fp8=cfg.fp8)
            for (phase, cat), b in mem_by_category(c, ep).items():
                if cat == "fp8 quantize (weights)" and cache:  # once per step: "FP8 weight refresh"
                    continue
                if phase in ("F", "B", "W") or phase == rec:
                    mem[("R" if phase == rec else phase, cat)] += n * b / len(stages)
            for (phase, k, m_, n_, k_, grouped), calls in c.gemms.items():
                if phase in ("F", "B", "W") or phase == rec:
                    key = ("R" if phase == rec else phase, k, m_, n_, k_, grouped)
                    gemms[key] = gemms.get(key, 0) + n * calls / len(stages)
    out = []
    for (phase, k, m_, n_, k_, grouped), calls in gemms.items():
        tf, src = gemm_tflops(cluster, k, m_, n_, k_, grouped_m=rows if grouped else None)
        out.append((calls * 2.0 * m_ * n_ * k_ / (tf * 1e12), phase, k, m_, n_, k_, calls, tf, src))
    return dict(mem), sorted(out, reverse=True)


def _fp8_cache_bytes(cfg, stages: list[Stage], ep: int) -> float:
    """Bytes of the FP8 weight caches (fp8.cache_fp8_weights) of the units of `stages`: counted per Fp8Linear by
    plan_costs (fp8.cache.weight_cache_bytes), the routed experts' / ep."""
    if not (cfg.fp8.enabled and getattr(cfg.fp8, "cache_fp8_weights", False)):
        return 0.0
    from moeforge.launcher.plan_costs import count_unit

    t, total = cfg.train, 0.0
    for s in stages:
        for kind, n in s.units.items():
            c = count_unit(cfg.model, kind, seq_len=t.seq_len, micro_batch=t.micro_batch_size, fp8=cfg.fp8)
            total += n * (c.fp8_weights["dense"] + c.fp8_weights["expert"] / ep)
    return total


SCHEDULE_ORDER = ("1f1b", "zb1p", "dualpipe", "dualpipev")


def evaluate(cfg, cluster: Cluster, schedules=SCHEDULE_ORDER, chosen: str | None = None,
             master: str = "sharded", exact: bool = True) -> LayoutPlan:
    """Price the layout of cfg.parallel on `cluster` for each schedule. The verdict's schedule is `chosen`,
    or else the fastest that fits (if none fits, the one that needs least memory)."""
    from moeforge.dualpipe.schedule import num_stages
    from moeforge.model.flops import count_params, train_flops_per_token
    from moeforge.parallel.dims import ParallelDims

    a, t, par = cfg.model, cfg.train, cfg.parallel
    gpn = cluster.gpus_per_node
    dims = ParallelDims(cluster.world, par.pp, par.ep, gpn).validate(a.n_routed_experts)
    if t.global_batch_size % (dims.dp * t.micro_batch_size):
        raise ValueError(f"train.global_batch_size={t.global_batch_size} must be a multiple of dp={dims.dp} x "
                         f"train.micro_batch_size={t.micro_batch_size}")
    L = _Layout(cfg, cluster, par.pp, dims.ep, dims.dp, t.global_batch_size // (dims.dp * t.micro_batch_size),
                master, exact)
    mode = (par.two_hop, par.fp8_dispatch)
    traffic = ep_traffic(a, dims.ep, gpn, 2 if a.dtype == "bfloat16" else 4, ALL_MODES if exact else (mode,))
    if mode not in traffic:
        raise ValueError(f"parallel.two_hop needs the same number of ep ranks on every node: ep={dims.ep}, "
                         f"{gpn} GPUs per node")
    names = [n for n in SCHEDULE_ORDER if n in set(schedules) | ({chosen} if chosen else set())]
    stages: dict = {}
    for S in sorted({num_stages(n, par.pp) for n in names}):
        try:
            stages[S] = build_stages(a, S, t.seq_len, cfg.fp8, t.recompute, t.micro_batch_size)
        except ValueError as e:  # the model cannot be split into S stages (model/stages.py)
            stages[S] = str(e)
    results = {}
    for n in names:
        got = stages[num_stages(n, par.pp)]
        results[n] = ScheduleResult(n, error=got) if isinstance(got, str) else _price_schedule(n, L, got, traffic[mode])
    if chosen is None:
        ok = [r for r in results.values() if not r.error]
        fit = [r for r in ok if r.fits]
        chosen = (min(fit, key=lambda r: r.step) if fit else min(ok, key=lambda r: r.total_gib) if ok
                  else next(iter(results.values()))).name
    plan = LayoutPlan(cfg, cluster, par.pp, dims.ep, dims.dp, L.n_micro, L.tokens, count_params(a),
                      train_flops_per_token(a, t.seq_len, include_mtp=a.n_mtp_modules > 0), traffic, results,
                      chosen, master)
    if t.batch_ramp is not None and not results[chosen].error:
        plan.ramp = plan_ramp(plan, exact)
    return plan


@dataclass
class RampPlan:
    """train.batch_ramp on this layout: the ramp's batches, its first step priced like the full one, and the
    ramp's time with each step's time affine in its batch between the two (a pipeline's makespan is)."""
    sizes: list[int]
    steps: int
    samples: int
    first: LayoutPlan
    gpu_hours: float


def plan_ramp(p: LayoutPlan, exact: bool) -> RampPlan:
    """Check that every batch of the ramp splits into micro-batches the chosen schedule accepts (ValueError
    naming train.batch_ramp), then price the ramp."""
    from moeforge.dualpipe.schedule import validate
    from moeforge.train.batches import BatchSchedule

    t, r = p.cfg.train, p.cfg.train.batch_ramp
    sched = BatchSchedule.of(t)
    sizes = sched.sizes(1 << 62)  # every batch the ramp reaches
    for b in sizes:
        n, rest = divmod(b, p.dp * t.micro_batch_size)
        if rest:
            raise ValueError(f"train.batch_ramp: the global batch {b} (of {sizes[0]}..{sizes[-1]}) must be a multiple "
                             f"of dp={p.dp} x train.micro_batch_size={t.micro_batch_size}")
        if p.pp > 1:
            try:
                validate(p.chosen, p.pp, n)
            except ValueError as e:
                raise ValueError(f"train.batch_ramp: the global batch {b} gives {n} micro-batches per pipeline, "
                                 f"which {p.chosen} does not accept: {e}") from None
    first_cfg = dataclasses.replace(p.cfg, train=dataclasses.replace(t, global_batch_size=r.start, batch_ramp=None))
    first = evaluate(first_cfg, p.cluster, (p.chosen,), p.chosen, p.master, exact)
    t0, t1 = first.best.step, p.best.step
    steps, samples, seconds = 0, 0, 0.0
    while (b := sched.at(samples)) != t.global_batch_size:
        seconds += t0 + (t1 - t0) * (b - r.start) / (t.global_batch_size - r.start)
        steps, samples = steps + 1, samples + b
    return RampPlan(sizes, steps, samples, first, p.cluster.world * seconds / 3600)


# ---- search -----------------------------------------------------------------------------------------
def search(cfg, cluster: Cluster, schedule: str | None = None, master: str = "sharded") -> tuple[list, int]:
    """Every valid (pp, ep) for cluster.world GPUs at the job's batch, with `schedule` (None: each
    layout's fastest that fits), priced in closed form (busy time from the action lists + the report's
    bubble). Returns (the layouts that fit, fastest first; how many valid layouts did not fit)."""
    a, world = cfg.model, cluster.world
    plans, misfits = [], 0
    for pp in (d for d in range(1, world + 1) if world % d == 0):
        dp = world // pp
        for ep in (d for d in range(1, dp + 1) if dp % d == 0 and a.n_routed_experts % d == 0):
            c = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, pp=pp, ep=ep))
            try:
                p = evaluate(c, cluster, (schedule,) if schedule else SCHEDULE_ORDER, schedule, master, exact=False)
            except ValueError:  # the layout, the batch or the schedule does not divide
                continue
            if p.best.error:
                continue
            if p.best.fits:
                plans.append(p)
            else:
                misfits += 1
    plans.sort(key=lambda p: p.best.step)
    return plans, misfits


# ---- text -------------------------------------------------------------------------------------------
def _si(x: float, unit: str = "", billion: str = "G") -> str:
    """3 significant digits with a prefix: _si(2.6e11, "FLOP") = '261 GFLOP', _si(6.7e11, billion="B") = '671B'."""
    for div, suffix in ((1e12, "T"), (1e9, billion), (1e6, "M"), (1e3, "K")):
        if abs(x) >= div:
            return f"{x / div:.3g}{' ' if unit else ''}{suffix}{unit}"
    return f"{x:.3g}{' ' if unit else ''}{unit}"


def _n(x: float) -> str:
    """A readable number: 1 decimal from 10, 2 from 0.1, else 3 significant digits (tiny models)."""
    return f"{x:.1f}" if abs(x) >= 10 else f"{x:.2f}" if abs(x) >= 0.1 else f"{x:.3g}"


def _mode(two_hop: bool, fp8: bool) -> str:
    return f"{'two-hop' if two_hop else 'flat'} {'FP8' if fp8 else 'BF16'}"


def _header(cfg, cluster: Cluster) -> str:
    t = cfg.train
    return (f"{cfg.model.name} on {cluster.world} x {cluster.name} ({cluster.nodes} nodes x {cluster.gpus_per_node}) | "
            f"seq {t.seq_len}, batch {t.global_batch_size} x micro {t.micro_batch_size} | "
            f"fp8 {'on' if cfg.fp8.enabled else 'off'} | moments {t.moment_dtype}")


def render(p: LayoutPlan, defaults: list[str] = ()) -> str:
    cfg, cl, a = p.cfg, p.cluster, p.cfg.model
    c, r = p.counts, p.best
    par = cfg.parallel
    L = [f"moeforge plan: {_header(cfg, cl)}",
         f"  layout pp {p.pp} x dp {p.dp} (edp {p.dp // p.ep} x ep {p.ep}); {p.n_micro} micro-batches of "
         f"{p.tokens_per_chunk} tokens per pipeline per step; EP dispatch {_mode(par.two_hop, par.fp8_dispatch)}"]
    if defaults:
        L.append(f"  (plan defaults: {', '.join(defaults)})")
    L += ["", "model (model/flops.py)",
          f"  parameters {_si(c['total'], billion='B')} total, {_si(c['activated'], billion='B')} activated per "
          f"token, MTP {_si(c['mtp'], billion='B')}",
          f"  training {_si(p.flops_per_token, 'FLOP')} per token (forward + backward, MTP included)",
          f"  blocks per stage ({r.name}): {' '.join(map(str, r.blocks))}"]
    if not r.error:
        L += _render_terms(p, r)
    L += ["", "schedule    bubble s  bubble %  step s  in flight  stages/rank  memory GiB  fits"]
    for s in p.schedules.values():
        if s.error:
            L.append(f"{s.name:<11} n/a: {s.error}")
            continue
        L.append(f"{s.name:<11} {_n(s.bubble):>8}  {100 * s.bubble / s.makespan:7.1f}%  {_n(s.step):>6}  "
                 f"{s.peak_chunks:9d}  {s.stages_per_rank:11d}  {_n(s.total_gib):>10}  {'yes' if s.fits else 'NO'}")
    usable = cl.memory_gib - cl.reserved_gib
    L += ["", f"memory per GPU, {r.name}, rank {r.rank} (the fullest; ZeRO-1 master weights {p.master}) GiB"]
    L += [f"  {k:<20} {_n(v):>6}" for k, v in r.memory.items()]
    L.append(f"  {'total':<20} {_n(r.total_gib):>6} of {_n(usable)} usable "
             f"({cl.memory_gib:g} - {cl.reserved_gib:g} reserved)")
    L += [f"  {k:<20} {_n(v):>6} (not GPU memory)" for k, v in r.host_gib.items()]
    any_tr = next(iter(p.traffic.values()))
    L += ["", f"EP bytes one rank sends per token per MoE layer, fwd + bwd (uniform routing: "
              f"{any_tr.ranks_per_token:.2f} ranks, {any_tr.nodes_per_token:.2f} nodes per token)",
          "  dispatch        inter-node  intra-node  time per layer per chunk (fwd + bwd)"]
    for (h, f), tr in p.traffic.items():
        ev = EVENTS_FWD + EVENTS_BWD
        inter = sum(tr.per_token.get((e, "inter"), 0) for e in ev)
        intra = sum(tr.per_token.get((e, "intra"), 0) for e in ev)
        t = (tr.time(EVENTS_FWD, p.tokens_per_chunk, cl) + tr.time(EVENTS_BWD, p.tokens_per_chunk, cl)) * 1e3
        mark = " <-" if (h, f) == (par.two_hop, par.fp8_dispatch) else ""
        L.append(f"  {_mode(h, f):<14} {inter / 1e3:8.1f} KB {intra / 1e3:8.1f} KB  {_n(t):>8} ms{mark}")
    if not r.error:
        tps = p.tokens_per_s(r)
        gh = p.gpu_hours_per_T(r)
        L += ["", f"throughput ({r.name})",
              f"  step {_n(r.step)} s = pipeline {_n(r.makespan)} s (bubble {_n(r.bubble)}) "
              f"+ ZeRO-1 sync {_n(r.sync)} s + optimizer {_n(r.optimizer)} s"
              + (f" + FP8 weight refresh {_n(r.weight_refresh)} s" if r.weight_refresh else ""),
              f"  {_si(tps)} tokens/s ({_si(tps / cl.world)} per GPU); {_si(gh)} GPU-hours per 1T tokens",
              f"  MFU {100 * p.mfu(r, cl.bf16_tflops):.1f}% of the BF16 peak"
              + (f", {100 * p.mfu(r, cl.fp8_tflops):.1f}% of the FP8 peak" if cfg.fp8.enabled else "")]
        if a.name == "671b":
            L.append(f"  DeepSeek-V3 reports 180K H800 GPU-hours per 1T tokens (TR Table 1): this plan is "
                     f"{gh / TR_GPU_HOURS_PER_T:.2f}x that")
        if p.ramp is not None:
            rp, f = p.ramp, p.ramp.first.best
            tokens = rp.samples * cfg.train.seq_len
            full = gh * tokens / 1e12
            L += ["", f"batch ramp (train.batch_ramp, {r.name}): {rp.sizes[0]} -> {rp.sizes[-1]} sequences in "
                      f"{len(rp.sizes) - 1} steps of {cfg.train.batch_ramp.increment} over the first "
                      f"{_si(tokens, billion='B')} tokens ({rp.steps:,} optimizer steps)",
                  f"  first step: {p.ramp.first.n_micro} micro-batches, {_n(f.step)} s (bubble "
                  f"{100 * f.bubble / f.makespan:.1f}%), {_si(p.ramp.first.tokens_per_s(f))} tokens/s",
                  f"  the ramp: {_si(rp.gpu_hours)} GPU-hours, {rp.gpu_hours / full:.2f}x those tokens at the full "
                  f"batch's rate"]
    L += ["", _verdict(r, usable, p)]
    return "\n".join(L)


_TERMS = (("gemm fp8", "GEMM FP8 (DeepGEMM table)"), ("gemm bf16", "GEMM BF16 (cuBLAS)"),
          ("attention", "attention core (FA3)"), ("memory-bound", "memory-bound (HBM)"), ("recompute", "recompute"))


def _render_terms(p: LayoutPlan, r: ScheduleResult) -> list[str]:
    """The time terms of one chunk on the slowest rank, its GEMMs and HBM bytes, and the step's tail."""
    cl, ch, t = p.cluster, r.chunk, p.cfg.train
    how = (f"GEMMs and attention at {cl.efficiency:g} x peak (cluster.efficiency override)"
           if cl.efficiency is not None else "published throughputs, conf/cluster/" + cl.name + ".yaml")
    L = ["", f"time per chunk ({p.tokens_per_chunk} tokens through one stage) on rank {ch['rank']}, the slowest "
             f"(its work is {ch['imbalance']:.2f}x the mean rank's); {how}; ms",
         f"  {'term':<28}{'F':>9}{'B':>9}{'W':>9}"]
    for key, label in _TERMS:
        row = [r.terms.get((ph, key), 0.0) * 1e3 for ph in "FBW"]
        if any(row):
            if key == "recompute":
                label = f"recompute ({t.recompute})"
            L.append(f"  {label:<28}" + "".join(f"{_n(v):>9}" for v in row))
    L.append(f"  {'compute':<28}{_n(ch['F_c'] * 1e3):>9}{_n(ch['B_c'] * 1e3):>9}{_n(ch['W_c'] * 1e3):>9}")
    L.append(f"  {'EP all-to-all':<28}{_n(ch['ep_fwd'] * 1e3):>9}{_n(ch['ep_bwd'] * 1e3):>9}"
             f"      (1F1B/ZB1P: added to F and B; DualPipe: max(F+B+W, both) per F&B pair)")
    L.append(f"  {'p2p to the next stage':<28}{_n(ch['p2p'] * 1e3):>9}")
    if r.gemms:
        top = r.gemms[:8]
        L += ["", "  GEMMs of that chunk, the costliest first (phase, M x N x K, calls, TFLOP/s, from; grouped: one "
                  "expert's", "  rows as counted with every expert here, priced at the EP rank's rows per local expert)"]
        for sec, ph, k, m, n, kk, calls, tf, src in top:
            grouped = " grouped" if src.startswith("DeepGEMM grouped") else ""
            L.append(f"    {ph} {k} {m}x{n}x{kk}{grouped}: {calls:g} x, {tf:.0f} TFLOP/s ({src}), {_n(sec * 1e3)} ms")
        if len(r.gemms) > len(top):
            rest = sum(g[0] for g in r.gemms[len(top):])
            L.append(f"    ... {len(r.gemms) - len(top)} more shapes, {_n(rest * 1e3)} ms")
    if r.mem_bytes:
        floor = 1e-3 * sum(r.mem_bytes.values())  # categories under 0.1% of the bytes are left out
        cats = sorted({c for (_, c), b in r.mem_bytes.items() if b > floor},
                      key=lambda c: -sum(r.mem_bytes.get((ph, c), 0) for ph in "FBWR"))
        L += ["", f"  memory-bound bytes of that chunk, GB (at {cl.hbm_gbps:g} GB/s; R: the recomputed forward)",
              f"    {'category':<26}{'F':>8}{'B':>8}{'W':>8}{'R':>8}"]
        L += [f"    {c:<26}" + "".join(f"{r.mem_bytes.get((ph, c), 0) / 1e9:8.2f}" for ph in "FBWR") for c in cats]
    dpb = r.dp_bytes
    L += ["", "per step, after the pipeline (s)",
          f"  ZeRO-1 sync {_n(r.sync)}: reduce-scatter FP32 grads {dpb.get('grad_reduce_scatter', 0) / 1e9:.2f} GB + "
          f"all-gather weights {dpb.get('weight_all_gather', 0) / 1e9:.2f} GB per rank (parallel/zero.py), exposed",
          f"  optimizer {_n(r.optimizer)}: AdamW on the rank's shard + grad norm + zero_grad, at HBM bandwidth"]
    if r.weight_refresh:
        L.append(f"  FP8 weight refresh {_n(r.weight_refresh)}: every weight re-quantized once (fp8.cache_fp8_weights)")
    return L


def _verdict(r: ScheduleResult, usable: float, p: LayoutPlan) -> str:
    if r.error:
        return f"verdict: {r.name} cannot run this layout: {r.error}"
    if r.fits:
        return (f"verdict: fits ({r.name}): {_n(r.total_gib)} of {_n(usable)} GiB on rank {r.rank}, "
                f"{_n(usable - r.total_gib)} GiB to spare; {_si(p.gpu_hours_per_T(r))} GPU-hours per 1T tokens")
    hints = [h for ok, h in ((not p.cfg.fp8.enabled, "fp8=blockwise (FP8 activation caches)"),
                             (p.cfg.train.moment_dtype != "bfloat16", "train.moment_dtype=bfloat16"),
                             (p.cfg.train.micro_batch_size > 1, "a smaller train.micro_batch_size"),
                             (True, "--search for a layout that fits")) if ok]
    others = [s.name for s in p.schedules.values() if s.fits]
    return (f"verdict: does not fit ({r.name}): {_n(r.total_gib)} GiB on rank {r.rank}, {_n(r.total_gib - usable)} GiB "
            f"over the {_n(usable)} usable; " + (f"{', '.join(others)} fits" if others else f"try {', '.join(hints)}"))


def render_search(plans: list, misfits: int, cfg, cluster: Cluster, schedule: str | None, top: int) -> str:
    L = [f"moeforge plan --search: {_header(cfg, cluster)} | {schedule or 'fastest schedule that fits'}, "
         f"EP dispatch {_mode(cfg.parallel.two_hop, cfg.parallel.fp8_dispatch)}",
         "  (closed-form pipeline: busy time + the report's bubble formula; `moeforge plan` on one layout simulates)",
         "", "rank   pp    dp  edp   ep  micro  schedule   memory GiB  bubble %  step s  tokens/s/GPU  GPU-h per 1T"]
    for i, p in enumerate(plans[:top], 1):
        r = p.best
        L.append(f"{i:4d} {p.pp:4d} {p.dp:5d} {p.dp // p.ep:4d} {p.ep:4d} {p.n_micro:6d}  {r.name:<9} "
                 f"{r.total_gib:11.1f} "
                 f"{100 * r.bubble / r.makespan:8.1f}% {r.step:7.2f} {p.tokens_per_s(r) / cluster.world:13.0f} "
                 f"{p.gpu_hours_per_T(r) / 1e3:12.1f}K")
    L.append("")
    L.append(f"{len(plans)} layouts fit, {misfits} valid ones do not"
             + (f"; showing {top}" if len(plans) > top else ""))
    if not plans:
        L.append("verdict: no layout fits; try more GPUs, train.moment_dtype=bfloat16 or a smaller micro-batch")
    return "\n".join(L)


# ---- CLI --------------------------------------------------------------------------------------------
def split_overrides(overrides: list[str]) -> tuple[list[str], dict[str, str]]:
    """(the job's hydra overrides, {cluster key: value})."""
    job, cluster = [], {}
    for o in overrides:
        key, _, value = o.partition("=")
        if key.startswith("cluster."):
            cluster[key[len("cluster."):]] = value
        elif key == "cluster":
            cluster["gpu"] = value
        else:
            job.append(o)
    return job, cluster


def load_job_and_cluster(overrides: list[str]) -> tuple:
    """(JobConfig, Cluster, the keys the job sets): the job's overrides composed as for a run, and the cluster.

    An experiment (conf/experiment/) may carry a `cluster:` section (gpu, nodes, any profile key): it is taken
    out of the composed config before it becomes a JobConfig, and cluster.* on the command line wins. The keys
    the job sets are those on the command line and the train keys of a named experiment."""
    from omegaconf import OmegaConf

    from .config import compose, to_job_config

    job, cl = split_overrides(overrides)
    composed = compose(job)
    given = {o.partition("=")[0].lstrip("+~") for o in job}
    if "cluster" in composed:
        section = OmegaConf.to_container(composed.cluster)
        if not isinstance(section, dict):
            raise ValueError(f"cluster: an experiment's cluster section must be a mapping, got {section!r}")
        cl = {**{k: str(v) for k, v in section.items()}, **cl}
        with open_dict(composed):
            del composed["cluster"]
    for o in job:  # the train keys an experiment sets count as given
        key, _, name = o.partition("=")
        if key.lstrip("+~") == "experiment" and name:
            path = resources.files("moeforge.conf") / "experiment" / f"{name}.yaml"
            if path.is_file():
                import yaml

                train = (yaml.safe_load(path.read_text()) or {}).get("train") or {}
                given |= {f"train.{k}" for k in train}
    return to_job_config(composed), load_cluster(cl), given


def load_plan_config(overrides: list[str]):
    """(JobConfig with plan defaults for the train keys not given, Cluster, the defaults applied)."""
    cfg, cluster, given = load_job_and_cluster(overrides)
    defaults = {"seq_len": cfg.model.max_seq_len, "micro_batch_size": 1, "global_batch_size": TR_BATCH}
    # a key not given, or given as null (train.micro_batch_size=null: "derive it"), takes the plan's default
    defaults = {k: v for k, v in defaults.items() if f"train.{k}" not in given or getattr(cfg.train, k) is None}
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **defaults))
    return cfg, cluster, [f"train.{k}={v}" for k, v in defaults.items()]


def schedule_given(overrides: list[str]) -> bool:
    """Whether the job names its schedule (schedule=... or an experiment that overrides /schedule): the verdict
    then prices that one instead of the fastest that fits."""
    import yaml

    for o in overrides:
        key, _, name = o.partition("=")
        key = key.lstrip("+~")
        if key == "schedule" or key.startswith("schedule."):
            return True
        if key == "experiment" and name:
            path = resources.files("moeforge.conf") / "experiment" / f"{name}.yaml"
            if path.is_file():
                defaults = (yaml.safe_load(path.read_text()) or {}).get("defaults") or []
                if any(isinstance(d, dict) and any("/schedule" in k for k in d) for d in defaults):
                    return True
    return False


def open_dict(node):
    from omegaconf import open_dict as _open_dict

    return _open_dict(node)


def run_plan(args) -> int:
    import gc
    import sys

    # A plan makes ~100k long-lived objects (action lists, numpy's import) and no garbage cycles: the
    # collector's passes over them were ~8% of its run.
    collecting = gc.isenabled()
    gc.disable()
    try:
        cfg, cluster, defaults = load_plan_config(args.overrides)
        if args.search:
            plans, misfits = search(cfg, cluster, args.schedule, args.master_weights)
            print(render_search(plans, misfits, cfg, cluster, args.schedule, args.top))
            return 0 if plans else 1
        chosen = args.schedule or (cfg.schedule.name if schedule_given(args.overrides) else None)
        plan = evaluate(cfg, cluster, chosen=chosen, master=args.master_weights)
    except ValueError as e:
        print(f"moeforge plan: {e}", file=sys.stderr)
        return 2
    finally:
        if collecting:
            gc.enable()
    print(render(plan, defaults))
    return 0 if plan.best.fits else 1


def add_plan_parser(subparsers) -> argparse.ArgumentParser:
    from moeforge.dualpipe.schedule import SCHEDULES

    p = subparsers.add_parser("plan", help="memory, bubble, EP bytes, step time and fit of a layout, before launching")
    p.add_argument("overrides", nargs="*", help="job overrides (model=671b parallel.pp=16 ...) and cluster.gpu=h800 "
                                                "cluster.nodes=N cluster.<key>=value (conf/cluster/)")
    p.add_argument("--search", action="store_true", help="rank the (pp, ep, dp) layouts that fit cluster.nodes")
    p.add_argument("--schedule", choices=SCHEDULES, default=None,
                   help="the schedule of the verdict and the search (default: the fastest that fits)")
    p.add_argument("--master-weights", choices=("sharded", "full"), default="sharded",
                   help="ZeRO-1 shards the FP32 master weights (default), or every rank keeps them "
                        "(parallel/zero.py today)")
    p.add_argument("--top", type=int, default=10, help="--search: rows shown")
    p.set_defaults(fn=run_plan)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moeforge")
    add_plan_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["plan", *(argv if argv is not None else __import__("sys").argv[1:])])
    return args.fn(args)


if __name__ == "__main__":
    raise SystemExit(main())
