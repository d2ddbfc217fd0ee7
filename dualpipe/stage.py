"""How the runtime runs one chunk (one stage on one micro-batch): forward in pieces, backward split in B and W.

Pieces. A chunk's forward is cut into pieces whose autograd graphs touch only at their boundaries:
    embedding | block | block | ... | main-head loss | MTP input | MTP block | MTP loss | total loss
and, where a MoE layer's dispatcher is asynchronous (`dispatch_async`, comm.AllToAllDispatcher), the
block into the report's four parts (TR §3.2.1, Figure 4):
    ATTN (attention, gate, dispatch started) | MLP (dispatch waited, experts, combine started) | COMBINE
    (shared expert, then combine waited: the shared expert computes under the combine all-to-all)
A boundary is either a detached leaf (`x.detach().requires_grad_()`: the producer's output, the
consumer's input) or, for an all-to-all in flight, a cut autograd edge: the consumer's `handle.wait()`
node keeps its edge into the producer's start node, and the consumer's backward stops there
(`torch.autograd.grad(..., inputs=[GradientEdge])`); `Chunk.link` makes the same kind of boundary for a tensor
that no piece may hold (a recomputed norm output, model/recompute.py). So the backward also runs piece by piece, and
between the backward of COMBINE (the reverse combine all-to-all starts in its wait node's backward)
and the backward of MLP (the start node's backward waits for it) the runtime may run other work; the
same holds between MLP and ATTN for the reverse dispatch. Forward and backward are generators that
`yield` exactly while one of their all-to-alls is in flight; `interleave(fwd, bwd)` alternates them:
that is the overlapped F&B of DualPipe. The forward also yields once before its first piece, so the
backward goes first and each all-to-all is hidden behind a whole piece of the other chunk, the
attention pieces included (TR Figure 4):
    computes:   B COMBINE_bwd | F ATTN    | B MLP_bwd  | F MLP      | B ATTN_bwd, COMBINE_bwd | F COMBINE, ATTN
    in flight:  -             | B combine | F dispatch | B dispatch | F combine               | B combine  ...
(forward first, the pair would end with the backward's last dispatch behind the forward's small
COMBINE piece, which hides less of it: docs/dualpipe.md "Measured overlap"). With a synchronous dispatcher (ep = 1) nothing yields and the
pair runs one after the other.

B and W (zero-bubble split, Qi et al. 2023). B computes, piece by piece, the gradients of the piece's
inputs only. Before that it finds, in the piece's graph, the *frontier* nodes: nodes on the path from
the outputs to the inputs with an edge into a subgraph that leads only to parameters (a Linear's mm
node, whose weight edge goes to TBackward -> AccumulateGrad). A pre-hook records the gradient flowing
into each frontier node during B. W then re-runs only the frontier nodes' weight edges from those
recorded gradients (`torch.autograd.grad(GradientEdge(node, i) -> params)`, one call per group of
parameters that share frontier nodes) and adds the result to `.grad`. Outputs that do not depend on
any input (the embedding piece: token ids have no gradient) are deferred to W whole. This is the
algorithm of torch.distributed.pipelining's `stage_backward_input/weight`, written here so that it
handles the edge cuts, the token inputs and the piece boundaries; W never runs a collective.

Every piece names its parameters explicitly (a piece must never ask autograd for a parameter that is
only reachable through a cut edge: autograd would run the producer's nodes to get there).
State lives in `Chunk` objects owned by the runtime; nothing here is global.
"""
from __future__ import annotations

from collections.abc import Callable, Generator, Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.autograd.graph import GradientEdge, get_gradient_edge

from moeforge.model.moe import MoE
from moeforge.model.recompute import policy_of, region, scope


def _edge(t) -> GradientEdge:
    return t if isinstance(t, GradientEdge) else get_gradient_edge(t)


def _key(e: GradientEdge) -> tuple[int, int]:
    return id(e.node), e.output_nr


