"""AllToAllDispatcher: expert-parallel dispatch and combine over `dist.all_to_all_single` (TR §3.2.2).

    x_RD, ctx = disp.dispatch_async(x_ND, indices_NK, weights_NK).wait()   # tokens -> expert ranks
    y_RD = disp.compute(x_RD, ctx, experts)                                # local experts, gate-weighted
    y_ND = disp.combine_async(y_RD, ctx).wait()                            # back to the tokens' ranks
`disp(x_ND, indices_NK, weights_NK, experts)` runs the three in a row (MoE's Dispatcher protocol).

Dispatch is a linear map D from this rank's N token rows to the R rows it receives: one hop (flat) or
two (two-hop), each hop "gather rows by destination, all_to_all_single with uneven splits". A row
reaches each destination rank once, carrying its K gate weights and global expert ids; the receiver
runs the copies of its local experts and sums them (weighted) into one output row. Combine is D's
transpose: the reverse all-to-alls, with the gathers turned into sums (at the relay too, so two-hop
combine also crosses the inter-node link once per node). So autograd is the same two maps swapped:
dispatch backward = D^T on the gradients, combine backward = D on the gradients.

On the wire every row is bytes (uint8): [x | gate weights fp32 | expert ids int32] in one collective
per hop. With fp8=True, x travels as E4M3 in 1x128 tiles with power-of-2 scales (fp8.reference's
dispatch payload; E4M3 bits + fp32 scales) in both payloads that move in the dispatch direction, the
activations (dispatch forward) and the activation gradients before the down-projection (combine
backward), as TR §3.3.2 does; the combine forward and the dispatch backward stay in the activation
dtype (BF16 on GPU, FP32/FP64 on CPU), and every sum runs in at least FP32. Quantization is treated as
identity in backward (straight-through).

Host reads. The only host read of an exchange is the split sizes: per hop, ONE `model.host.routing_counts`
of the [P, 1 (+E/P)] counts this rank sends and receives (rows per rank; on the last hop also the
(row, expert) pairs per expert of the receiver, its grouped-GEMM sizes, as DeepEP and Megatron exchange
tokens_per_expert), exchanged in one all_to_all_single. Send orders and expert groupings are
static-shape device ops sliced by those host counts (comm/layout.py). Flat dispatch: one read; two-hop:
two (the relay's hop is planned from the rows the first hop brought). Combine and both backwards replay
the plan: no host read.

Async and overlap. Every dispatch/combine is a `Handle`: starting it submits the exchange (a program,
comm/streams.py) to the dispatcher's comm stream (one per model: apply_ep shares it between the layers;
a thread on gloo, a CUDA stream driven from the main thread on NCCL); `wait()` returns its result. A
pipeline runtime overlapping two micro-batches (the DualPipe F&B pair) does, per MoE layer:
    h = disp.dispatch_async(x_ND, idx, w)     # micro-batch A's tokens start moving
    ...compute micro-batch B's attention / backward chunk...; stream.progress()
    x_RD, ctx = h.wait()
    y_RD = disp.compute(x_RD, ctx, experts)
    h = disp.combine_async(y_RD, ctx)
    ...compute B...; stream.progress()
    y_ND = h.wait()
In backward the reverse all-to-all starts in the backward of `wait()`'s autograd node and is only
waited for in the backward of the start node, so whatever backward work autograd (or a runtime that
splits backward, such as DualPipe's B/W) runs between the two overlaps with it.
Rules: every rank of the ep group must start its handles in the same order (the stream issues their
collectives in that order); a handle is waited exactly once; while a handle is in flight the caller
issues no other collective on the ep group (all dispatchers of a model share one stream: apply_ep).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from moeforge.model.combine import weighted_sum_rows
from moeforge.model.host import routing_counts
from moeforge.model.moe import run_experts

from .counters import ByteCounters
from .layout import (EPTopology, dest_rank_mask, group_by_expert, hop_counts, send_order, two_hop_first_mask,
                     two_hop_second_mask, uniform_flat_counts, uniform_two_hop_counts)
from .streams import CommStream, ThreadCommStream

FP8_TILE = 128


class RowFormat:
    """A packed row: named fields of (dtype, columns), laid side by side as bytes; `part` tags each field
    for the byte counters ('x' or 'meta')."""

    def __init__(self, *fields: tuple[str, torch.dtype, int, str]):
        self.fields = fields
        self.widths = [torch.empty(0, dtype=dt).element_size() * n for _, dt, n, _ in fields]

    @property
    def part_bytes(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for (_, _, _, part), w in zip(self.fields, self.widths):
            out[part] = out.get(part, 0) + w
        return out

    def pack(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        cols = [tensors[name].contiguous().view(torch.uint8) for name, _, _, _ in self.fields]  # [R, bytes_i]
        return torch.cat(cols, dim=1) if len(cols) > 1 else cols[0]

    def unpack(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        out, c = {}, 0
        for (name, dt, _, _), w in zip(self.fields, self.widths):
            # a fresh copy: a view of `rows` may start at an offset the field dtype cannot be viewed from
            out[name] = rows[:, c:c + w].clone(memory_format=torch.contiguous_format).view(dt)  # [R, n_i]
            c += w
        return out


@dataclass
class Hop:
    """One all-to-all: the sender sends rows[src_rows] (grouped by destination, send[p] to rank p) and
    receives recv[p] rows from rank p. The transpose sends `recv` back and sums into n_src rows."""

    src_rows: torch.Tensor
    send: list[int]
    recv: list[int]
    n_src: int


@dataclass
class Plan:
    """The routing of one dispatch, shared by its four autograd nodes: the hops (combine reverses
    them), the received rows' global expert ids and the pairs per local expert (host ints, from the
    last hop's count exchange). Holds no autograd tensors."""

    x_dtype: torch.dtype
    hops: list[Hop] = field(default_factory=list)
    expert_ids_RK: torch.Tensor | None = None
    expert_counts: list[int] | None = None


