"""`moeforge plan`: what a layout costs before anyone spends a GPU hour.

    moeforge plan model=671b parallel.pp=16 parallel.ep=64 cluster.nodes=256 cluster.gpu=h800
    moeforge plan model=671b cluster.nodes=256 cluster.gpu=h800 --search     # rank (pp, ep, dp) layouts

Overrides are the job's own (model=, train.*, parallel.*, fp8=), composed by launcher.config as for a
run, plus cluster.* (gpu, nodes, gpus_per_node and any field of conf/cluster/<gpu>.yaml), split off here.
train.seq_len, train.micro_batch_size and train.global_batch_size default to model.max_seq_len, 1 and TR
§4.2's 15360 sequences when not given. Nothing is built: every number comes from one of
  - model/flops.py: parameters, FLOPs per token and per module (the one place of that arithmetic);
  - model/stages.py stage_layers: which modules each pipeline stage holds (model/split.py's, the runtime's split);
  - dualpipe/schedule.py + simulate.py: the action lists, their makespan and bubble (simulate with
    check=False: the generators' lists pass its checks; tests/unit/test_plan_speed.py), the chunks and
    activation bytes in flight (live_peaks);
  - comm/layout.py: the dispatcher's own send plans, flat or two-hop;
  - conf/cluster/*.yaml: memory, peak FLOP rates, link bandwidths, an efficiency factor.

The model, explicitly (docs/plan.md has the same with the reasons):
  time    a chunk (one micro-batch through one stage) costs FLOPs / (peak x efficiency): FP8 GEMMs at the
          FP8 peak when fp8 is on, the head, gate and attention core at the BF16 peak. F = forward;
          B (input grad) = the matmuls again + 2x the attention core; W (weight grad) = the matmuls again.
          EP all-to-all per MoE layer = max(inter-node bytes / IB, intra-node bytes / NVLink); it adds to
          F and B, except in DualPipe's overlapped F&B, priced max(F+B+W compute, both directions' EP).
          A rank's chunk costs the mean of the stages it holds (DualPipe: two), every chunk is priced as
          the slowest rank's, and p2p between stages = hidden state / link.
          step = the simulator's makespan + the ZeRO-1 reduce-scatter/all-gather over dp and edp (exposed).
  memory  per rank, the stages it holds (DualPipe: two, so 2x parameters): BF16 weights, FP32 grads,
          FP32 master weights (ZeRO-1 shards them with the moments; --master-weights full keeps them
          whole, as parallel/zero.py does today), AdamW moments (train.moment_dtype) over dp (dense) and
          edp (experts); plus the activations of the chunks in flight (activation_bytes_per_token).
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
    name: str
    nodes: int = 1
    gpus_per_node: int = 8
    memory_gib: float = 80.0
    reserved_gib: float = 4.0
    bf16_tflops: float = 989.4
    fp8_tflops: float = 1978.9
    nvlink_gbps: float = 160.0
    ib_gbps: float = 50.0
    efficiency: float = 0.6

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node


def load_cluster(values: dict[str, str]) -> Cluster:
    """conf/cluster/<gpu>.yaml with cluster.<key>=value overrides (values as strings, typed by the field)."""
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
    for k, v in values.items():
        if k not in types:
            raise ValueError(f"cluster.{k}: unknown key; known: {sorted(types)} and gpu")
        try:
            base[k] = int(v) if types[k] == "int" else float(v) if types[k] == "float" else v
        except ValueError:
            raise ValueError(f"cluster.{k}={v!r}: expected {types[k]}") from None
    c = Cluster(**base)
    if c.nodes < 1 or c.gpus_per_node < 1 or c.efficiency <= 0 or c.efficiency > 1:
        raise ValueError(f"cluster: need nodes, gpus_per_node >= 1 and 0 < efficiency <= 1, got {c}")
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


# ---- activations ------------------------------------------------------------------------------------
def activation_bytes_per_token(args, fqn: str, fp8: bool) -> float:
    """Bytes one token leaves for the backward in module `fqn` (embed, layers.<i>, norm, head, mtp.<k>).

    Saved, per block: the residual stream at both norms (BF16; the norms and the MLA up-projections
    are recomputed in backward, TR §3.4, so q, k, v and the norm outputs are not kept); every Linear's
    input (FP8 + one FP32 scale per 128 with fp8 on, TR §3.3: wq_a/wkv_a, wq_b, wkv_b, the experts' and
    shared experts' w1/w3, SwiGLU's two inputs cached for w2, whose input is recomputed); the
    compressed q and kv (BF16); the attention output (wo's input, E5M6 = 1.5 bytes with fp8 on, TR
    §3.3.3) and its log-sum-exp (FP32 per head); the router's scores (FP32, E) and top-K weights and ids.
    A routed token is kept once per expert it picked (K copies, as the dispatcher groups rows by expert);
    an expert's output is not kept (the gate-weight grad comes from w2's input and its grad). The head
    keeps its input and the logits (BF16; a fused cross-entropy would keep none). BF16 = 2 bytes.
    """
    a, bf = args, 2.0
    lin = 1 + 4 / 128 if fp8 else bf
    o = 1.5 if fp8 else bf

    def block(layer_id: int) -> float:
        H = a.n_heads
        x = bf * a.dim + lin * a.dim + bf * (a.kv_lora_rank + a.qk_rope_head_dim) + lin * a.kv_lora_rank
        x += (bf + lin) * a.q_lora_rank + o * H * a.v_head_dim + 4 * H
        x += bf * a.dim  # ffn_norm input
        if not a.is_moe_layer(layer_id):
            return x + lin * (a.dim + 2 * a.inter_dim)
        x += 4 * a.n_routed_experts + 12 * a.n_activated_experts
        x += a.n_activated_experts * lin * (a.dim + 2 * a.moe_inter_dim)
        if a.n_shared_experts:
            x += lin * (a.dim + 2 * a.n_shared_experts * a.moe_inter_dim)
        return x

    head = bf * (a.dim + a.vocab_size)
    if fqn == "embed":
        return 0.0
    if fqn == "norm":
        return bf * a.dim
    if fqn == "head":
        return head
    kind, i = fqn.split(".")
    if kind == "layers":
        return block(int(i))
    return 2 * bf * a.dim + lin * 2 * a.dim + block(a.n_layers + int(i)) + bf * a.dim + head  # mtp.<k>


# ---- stages -----------------------------------------------------------------------------------------
@dataclass
class Stage:
    fqns: list
    dense: int = 0  # parameters
    expert: int = 0  # routed-expert parameters, all of them (a rank holds 1/ep)
    fp8_flops: float = 0.0  # forward matmul FLOPs per token that run as FP8 GEMMs (with fp8 on)
    bf16_flops: float = 0.0  # forward matmul FLOPs per token at BF16 (head, gate; everything with fp8 off)
    attn_flops: float = 0.0  # forward attention-core FLOPs per token
    moe_layers: int = 0
    act: float = 0.0  # activation bytes per token


def build_stages(args, n_stages: int, seq_len: int, fp8: bool) -> list[Stage]:
    """Per stage of model.stages.stage_layers (the split the runtime uses): params, forward FLOPs per
    token, activations per token."""
    from moeforge.model.flops import attention_flops_per_token, parts
    from moeforge.model.stages import stage_layers

    attn = attention_flops_per_token(args, seq_len)
    by_fqn: dict[str, list] = {}
    for p in parts(args):
        by_fqn.setdefault(p.fqn, []).append(p)
    split = stage_layers(args, n_stages)
    stages = []
    for fqns in split:
        s = Stage(fqns)
        for f in fqns:
            for p in by_fqn[f]:
                if p.is_expert:
                    s.expert += p.params
                else:
                    s.dense += p.params
                if p.fp8 and fp8:
                    s.fp8_flops += 2 * p.matmul
                else:
                    s.bf16_flops += 2 * p.matmul
            s.attn_flops += attn if f.startswith(("layers.", "mtp.")) else 0
            s.moe_layers += any(p.name == "routed" for p in by_fqn[f])
            s.act += activation_bytes_per_token(args, f, fp8)
        stages.append(s)
    return stages


# ---- one layout -------------------------------------------------------------------------------------
@dataclass
class ScheduleResult:
    name: str
    error: str | None = None  # why the schedule cannot run this layout
    makespan: float = 0.0  # seconds: the pipeline part of a step
    bubble: float = 0.0  # seconds: the largest bubble of any rank
    sync: float = 0.0  # seconds: ZeRO-1 reduce-scatter + all-gather after the pipeline
    peak_chunks: int = 0  # most micro-batch-stages in flight on one rank
    stages_per_rank: int = 1
    memory: dict = field(default_factory=dict)  # GiB on the fullest rank: weights, grads, master, moments, activations
    memory_by_rank: list = field(default_factory=list)  # the same for every pp rank (moeforge dryrun compares one)
    rank: int = 0  # the fullest rank
    chunk: dict = field(default_factory=dict)  # seconds per chunk, slowest rank: F_c B_c W_c ep_fwd ep_bwd p2p
    blocks: list = field(default_factory=list)  # transformer blocks per stage
    fits: bool = False

    @property
    def step(self) -> float:
        return self.makespan + self.sync

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
    """One schedule on one layout: chunk costs, makespan and bubble, ZeRO-1 sync, memory of the fullest rank."""
    from moeforge.dualpipe.schedule import stage_placement, validate
    from moeforge.dualpipe.simulate import Costs, bubble_formula, live_peaks, simulate

    res = ScheduleResult(name)
    try:
        validate(name, L.pp, L.n_micro)
    except ValueError as e:
        res.error = str(e).split(": ", 1)[-1]
        return res
    cfg, cl, a, tokens = L.cfg, L.cluster, L.cfg.model, L.tokens
    S, placement = len(stages), stage_placement(name, L.pp)
    res.blocks = [sum(f.startswith("layers.") for f in s.fqns) for s in stages]
    p8 = (cl.fp8_tflops if cfg.fp8.enabled else cl.bf16_tflops) * 1e12 * cl.efficiency
    p16 = cl.bf16_tflops * 1e12 * cl.efficiency
    per_stage = []
    for s in stages:
        mm = s.fp8_flops / p8 + s.bf16_flops / p16
        per_stage.append({"F_c": tokens * (mm + s.attn_flops / p16), "B_c": tokens * (mm + 2 * s.attn_flops / p16),
                          "W_c": tokens * mm, "ep_fwd": s.moe_layers * tr.time(EVENTS_FWD, tokens, cl),
                          "ep_bwd": s.moe_layers * tr.time(EVENTS_BWD, tokens, cl)})
    # A rank runs as many chunks of each stage it holds: its chunk costs the mean of its stages.
    per = [{k: sum(per_stage[s][k] for s in held) / len(held) for k in per_stage[0]} for held in placement]
    work = [c["F_c"] + c["B_c"] + c["W_c"] for c in per]
    p2p_bw = (cl.nvlink_gbps if cl.world <= cl.gpus_per_node else cl.ib_gbps) * 1e9
    res.chunk = dict(max(per, key=lambda c: c["F_c"] + c["B_c"] + c["W_c"]),
                     p2p=tokens * a.dim * 2 / p2p_bw if L.pp > 1 else 0.0,
                     imbalance=max(work) / (sum(work) / len(work)))
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
    moment = 2 if cfg.train.moment_dtype == "bfloat16" else 4
    # ZeRO-1 after the pipeline: reduce-scatter the FP32 grads and all-gather the updated weights (BF16, or
    # the FP32 buffer when every rank keeps it), over dp (dense) and edp (experts); IB once a group spans nodes
    gather = 2 if L.master == "sharded" else 4
    sync_bw = (cl.ib_gbps if L.dp > cl.gpus_per_node else cl.nvlink_gbps) * 1e9
    for r, held in enumerate(placement):
        dense = sum(stages[s].dense for s in held)
        if sum("embed" in stages[s].fqns for s in held) > 1:  # one nn.Embedding serves both (model/split.py)
            dense -= a.vocab_size * a.dim
        expert = sum(stages[s].expert for s in held) / L.ep
        shard = dense / L.dp + expert / edp
        mem = {"weights (BF16)": 2 * (dense + expert), "grads (FP32)": 4 * (dense + expert),
               "master (FP32)": 4 * (shard if L.master == "sharded" else dense + expert),
               f"moments ({'BF16' if moment == 2 else 'FP32'})": 2 * moment * shard,
               "activations": peaks[r][1]}
        mem = {k: v / GiB for k, v in mem.items()}
        res.memory_by_rank.append(mem)
        if not res.memory or sum(mem.values()) > res.total_gib:
            res.rank, res.memory, res.stages_per_rank = r, mem, len(held)
        sync = ((L.dp - 1) / L.dp * dense + (edp - 1) / edp * expert) * (4 + gather) / sync_bw
        res.sync = max(res.sync, sync)
    res.fits = res.total_gib <= cl.memory_gib - cl.reserved_gib
    return res


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
    stages = {S: build_stages(a, S, t.seq_len, cfg.fp8.enabled) for S in {num_stages(n, par.pp) for n in names}}
    results = {n: _price_schedule(n, L, stages[num_stages(n, par.pp)], traffic[mode]) for n in names}
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
    ch = r.chunk
    L += ["", f"one chunk = {p.tokens_per_chunk} tokens through a stage of the slowest rank (its work is "
              f"{ch['imbalance']:.2f}x the mean rank's), at {cl.efficiency:g} of peak (ms)",
          f"  compute F {_n(ch['F_c'] * 1e3)}  B {_n(ch['B_c'] * 1e3)}  W {_n(ch['W_c'] * 1e3)} | EP all-to-all "
          f"fwd {_n(ch['ep_fwd'] * 1e3)}  bwd {_n(ch['ep_bwd'] * 1e3)} | p2p {_n(ch['p2p'] * 1e3)}"]
    L += ["", "schedule    bubble s  bubble %  step s  in flight  stages/rank  memory GiB  fits"]
    for s in p.schedules.values():
        if s.error:
            L.append(f"{s.name:<11} n/a: {s.error}")
            continue
        L.append(f"{s.name:<11} {_n(s.bubble):>8}  {100 * s.bubble / s.makespan:7.1f}%  {_n(s.step):>6}  "
                 f"{s.peak_chunks:9d}  {s.stages_per_rank:11d}  {_n(s.total_gib):>10}  {'yes' if s.fits else 'NO'}")
    usable = cl.memory_gib - cl.reserved_gib
    L += ["", f"memory per GPU, {r.name}, rank {r.rank} (the fullest; ZeRO-1 master weights {p.master}) GiB"]
    L += [f"  {k:<18} {_n(v):>6}" for k, v in r.memory.items()]
    L.append(f"  {'total':<18} {_n(r.total_gib):>6} of {_n(usable)} usable "
             f"({cl.memory_gib:g} - {cl.reserved_gib:g} reserved)")
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
              f"+ ZeRO-1 sync {_n(r.sync)} s",
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


def load_plan_config(overrides: list[str]):
    """(JobConfig with plan defaults for the train keys not given, Cluster, the defaults applied)."""
    from .config import load_job_config

    job, cl = split_overrides(overrides)
    cfg = load_job_config(job)
    given = {o.partition("=")[0].lstrip("+~") for o in job}
    defaults = {"seq_len": cfg.model.max_seq_len, "micro_batch_size": 1, "global_batch_size": TR_BATCH}
    # a key not given, or given as null (train.micro_batch_size=null: "derive it"), takes the plan's default
    defaults = {k: v for k, v in defaults.items() if f"train.{k}" not in given or getattr(cfg.train, k) is None}
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **defaults))
    return cfg, load_cluster(cl), [f"train.{k}={v}" for k, v in defaults.items()]


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
        plan = evaluate(cfg, cluster, chosen=args.schedule, master=args.master_weights)
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