class Piece:
    """A contiguous part of one chunk's autograd graph.

    ins: boundary inputs (detached leaves, or cut edges into the previous piece); in_src[i] is the
    (piece index, out index) that receives ins[i]'s gradient, or None for the chunk's own input.
    outs: tensors/edges whose gradient comes from later pieces (or the loss seed); out_grads sums them.
    """

    def __init__(self, index: int, params: Sequence[torch.Tensor], name: str):
        self.index, self.name = index, name
        self.params = [p for p in params if p.requires_grad]
        self.ins: list = []
        self.in_src: list[tuple[int, int] | None] = []
        self.outs: list = []
        self.out_grads: list[torch.Tensor | None] = []
        self.cut = False  # an input is a cut edge: the backward of this piece leaves an all-to-all in flight
        self.weight_job: WeightJob | None = None

    def add_out(self, t) -> int:
        for i, o in enumerate(self.outs):
            if o is t:
                return i
        self.outs.append(t)
        self.out_grads.append(None)
        return len(self.outs) - 1

    def add_grad(self, i: int, g: torch.Tensor | None) -> None:
        if g is not None:
            self.out_grads[i] = g if self.out_grads[i] is None else self.out_grads[i] + g

    def seeds(self) -> tuple[list, list]:
        pairs = [(o, g) for o, g in zip(self.outs, self.out_grads) if g is not None]
        return [o for o, _ in pairs], [g for _, g in pairs]

    def __repr__(self) -> str:
        return f"Piece({self.index}:{self.name}, ins={len(self.ins)}, outs={len(self.outs)}, cut={self.cut})"