@dataclass
class EPContext:
    """What a dispatch leaves for compute and combine: the received rows' gate weights (autograd-linked
    to the sender's weights_NK) and the plan."""

    weights_RK: torch.Tensor
    plan: Plan

    @property
    def expert_ids_RK(self) -> torch.Tensor:
        return self.plan.expert_ids_RK


class _Runner:
    """One exchange slot of a handle: started on the stream, finished (waited) once. Dispatch and combine
    reuse theirs in backward (the reverse exchange starts in one node's backward, ends in another's)."""

    def __init__(self, stream: CommStream):
        self.stream = stream
        self.job = None  # the stream's job while the exchange is in flight
        self.y_dtype: torch.dtype | None = None  # combine: the dtype of the expert outputs

    def start(self, program, inputs: tuple[torch.Tensor, ...]) -> None:
        assert self.job is None, "an exchange is already in flight on this handle"
        self.job = self.stream.submit(program, inputs)

    def finish(self):
        job, self.job = self.job, None
        return self.stream.wait(job)


class Handle:
    """An exchange in flight: `wait()` blocks and returns the result."""

    def __init__(self, finish):
        self._finish, self._done = finish, False

    def wait(self):
        assert not self._done, "Handle.wait() called twice"
        self._done = True
        return self._finish()