class Chunk:
    """The record of one forward: its pieces, the input leaf, the output; backward state lives here too."""

    def __init__(self, stage_id: int, microbatch: int, x: torch.Tensor | None, trace: list[str] | None = None):
        self.stage_id, self.microbatch = stage_id, microbatch
        self.trace = trace  # if a list: "3F5:attn2" / "3B5:mlp2" appended as pieces run (tests, debugging)
        self.pieces: list[Piece] = []
        self.input = x  # the stage input leaf (None on the first stage)
        self.output: torch.Tensor | None = None
        self.loss: torch.Tensor | None = None  # the last stage: the unscaled loss (detached)
        self._producer: dict[int, tuple[int, torch.Tensor]] = {}  # id(tensor) -> (piece, tensor)
        if x is not None:
            self._producer[id(x)] = (-1, x)
        self.backward_done = False

    # ---- building the tape -----------------------------------------------------------------------
    def piece(self, fn: Callable, *args, params: Iterable[torch.Tensor] = (), name: str = "") -> Any:
        """Run fn(*args) as a new piece. Tensor args that require grad must come from the chunk input or
        from earlier pieces: each becomes a fresh leaf here, its gradient routed back to its producer."""
        p = Piece(len(self.pieces), list(params), name or getattr(fn, "__name__", "piece"))
        self.pieces.append(p)
        call = []
        for a in args:
            if isinstance(a, torch.Tensor) and a.requires_grad:
                src = self._producer.get(id(a))
                if src is None or src[1] is not a:
                    raise RuntimeError(f"piece {p.name}: a tensor argument requiring grad does not come from the "
                                       f"chunk input or an earlier piece")
                if src[0] == -1:  # the chunk input leaf itself: use it directly
                    leaf, link = a, None
                else:
                    leaf, link = a.detach().requires_grad_(), (src[0], self.pieces[src[0]].add_out(a))
                p.ins.append(leaf)
                p.in_src.append(link)
                call.append(leaf)
            else:
                call.append(a)
        out = fn(*call)
        if self.trace is not None:
            self.trace.append(f"{self.stage_id}F{self.microbatch}:{p.name}")
        for t in out if isinstance(out, tuple) else (out,):
            if isinstance(t, torch.Tensor) and t.requires_grad:
                self._producer[id(t)] = (p.index, t)
        return out

    def cut(self, waited: torch.Tensor) -> None:
        """Inside a piece's fn, right after `handle.wait()`: this piece consumes the previous piece's
        graph through the inputs of `waited`'s grad_fn (the wait node of an all-to-all)."""
        p, prev = self.pieces[-1], self.pieces[-2]
        for node, nr in waited.grad_fn.next_functions:
            if node is not None:
                e = GradientEdge(node, nr)
                p.ins.append(e)
                p.in_src.append((prev.index, prev.add_out(e)))
                p.cut = True

    def link(self, t: torch.Tensor) -> torch.Tensor:
        """Inside a piece's fn: use `t`, an earlier piece's output, through its own autograd edge rather
        than a detached leaf, so that neither piece holds it (a recomputed tensor, model/recompute.py, stays
        dropped: only the saved-tensor slots of its consumers refer to it). Its gradient is routed back like a
        leaf's; the chunk forgets `t` (one consumer)."""
        p = self.pieces[-1]
        src = self._producer.pop(id(t), None)
        if src is None or src[1] is not t or src[0] < 0:
            raise RuntimeError(f"piece {p.name}: link() needs an output of an earlier piece")
        e = get_gradient_edge(t)
        p.ins.append(e)
        p.in_src.append((src[0], self.pieces[src[0]].add_out(e)))
        return t

    def finish(self, out: torch.Tensor) -> None:
        src = self._producer.get(id(out))
        if src is None or src[0] < 0:
            raise RuntimeError(f"chunk {self.stage_id}/{self.microbatch}: the output was not made by a piece")
        self.output = out
        self.pieces[src[0]].add_out(out)
        self._producer.clear()

    # ---- backward ---------------------------------------------------------------------------------
    def backward(self, grad_output: torch.Tensor | None, split: bool,
                 weight_now: bool = False) -> Generator[None, None, torch.Tensor | None]:
        """Full backward (split=False) or B (split=True: input grads now, W later via run_weight()),
        piece by piece from the last; yields while an all-to-all of this chunk is in flight. Returns the
        gradient of the chunk input (None on the first stage). weight_now (with split): each piece's W
        runs right after its B, before the yield, so it computes while the reverse all-to-all that B
        started is in flight (TR Figure 4: MLP(W) after DISPATCH(B) starts, ATTN(W) in the pair); a full
        backward computes a Linear's weight gradient in the same node as its input gradient, before the
        all-to-all can start."""
        assert split or not weight_now, "weight_now needs split=True"
        assert not self.backward_done, f"chunk {self.stage_id}/{self.microbatch}: backward twice"
        self.backward_done = True
        out = self.output
        last = self.pieces[self._producer_index(out)]
        seed = torch.ones_like(out) if grad_output is None else grad_output
        last.add_grad(last.add_out(out), seed)
        grad_input = None
        for p in reversed(self.pieces):
            outs, grads = p.seeds()
            ins = list(p.ins)
            if split:
                in_grads, p.weight_job = backward_input(outs, grads, ins, p.params)
            else:
                in_grads = _full_backward(outs, grads, ins, p.params)
            p.outs, p.out_grads = [], []
            for src, g in zip(p.in_src, in_grads):
                if src is None:
                    grad_input = g if grad_input is None else grad_input + g
                else:
                    self.pieces[src[0]].add_grad(src[1], g)
            p.ins, p.in_src = [], []
            if self.trace is not None:
                self.trace.append(f"{self.stage_id}{'B' if split else 'BW'}{self.microbatch}:{p.name}")
            if weight_now:
                p.weight_job.run()
                p.weight_job = None
                if self.trace is not None:
                    self.trace.append(f"{self.stage_id}W{self.microbatch}:{p.name}")
            if p.cut:
                yield
        self.output = None
        if weight_now:
            self.pieces = []
        return grad_input

    def _producer_index(self, out) -> int:
        for p in reversed(self.pieces):
            if any(o is out for o in p.outs):
                return p.index
        raise RuntimeError("chunk output not found")

    def run_weight(self) -> None:
        """W: the weight gradients of a chunk whose B ran, accumulated into .grad."""
        for p in reversed(self.pieces):
            if p.weight_job is not None:
                p.weight_job.run()
                p.weight_job = None
        self.pieces = []


# ---- backward helpers ----------------------------------------------------------------------------------
def _accumulate(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None]) -> None:
    with torch.no_grad():
        for p, g in zip(params, grads):
            if g is None:
                continue
            main = getattr(p, "main_grad", None)  # ZeRO-1's FP32 grad buffer (parallel/zero.py): add there
            if main is not None:
                main.add_(g)
                if p.dtype == main.dtype:
                    p.grad = main  # as ZeRO-1's AccumulateGrad hook leaves an FP32 parameter
            elif p.grad is None:
                p.grad = g.clone(memory_format=torch.contiguous_format)
            else:
                p.grad += g


def _full_backward(outs, grads, ins, params) -> list[torch.Tensor | None]:
    if not outs:
        return [None] * len(ins)
    got = torch.autograd.grad(outs, list(ins) + list(params), grads, allow_unused=True)
    _accumulate(params, got[len(ins):])
    return list(got[:len(ins)])


class WeightJob:
    """The deferred weight half of one piece's backward (see the module docstring)."""

    def __init__(self):
        self.groups: list[tuple[list, list[torch.Tensor]]] = []  # ([(node, captured grads)], params)
        self.deferred: tuple[list, list, list[torch.Tensor]] | None = None  # (outs, grads, params) run whole

    def run(self) -> None:
        for nodes, params in self.groups:
            edges, grads = [], []
            for node, captured in nodes:
                for i, g in enumerate(captured or ()):
                    if g is not None:
                        edges.append(GradientEdge(node, i))
                        grads.append(g)
            if not edges:
                continue
            handles = []
            if len(nodes) > 1:  # one frontier node below another: pin each to its recorded gradient once
                handles = [node.register_prehook(lambda _g, c=captured: c) for node, captured in nodes]
            try:
                got = torch.autograd.grad(edges, params, grads, retain_graph=True, allow_unused=True)
            finally:
                for h in handles:
                    h.remove()
            _accumulate(params, got)
        if self.deferred is not None:
            outs, grads, params = self.deferred
            got = torch.autograd.grad(outs, params, grads, allow_unused=True)
            _accumulate(params, got)
        self.groups, self.deferred = [], None


def backward_input(outs: Sequence, grads: Sequence[torch.Tensor], ins: Sequence,
                   params: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor | None], WeightJob]:
    """B of one piece: the gradients of `ins` (leaves or GradientEdges) now; a WeightJob for `params`."""
    job = WeightJob()
    if not outs:
        return [None] * len(ins), job
    in_edges = [_edge(i) for i in ins if isinstance(i, GradientEdge) or i.requires_grad]
    stop = {_key(e) for e in in_edges}
    p_edges = [_edge(p) for p in params]  # held for the call: node ids below must not be reused
    param_of = {id(e.node): i for i, e in enumerate(p_edges)}  # AccumulateGrad node id -> index in params
    roots = [_edge(o).node for o in outs]

    # X: nodes on a path from the outputs to an input (B runs exactly these)
    reach: dict[int, bool] = {}
    nodes: dict[int, Any] = {}
    order: list = []  # post-order
    seen: set[int] = set()
    stack = [(r, False) for r in roots if r is not None]
    while stack:
        n, done = stack.pop()
        if done:
            reach[id(n)] = any((id(m), nr) in stop or reach.get(id(m), False)
                               for m, nr in n.next_functions if m is not None)
            order.append(n)
            continue
        if id(n) in seen:
            continue
        seen.add(id(n))
        nodes[id(n)] = n
        stack.append((n, True))
        for m, nr in n.next_functions:
            if m is not None and (id(m), nr) not in stop and id(m) not in seen:
                stack.append((m, False))

    below: dict[int, frozenset] = {}  # params reachable from a node outside X (AccumulateGrad node ids)

    def params_below(n) -> frozenset:
        if id(n) in below:
            return below[id(n)]
        out, st, vis = set(), [n], {id(n)}
        while st:
            k = st.pop()
            if id(k) in param_of:
                out.add(id(k))
            for m, _ in k.next_functions:
                if m is not None and id(m) not in vis:
                    vis.add(id(m))
                    st.append(m)
        below[id(n)] = frozenset(out)
        return below[id(n)]

    in_x = {k for k, v in reach.items() if v}
    # frontier: node in X -> edge to a node outside X that leads to params
    frontier: dict[int, set] = {}
    for k in in_x:
        n = nodes[k]
        for m, nr in n.next_functions:
            if m is None or id(m) in in_x or (id(m), nr) in stop:
                continue
            ps = {id(m)} & param_of.keys() if id(m) in param_of else params_below(m)
            if ps:
                frontier.setdefault(k, set()).update(ps)
    # group params that share frontier nodes (union-find over params)
    parent: dict[int, int] = {}

    def find(a):
        while parent.setdefault(a, a) != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for ps in frontier.values():
        ps = list(ps)
        for q in ps[1:]:
            parent[find(q)] = find(ps[0])
    groups: dict[int, tuple[list, set]] = {}
    for k, ps in frontier.items():
        g = groups.setdefault(find(next(iter(ps))), ([], set()))
        g[0].append(k)
        g[1].update(ps)
    captured: dict[int, tuple | None] = {k: None for k in frontier}
    hooks = []
    for k in frontier:
        def hook(grad_outputs, k=k):
            captured[k] = tuple(grad_outputs)
        hooks.append(nodes[k].register_prehook(hook))

    # outputs that reach no input: their whole backward is W's
    live = [(o, g) for o, g in zip(outs, grads) if id(_edge(o).node) in in_x]
    dead = [(o, g) for o, g in zip(outs, grads) if id(_edge(o).node) not in in_x]
    try:
        want = [i for i in ins if isinstance(i, GradientEdge) or i.requires_grad]
        if live and want:
            got = torch.autograd.grad([o for o, _ in live], want, [g for _, g in live], retain_graph=True,
                                      allow_unused=True)
        else:
            got = [None] * len(want)
    finally:
        for h in hooks:
            h.remove()
    it = iter(got)
    in_grads = [next(it) if isinstance(i, GradientEdge) or i.requires_grad else None for i in ins]
    for keys, pids in groups.values():
        idx = sorted(param_of[i] for i in pids)
        job.groups.append(([(nodes[k], captured[k]) for k in keys], [params[i] for i in idx]))
    if dead:
        job.deferred = ([o for o, _ in dead], [g for _, g in dead], list(params))
    return in_grads, job