class AllToAllDispatcher:
    """Expert-parallel dispatcher over `group` (this rank is `ep_rank` of `ep_size`); ep rank r owns the
    global experts [r·E/ep, (r+1)·E/ep). `ranks_per_node` (global ranks per node; None = one node) sets
    the link classes and the two-hop relays. Exchanges run on `stream` (comm.streams; a new
    ThreadCommStream if None, the CPU/gloo one); the dispatchers of one model share one (parallel.apply_ep)."""

    def __init__(self, group: dist.ProcessGroup | None, ep_rank: int, ep_size: int, n_experts: int,
                 ranks_per_node: int | None = None, two_hop: bool = False, fp8: bool = False,
                 counters: ByteCounters | None = None, stream: CommStream | None = None):
        ranks = dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
        assert len(ranks) == ep_size and dist.get_rank(group) == ep_rank, \
            f"group ranks {ranks} do not match {ep_rank=}, {ep_size=} (this is global rank {dist.get_rank()})"
        self.group, self.ep_rank, self.ep_size = group, ep_rank, ep_size
        self.topo = EPTopology.from_ranks(ranks, n_experts, ranks_per_node)
        if two_hop:
            self.topo.check_two_hop()
        self.two_hop, self.fp8 = two_hop, fp8
        self.counters = counters if counters is not None else ByteCounters()
        self.links = [self.topo.link(ep_rank, p) for p in range(ep_size)]
        self.expert_range = self.topo.expert_range(ep_rank)
        self.stream = stream if stream is not None else ThreadCommStream()

    def __repr__(self) -> str:
        return (f"AllToAllDispatcher(ep_rank={self.ep_rank}, ep_size={self.ep_size}, experts={self.expert_range}, "
                f"nodes={self.topo.n_nodes}, two_hop={self.two_hop}, fp8={self.fp8})")

    # ---- the Dispatcher protocol ---------------------------------------------------------------------
    def __call__(self, x_ND: torch.Tensor, indices_NK: torch.Tensor, weights_NK: torch.Tensor,
                 experts: nn.ModuleDict) -> torch.Tensor:
        x_RD, ctx = self.dispatch_async(x_ND, indices_NK, weights_NK).wait()
        return self.combine_async(self.compute(x_RD, ctx, experts), ctx).wait()

    def dispatch_async(self, x_ND: torch.Tensor, indices_NK: torch.Tensor, weights_NK: torch.Tensor) -> Handle:
        """Start sending the tokens to the ranks of their experts; `.wait()` -> (x_RD, EPContext)."""
        plan, runner = Plan(x_dtype=x_ND.dtype), _Runner(self.stream)
        token = _DispatchStart.apply(x_ND, weights_NK, indices_NK, self, plan, runner)

        def finish():
            x_RD, w_RK = _DispatchWait.apply(token, self, plan, runner)
            return x_RD, EPContext(w_RK, plan)

        return Handle(finish)

    def compute(self, x_RD: torch.Tensor, ctx: EPContext, experts: nn.ModuleDict) -> torch.Tensor:
        """Each received row through its local experts, weighted and summed: y_RD. `experts` is keyed by
        global expert id; model.moe.run_experts runs them (a loop, or one grouped call when installed)."""
        lo, hi = self.expert_range
        counts = ctx.plan.expert_counts  # host ints from the dispatch's count exchange
        row, slot = group_by_expert(ctx.expert_ids_RK, lo, hi, sum(counts))
        xs = x_RD[row]  # [M, D] copies grouped by local expert; stays linked to x_RD even when M = 0
        ys = run_experts(experts, xs, counts, first=lo)
        return weighted_sum_rows(ys, ctx.weights_RK.flatten()[slot], row, x_RD)  # keeps ys, not ys x weights

    def combine_async(self, y_RD: torch.Tensor, ctx: EPContext) -> Handle:
        """Start returning the expert outputs to the tokens' ranks; `.wait()` -> y_ND (summed over experts)."""
        runner = _Runner(self.stream)
        token = _CombineStart.apply(y_RD, self, ctx.plan, runner)
        return Handle(lambda: _CombineWait.apply(token, self, ctx.plan, runner))

    # ---- formats -------------------------------------------------------------------------------------
    def _x_fields(self, dtype: torch.dtype, D: int, fp8: bool) -> list[tuple]:
        if fp8:
            return [("q", torch.uint8, D, "x"), ("s", torch.float32, -(-D // FP8_TILE), "x")]
        return [("x", dtype, D, "x")]

    def _encode_x(self, x: torch.Tensor, fp8: bool) -> dict[str, torch.Tensor]:
        if fp8:
            from moeforge.fp8.reference import quantize_for_dispatch
            q, s = quantize_for_dispatch(x, FP8_TILE)
            return {"q": q, "s": s}
        return {"x": x}

    def _decode_x(self, f: dict[str, torch.Tensor], dtype: torch.dtype, fp8: bool) -> torch.Tensor:
        if fp8:
            from moeforge.fp8.reference import dequantize_from_dispatch
            return dequantize_from_dispatch(f["q"], f["s"], FP8_TILE, dtype)
        return f["x"]

    # ---- collectives ---------------------------------------------------------------------------------
    def _plan_hop(self, mask_RP: torch.Tensor, ids_RK: torch.Tensor, last: bool, uniform):
        """Program step: plan one hop. Exchanges the hop's counts (hop_counts: rows per rank, and on the
        last hop the pairs per receiver expert) in one all_to_all_single, queues the static-shape send
        order, yields (the host read is next), then reads sent and received counts together: the hop's
        one host read. Returns (Hop, pairs per local expert or None). `uniform()` is the dry run's
        stand-in for the read (comm.layout.uniform_*_counts: evenly spread routing)."""
        counts = hop_counts(mask_RP, ids_RK, self.topo, per_expert=last)  # [P, C] int64
        got = torch.empty_like(counts)
        self.counters.record_a2a("dispatch_fwd", self.links, [1] * self.ep_size, {"counts": 8 * counts.size(1)})
        dist.all_to_all_single(got, counts, group=self.group)
        order = send_order(mask_RP)
        yield
        sent, recv = routing_counts(torch.stack([counts, got]), uniform)
        send = [c[0] for c in sent]
        experts = [sum(c[1 + e] for c in recv) for e in range(self.topo.experts_per_rank)] if last else None
        return Hop(order[:sum(send)], send, [c[0] for c in recv], mask_RP.size(0)), experts

    def _a2a(self, rows: torch.Tensor, send: list[int], recv: list[int], event: str, fmt: RowFormat) -> torch.Tensor:
        """One all_to_all_single of packed rows (ordered on the current stream: the thread blocks on
        gloo; on NCCL the comm stream waits for it, the host does not)."""
        out = rows.new_empty(sum(recv), rows.size(1))
        self.counters.record_a2a(event, self.links, send, fmt.part_bytes)
        dist.all_to_all_single(out, rows.contiguous(), recv, send, group=self.group)
        return out

    def _forward_map(self, rows_N: torch.Tensor, ids_NK: torch.Tensor | None, plan: Plan, fmt: RowFormat,
                     event: str):
        """D: rows_N -> received rows, hop by hop. With ids_NK the hops are planned (dispatch forward,
        one host read per hop); without, plan.hops are replayed (combine backward, none)."""
        rows = rows_N
        n_hops = 2 if self.two_hop else 1
        for i in range(n_hops):
            if ids_NK is not None:
                N, K, me = ids_NK.size(0), ids_NK.size(1), self.ep_rank
                if not self.two_hop:
                    mask, ids = dest_rank_mask(ids_NK, self.topo), ids_NK
                    uniform = lambda: uniform_flat_counts(N, K, self.topo, me)  # noqa: E731
                else:  # hop 2 at the relay: read each received row's expert ids, forward inside the node
                    ids = ids_NK if i == 0 else fmt.unpack(rows)["ids"].long()
                    mask = (two_hop_first_mask(ids, self.topo, me) if i == 0
                            else two_hop_second_mask(ids, self.topo, me))
                    uniform = lambda i=i: uniform_two_hop_counts(N, K, self.topo, me, i)  # noqa: E731
                hop, experts = yield from self._plan_hop(mask, ids, last=i == n_hops - 1, uniform=uniform)
                plan.hops.append(hop)
                if experts is not None:
                    plan.expert_counts = experts
            hop = plan.hops[i]
            rows = self._a2a(rows[hop.src_rows], hop.send, hop.recv, event, fmt)
        return rows

    def _transpose_map(self, fields: dict[str, torch.Tensor], plan: Plan, fmt: RowFormat, event: str):
        """D^T: received-side rows -> token rows, the hops reversed, copies summed (in >= fp32)."""
        for hop in reversed(plan.hops):
            out = self._a2a(fmt.pack(fields), hop.recv, hop.send, event, fmt)
            fields = {name: _sum_rows(t, hop.src_rows, hop.n_src) for name, t in fmt.unpack(out).items()}
        return fields

    # ---- the four exchanges: programs (comm.streams) run by _Runner ----------------------------------
    # Generators all; the two that only replay the plan never pause (`yield from ()`: no host read).
    def _dispatch_fwd(self, x_ND, w_NK, ids_NK, plan: Plan):
        D, K = x_ND.size(1), ids_NK.size(1)
        fmt = RowFormat(*self._x_fields(x_ND.dtype, D, self.fp8), ("w", torch.float32, K, "meta"),
                        ("ids", torch.int32, K, "meta"))
        rows = fmt.pack({**self._encode_x(x_ND, self.fp8), "w": w_NK.float(), "ids": ids_NK.int()})
        f = fmt.unpack((yield from self._forward_map(rows, ids_NK, plan, fmt, "dispatch_fwd")))
        return self._decode_x(f, x_ND.dtype, self.fp8), f["w"], f["ids"].long()

    def _dispatch_bwd(self, gx_RD, gw_RK, plan: Plan):
        yield from ()
        fmt = RowFormat(("x", plan.x_dtype, gx_RD.size(1), "x"), ("w", torch.float32, gw_RK.size(1), "meta"))
        f = self._transpose_map({"x": gx_RD.to(plan.x_dtype), "w": gw_RK.float()}, plan, fmt, "dispatch_bwd")
        return f["x"], f["w"]

    def _combine_fwd(self, y_RD, plan: Plan):
        yield from ()
        fmt = RowFormat(("x", y_RD.dtype, y_RD.size(1), "x"))
        return self._transpose_map({"x": y_RD}, plan, fmt, "combine_fwd")["x"]

    def _combine_bwd(self, gy_ND, y_dtype, plan: Plan):
        fmt = RowFormat(*self._x_fields(y_dtype, gy_ND.size(1), self.fp8))
        rows = fmt.pack(self._encode_x(gy_ND.to(y_dtype), self.fp8))
        f = fmt.unpack((yield from self._forward_map(rows, None, plan, fmt, "combine_bwd")))
        return self._decode_x(f, y_dtype, self.fp8)


def _sum_rows(t: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    acc = torch.promote_types(t.dtype, torch.float32)
    return torch.zeros(n, t.size(1), dtype=acc, device=t.device).index_add_(0, index, t.to(acc)).to(t.dtype)


# ---- autograd: each exchange is a start node and a wait node, so backward overlaps like forward. ------
# The start node's output is an empty "token" that only orders the two nodes in the graph; the nodes
# hold the Plan and the runner, never an output tensor (no reference cycles through grad_fn).
def _empty_like(meta: tuple[torch.dtype, torch.device]) -> torch.Tensor:
    return torch.empty(0, dtype=meta[0], device=meta[1])


class _DispatchStart(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND, w_NK, ids_NK, disp, plan, runner):
        ctx.runner = runner
        runner.start(disp._dispatch_fwd(x_ND, w_NK, ids_NK, plan), (x_ND, w_NK, ids_NK))
        return x_ND.new_empty(0)

    @staticmethod
    def backward(ctx, _):
        gx_ND, gw_NK = ctx.runner.finish()  # D^T, started by _DispatchWait.backward
        return gx_ND, gw_NK, None, None, None, None


class _DispatchWait(torch.autograd.Function):
    @staticmethod
    def forward(ctx, token, disp, plan, runner):
        ctx.disp, ctx.plan, ctx.runner, ctx.token = disp, plan, runner, (token.dtype, token.device)
        x_RD, w_RK, plan.expert_ids_RK = runner.finish()
        return x_RD, w_RK

    @staticmethod
    def backward(ctx, gx_RD, gw_RK):
        ctx.runner.start(ctx.disp._dispatch_bwd(gx_RD, gw_RK, ctx.plan), (gx_RD, gw_RK))
        return _empty_like(ctx.token), None, None, None


class _CombineStart(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_RD, disp, plan, runner):
        ctx.runner = runner
        runner.y_dtype = y_RD.dtype
        runner.start(disp._combine_fwd(y_RD, plan), (y_RD,))
        return y_RD.new_empty(0)

    @staticmethod
    def backward(ctx, _):
        return ctx.runner.finish(), None, None, None  # D, started by _CombineWait.backward


class _CombineWait(torch.autograd.Function):
    @staticmethod
    def forward(ctx, token, disp, plan, runner):
        ctx.disp, ctx.plan, ctx.runner, ctx.token = disp, plan, runner, (token.dtype, token.device)
        return runner.finish()

    @staticmethod
    def backward(ctx, gy_ND):
        ctx.runner.start(ctx.disp._combine_bwd(gy_ND, ctx.runner.y_dtype, ctx.plan), (gy_ND,))
        return _empty_like(ctx.token), None, None, None