def interleave(*gens: Generator, progress: Callable[[], None] = lambda: None) -> list:
    """Run generators round-robin, one step each, until all finish; returns their return values.
    Each yields while one of its all-to-alls is in flight, so the others compute meanwhile.

    `progress` (the comm streams' progress(), comm/streams.py) is called after every step: the step has
    just queued a piece of compute, so an exchange started before it may now read its routing counts
    from the host (a CudaCommStream host read blocks until the GPU reaches the count all-to-all; with
    this piece queued behind it, the GPU keeps computing meanwhile) and issue its payload all-to-all.
    The steps and calls are the same on every rank of an ep group, so the collectives' order is too."""
    results: list = [None] * len(gens)
    live = list(enumerate(gens))
    while live:
        for item in list(live):
            i, g = item
            try:
                next(g)
            except StopIteration as stop:
                results[i] = stop.value
                live.remove(item)
            progress()
    return results


def run(gen: Generator, progress: Callable[[], None] = lambda: None):
    """Run one generator to the end (no overlap); returns its value."""
    return interleave(gen, progress=progress)[0]


# ---- forward -------------------------------------------------------------------------------------------
def _params(*modules: nn.Module | None) -> list[torch.Tensor]:
    out, seen = [], set()
    for m in modules:
        if m is None:
            continue
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def _blocks(stage) -> list[nn.Module]:
    return list(stage.layers.values()) + [m.block for m in stage.mtp.values()]


def _is_async(layer: nn.Module) -> bool:
    ffn = getattr(layer, "ffn", None)
    return isinstance(ffn, MoE) and hasattr(ffn.dispatcher, "dispatch_async")


def block_forward(chunk: Chunk, layer: nn.Module, x: torch.Tensor, angles: torch.Tensor,
                  overlap: bool) -> Generator[None, None, torch.Tensor]:
    """One transformer block as pieces. With an async dispatcher and overlap: ATTN | MLP | COMBINE,
    yielding while dispatch and combine are in flight (Block.attention and MoE.forward's steps: route_tokens,
    dispatcher, shared, finish).

    Recompute (model/recompute.py, the block's `recompute`): a whole block is one piece and Block.forward
    applies it. Cut in pieces, selective runs each piece in a recompute scope and hands the ffn norm's
    output to COMBINE (the shared expert) through its autograd edge (Chunk.link), so no piece holds it;
    full checkpoints each piece's compute (attention + norm + gate; the experts; the shared expert): what
    stays is each piece's inputs (the block input, h, the received rows, the routing weights), not the
    all-to-alls, which are never re-run."""
    if not (overlap and _is_async(layer)):
        return chunk.piece(layer, x, angles, params=_params(layer), name=f"block{layer.layer_id}")
    moe: MoE = layer.ffn
    disp = moe.dispatcher
    policy = policy_of(layer)
    full, selective = policy == "full", policy == "selective"

    def attn_route(x):
        h = layer.attention(x, angles)
        return (h, *moe.route_tokens(layer.ffn_norm(h)))

    def attn_gate(x):
        with scope(selective):
            h, x_ND, weights, indices, aux = region(attn_route, x, register_outputs=False) if full else \
                attn_route(x)
            # the shared expert's own view of x_ND: COMBINE links to it (Chunk.link), and its edge lies on no path
            # from the dispatch, so COMBINE's backward never runs into this piece's graph
            return h, x_ND.view_as(x_ND), aux, disp.dispatch_async(x_ND, indices, weights)

    h, x_sh, aux, handle = chunk.piece(
        attn_gate, x, params=_params(layer.attn_norm, layer.attn, layer.ffn_norm, moe.gate),
        name=f"attn{layer.layer_id}")
    yield  # dispatch in flight

    def experts(handle):
        x_RD, ctx = handle.wait()
        chunk.cut(x_RD)
        y_RD = region(disp.compute, x_RD, ctx, moe.experts, register_outputs=False) if full else \
            disp.compute(x_RD, ctx, moe.experts)
        return disp.combine_async(y_RD, ctx)

    handle = chunk.piece(experts, handle, params=_params(moe.experts), name=f"mlp{layer.layer_id}")
    yield  # combine in flight

    def combine(handle, h, aux):
        # the shared expert first: it computes while the combine is in flight; in backward its nodes are
        # older than the wait node's, so autograd starts the reverse combine before computing them
        with scope(selective):
            x = chunk.link(x_sh)
            shared = region(moe.shared, x, register_outputs=False) if full else moe.shared(x)
        y_ND = handle.wait()
        chunk.cut(y_ND)
        return h + moe.finish(y_ND, shared, aux, h.shape)

    return chunk.piece(combine, handle, h, aux, params=_params(moe.shared_experts),
                       name=f"combine{layer.layer_id}")


def _scoped(fn: Callable, enabled: bool) -> Callable:
    """fn run inside a recompute scope (model/recompute.py) when enabled."""
    def run(*args):
        with scope(enabled):
            return fn(*args)
    return run if enabled else fn


def stage_forward(chunk: Chunk, stage, x: torch.Tensor | None, rows: torch.Tensor | None, n_micro: int,
                  overlap: bool = True) -> Generator[None, None, torch.Tensor]:
    """StageModule.forward as pieces (model.split.StageModule); on the last stage the output is
    loss / n_micro (the single-process loop's `(loss / n_micro).backward()`) and chunk.loss the loss."""
    if overlap and any(_is_async(b) for b in _blocks(stage)):
        # In an F&B pair (interleave(fwd, bwd)) let the backward chunk go first: its first piece starts
        # its combine all-to-all, which this forward's embedding + attention then hide (TR Figure 4:
        # ATTN(F) under COMBINE(B)). The pair then ends with the backward's attention hiding this
        # forward's last combine, instead of the small COMBINE piece hiding the backward's last dispatch.
        yield
    if stage.is_first:
        h = chunk.piece(stage.embed_tokens, rows, params=_params(stage.embed), name="embed")
    else:
        h = x
    for layer in stage.layers.values():
        h = yield from block_forward(chunk, layer, h, stage.angles, overlap)
    if not stage.is_last:
        chunk.finish(h)
        return h
    selective = policy_of(*_blocks(stage)) == "selective"  # the final norms' outputs, saved by the head
    main = chunk.piece(_scoped(stage.main_loss, selective), h, rows, params=_params(stage.norm, stage.head),
                       name="head")
    mtp = []
    for k, module in enumerate(stage.mtp.values()):
        hk = chunk.piece(stage.mtp_input, k, h, rows, params=_params(module.hnorm, module.enorm, module.eh_proj,
                                                                       stage.embed), name=f"mtp{k}_in")
        hk = yield from block_forward(chunk, module.block, hk, stage.angles, overlap)
        mtp.append(chunk.piece(_scoped(stage.mtp_loss, selective), k, hk, rows,
                               params=_params(module.norm, stage.head),
                               name=f"mtp{k}_head"))
        h = hk

    def total(main, *mtp):
        loss = stage.combine_losses(main, list(mtp))
        chunk.loss = loss.detach()
        return loss / n_micro

    out = chunk.piece(total, main, *mtp, name="loss")
    chunk.finish(out)
    return out
