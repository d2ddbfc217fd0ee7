"""PipelineRuntime: executes one rank's schedule (dualpipe.schedule actions) on real ranks.

    stages = build_stages(model, placement[pp_rank], n_stages)          # model.split
    rt = PipelineRuntime.for_schedule("dualpipev", stages, pp_group, n_micro)
    losses = rt.step(microbatches)      # per micro-batch: its loss (0-dim, on the device) on this rank, else None
    rt.reduce_tied_grads()              # embedding copies (1F1B/ZB1P with MTP), DualPipe's twin stages
    rt.reduce_tied_loads()              # DualPipe: MoE loads of the twin stages (before the dp all-reduce)

Compute actions (docs/dualpipe.md): F runs the stage forward in pieces (dualpipe.stage) and, on the last
stage, the loss divided by the number of micro-batches, exactly as the single-process loop's
`(loss / n_micro).backward()`; MoE `aux_loss_scale` is set to 1/n_micro likewise. B is the backward for
the stage input only; its W (weight gradients from the gradients B recorded at the weight edges) runs
when the schedule says, into `.grad`. BW is the full backward. FB runs the forward of one chunk and the
backward of another as two generators, alternated whenever one has an all-to-all in flight
(`overlap=True` and an async dispatcher); otherwise one after the other. The backward of a pair is full;
with `fb_weight_split=True` (and overlap) it runs as B then W piece by piece, so that each piece's weight
gradients compute under the all-to-all its B started (TR Figure 4). That hides more of the all-to-all
but costs the B/W split's graph walks (CPU per step: docs/dualpipe.md "Measured overlap"), so it is off
by default.

Communication: each maximal run of SEND/RECV actions is one `dist.batch_isend_irecv` (ops in list order,
peers are global ranks: the schedule's pp ranks mapped through `pp_group`). A batch holding a receive is
waited before the next compute action; send-only batches are waited at the end of the step (their
tensors kept alive until then). Every wait has `timeout_s` and a lost peer raises PeerFailure naming
the actions (gloo; on NCCL the group's watchdog timeout applies). Neighbouring stages on one rank
(DualPipeV's turn at rank pp-1) hand the tensor over in memory. Activations and their gradients are
[micro_batch, T, dim] in the model dtype.

Host reads: none. Losses stay on the device: `stats` holds the last step's sums as 0-dim float64 device
tensors, accumulated in execution order as train.engine.LocalEngine does: lm_loss (sum over this rank's
loss micro-batches), mtp_loss (sum over them of each micro-batch's mean over the MTP depths), aux_loss
(sum over this rank's chunks and MoE layers of the sequence balance loss), and n_loss_micro (how many
loss micro-batches ran here, an int).
The trainer reads them once per step. The MoE exchanges' comm streams get `progress()` after every piece
a compute action queues (dualpipe.stage.interleave), which places their routing-count reads.

Bubble time: `wait_s`, the time the rank's compute waits in pipeline P2P (bubble + exposed P2P). With
gloo a wait blocks the host: wall time. On CUDA a wait only makes the compute stream wait (NCCL), so
the host time says nothing: CUDA events recorded on the compute stream around each wait measure the
device time, read (one event synchronize, then elapsed_time per wait) when `wait_s` is read, once per
step, after the trainer has queued the step's work.

State (the received tensors, the chunks waiting for B/W, pending sends) lives on the instance and is
empty between steps. See docs/pipeline.md for the per-step calling sequence of a trainer.
"""
from __future__ import annotations

import datetime
import time
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from moeforge.model.split import StageModule
from moeforge.model.stages import stage_layers

from .schedule import Action, build_schedule, is_reverse, stage_to_rank
from .stage import Chunk, interleave, run, stage_forward


def placement(name: str, pp: int, n_micro: int) -> Callable[[int, int], int]:
    """rank_of_stage(stage, microbatch) -> pp rank, for one of dualpipe.schedule's schedules."""
    return lambda stage, mb: stage_to_rank(name, pp, stage, is_reverse(name, n_micro, mb))


class PipelineRuntime:
    """Runs `schedule` (this rank's action list) over `stages` {global stage id: StageModule on this rank}.

    rank_of_stage(stage, microbatch) -> the pp rank (index in pp_group) that runs that stage for that
    micro-batch; `placement(name, pp, n_micro)` gives it for the four schedules."""

    def __init__(self, stages: dict[int, StageModule], schedule: Sequence[Action], pp_group: dist.ProcessGroup | None,
                 rank_of_stage: Callable[[int, int], int], *, overlap: bool = True, fb_weight_split: bool = False,
                 timeout_s: float = 300.0, plan: list[list[str]] | None = None, trace: bool = False):
        if not stages:
            raise ValueError("PipelineRuntime: no stages on this rank")
        self.stages = dict(stages)
        self.schedule = list(schedule)
        self.pp_group = pp_group
        self.pp_rank = dist.get_rank(pp_group)
        self.pp_size = dist.get_world_size(pp_group)
        self.rank_of_stage = rank_of_stage
        self.overlap = overlap
        self.fb_weight_split = fb_weight_split
        self.trace: list[list[str]] | None = [] if trace else None  # per compute action: the pieces it ran
        self.timeout = datetime.timedelta(seconds=timeout_s)
        any_stage = next(iter(self.stages.values()))
        self.args, self.n_stages = any_stage.args, any_stage.n_stages
        self.n_micro = 1 + max(a.microbatch if a.op != "FB" else max(a.microbatch, a.b_microbatch)
                               for a in self.schedule)
        self.plan = plan if plan is not None else stage_layers(self.args, self.n_stages)
        for s, st in self.stages.items():
            have = ({"embed"} if st.embed is not None else set()) | {f"layers.{k}" for k in st.layers} | \
                {f"mtp.{k}" for k in st.mtp} | ({"norm", "head"} if st.is_last else set())
            if have != set(self.plan[s]):
                raise ValueError(f"stage {s} holds {sorted(have)} but the plan says {sorted(self.plan[s])}: "
                                 f"pass plan= (model.split.stage_layers with the costs the stages were built with)")
        for a in self.schedule:
            for s in (a.stage, a.b_stage):
                if s is not None and s not in self.stages:
                    raise ValueError(f"action {a} needs stage {s}, which is not on this rank ({sorted(self.stages)})")
        p = next(st.parameters())
        self.dtype, self.device = p.dtype, p.device
        # gloo: wait(timeout) bounds each wait; NCCL: its watchdog enforces the group's timeout and
        # wait(timeout) would block the host, so wait() only enqueues the stream dependency
        self._host_timeout = dist.get_backend(pp_group) != "nccl"
        self._program = self._compile(self.schedule)
        self.act_shape: tuple[int, int, int] | None = None  # [micro_batch, T, dim], from the step's tokens
        self.stats: dict = {}  # the last step's loss sums on the device (module docstring)
        self._device_timing = self.device.type == "cuda"
        self._wait_host_s = 0.0  # gloo: wall time blocked in P2P waits since the step began
        self._wait_events: list = []  # CUDA: (start, end) events around each wait on the compute stream
        self._streams = list({id(m.dispatcher.stream): m.dispatcher.stream for st in self.stages.values()
                              for m in st.moe_layers() if hasattr(m.dispatcher, "stream")}.values())
        self._reset()

    @classmethod
    def for_schedule(cls, name: str, stages: dict[int, StageModule], pp_group: dist.ProcessGroup | None,
                     n_micro: int, *, split_middle_pair: bool = False, **kw) -> "PipelineRuntime":
        """Build this rank's action list for `name` (1f1b, zb1p, dualpipe, dualpipev) and the runtime."""
        pp = dist.get_world_size(pp_group)
        sched = build_schedule(name, pp, n_micro, split_middle_pair=split_middle_pair)[dist.get_rank(pp_group)]
        return cls(stages, sched, pp_group, placement(name, pp, n_micro), **kw)

    @staticmethod
    def _compile(schedule: list[Action]) -> list[tuple[str, list[Action] | Action]]:
        """[("comm", [actions]) | ("compute", action)]: maximal runs of comm actions are one batch."""
        prog: list = []
        for a in schedule:
            if a.is_comm:
                if prog and prog[-1][0] == "comm":
                    prog[-1][1].append(a)
                else:
                    prog.append(("comm", [a]))
            else:
                prog.append(("compute", a))
        return prog

    def _reset(self) -> None:
        self._fwd_in: dict[tuple[int, int], torch.Tensor] = {}  # (stage, mb) -> input of F
        self._bwd_in: dict[tuple[int, int], torch.Tensor] = {}  # (stage, mb) -> output grad for B/BW
        self._to_send: dict[tuple[str, int, int], torch.Tensor] = {}  # ("F"|"B", stage, mb) -> tensor
        self._chunks: dict[tuple[int, int], Chunk] = {}  # forwards waiting for their backward / W
        self._pending: list[tuple[list, list[torch.Tensor], str]] = []  # send-only batches in flight
        self._rows: list[torch.Tensor] | None = None
        self._losses: list[torch.Tensor | None] = []
        self._n = 0

    # ---- the step ---------------------------------------------------------------------------------------
    def step(self, microbatches: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
        """Run the schedule once over `microbatches` (token rows [B, T+1+D]; every rank passes the same
        list: the first and last stage read the tokens, the others only their shape). Gradients
        accumulate into .grad (zero them between optimizer steps). Returns the loss of every micro-batch
        whose last stage ran on this rank (a detached 0-dim device tensor: no host read), None for the
        others."""
        n = len(microbatches)
        if n != self.n_micro:
            raise ValueError(f"the schedule was built for n_micro={self.n_micro}, got {n} micro-batches")
        self._reset()
        if self.trace is not None:
            self.trace.clear()
        self._rows, self._n = list(microbatches), n
        self._losses = [None] * n
        rows0 = self._rows[0]
        self.act_shape = (rows0.size(0), rows0.size(1) - 1 - self.args.n_mtp_modules, self.args.dim)
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        self.stats = {"lm_loss": zero, "mtp_loss": zero, "aux_loss": zero, "n_loss_micro": 0}
        self._wait_host_s, self._wait_events = 0.0, []
        for st in self.stages.values():
            for m in st.moe_layers():
                m.aux_loss_scale = 1.0 / n
        try:
            for kind, item in self._program:
                if kind == "comm":
                    self._post(item)
                else:
                    self._compute(item)
            for works, _, what in self._pending:
                self._wait(works, what)
            left = sorted(self._chunks) + sorted(self._fwd_in) + sorted(self._bwd_in) + sorted(self._to_send)
            if left:
                raise RuntimeError(f"pp rank {self.pp_rank}: the schedule left work behind: {left}")
            return self._losses
        finally:
            self._reset()

    @torch.no_grad()
    def forward_only(self, microbatches: Sequence[torch.Tensor],
                     last: Callable[[StageModule, torch.Tensor, torch.Tensor], torch.Tensor]) -> list[torch.Tensor | None]:
        """Evaluation and sampling: run every micro-batch forward through the pipe, no autograd, and on the
        rank holding its last stage return `last(stage, h, rows)` (h: the final block's output [B, T, dim]);
        None for micro-batches whose last stage is elsewhere. Any number of micro-batches and any
        sequence length (activations take their shape from each micro-batch's rows).

        Every rank walks the same global order (micro-batch, then stage) and acts on the stages it holds:
        a receive waits, a send is posted and waited at the end, so each receive's send was posted
        earlier in that order and nothing can deadlock. The pipe is not filled: one micro-batch at a time
        (evaluation is a small share of a step's work); EP peers of a stage run its all-to-alls together."""
        out: list[torch.Tensor | None] = [None] * len(microbatches)
        pending: list[tuple[list, torch.Tensor, str]] = []
        try:
            for m, rows in enumerate(microbatches):
                shape = (rows.size(0), rows.size(1) - 1 - self.args.n_mtp_modules, self.args.dim)
                h: torch.Tensor | None = None
                for s in range(self.n_stages):
                    here = self.rank_of_stage(s, m) == self.pp_rank
                    prev = None if s == 0 else self.rank_of_stage(s - 1, m)
                    if not here:
                        h = None
                        continue
                    stage = self.stages[s]
                    if s > 0 and prev != self.pp_rank:
                        h = torch.empty(shape, dtype=self.dtype, device=self.device)
                        what = f"forward_only recv {s}F{m}<{prev}"
                        self._wait(dist.batch_isend_irecv(
                            [dist.P2POp(dist.irecv, h, self._global(prev), self.pp_group)]), what)
                    x = stage.hidden(h, rows)
                    if stage.is_last:
                        out[m] = last(stage, x, rows)
                        continue
                    nxt = self.rank_of_stage(s + 1, m)
                    h = x
                    if nxt != self.pp_rank:
                        t = x.contiguous()
                        works = dist.batch_isend_irecv([dist.P2POp(dist.isend, t, self._global(nxt), self.pp_group)])
                        pending.append((works, t, f"forward_only send {s}F{m}>{nxt}"))
        finally:
            for works, _, what in pending:
                self._wait(works, what)
        return out

    def _compute(self, a: Action) -> None:
        if self.trace is not None:
            self.trace.append([str(a)])
        if a.op == "F":
            run(self._forward(a.stage, a.microbatch), progress=self._progress)
        elif a.op in ("B", "BW"):
            run(self._backward(a.stage, a.microbatch, split=a.op == "B"), progress=self._progress)
        elif a.op == "W":
            self._chunks.pop((a.stage, a.microbatch)).run_weight()
            if self.trace is not None:
                self.trace[-1].append(f"{a.stage}W{a.microbatch}")
        elif a.op == "FB":
            fwd = self._forward(a.stage, a.microbatch)
            # fb_weight_split: B then W piece by piece, each W under that piece's reverse all-to-all
            w_split = self.overlap and self.fb_weight_split
            bwd = self._backward(a.b_stage, a.b_microbatch, split=w_split, weight_now=w_split)
            if self.overlap:
                interleave(fwd, bwd, progress=self._progress)
            else:
                run(fwd, progress=self._progress)
                run(bwd, progress=self._progress)
        else:
            raise ValueError(f"unknown compute action {a}")

    def _forward(self, s: int, m: int):
        stage = self.stages[s]
        x = None if stage.is_first else self._fwd_in.pop((s, m)).detach().requires_grad_()
        chunk = Chunk(s, m, x, None if self.trace is None else self.trace[-1])
        out = yield from stage_forward(chunk, stage, x, self._rows[m], self._n, self.overlap)
        self._chunks[(s, m)] = chunk
        st = self.stats
        aux = [l.last_aux_loss for l in stage.moe_layers() if l.last_aux_loss is not None]
        if aux:
            st["aux_loss"] = st["aux_loss"] + torch.stack(aux).double().sum()
        if stage.is_last:
            self._losses[m] = chunk.loss
            main, mtp = stage.last_losses
            st["lm_loss"] = st["lm_loss"] + main.double()
            if mtp:
                st["mtp_loss"] = st["mtp_loss"] + torch.stack(mtp).double().mean()
            st["n_loss_micro"] += 1
        elif self.rank_of_stage(s + 1, m) == self.pp_rank:
            self._fwd_in[(s + 1, m)] = out.detach()  # the V's turn: same rank, no send
        else:
            self._to_send[("F", s, m)] = out.detach()

    def _backward(self, s: int, m: int, split: bool, weight_now: bool = False):
        stage = self.stages[s]
        chunk = self._chunks[(s, m)]
        if self.trace is not None:
            chunk.trace = self.trace[-1]
        grad = None if stage.is_last else self._bwd_in.pop((s, m))
        gx = yield from chunk.backward(grad, split, weight_now)
        if not split or weight_now:
            del self._chunks[(s, m)]
        if stage.is_first:
            return
        if self.rank_of_stage(s - 1, m) == self.pp_rank:
            self._bwd_in[(s - 1, m)] = gx
        else:
            self._to_send[("B", s, m)] = gx

    # ---- point to point ----------------------------------------------------------------------------------
    def _global(self, pp_rank: int) -> int:
        return pp_rank if self.pp_group is None else dist.get_global_rank(self.pp_group, pp_rank)

    def _post(self, batch: list[Action]) -> None:
        ops, keep, has_recv = [], [], False
        for a in batch:
            key = (a.stage, a.microbatch)
            if a.op in ("SEND_F", "SEND_B"):
                t = self._to_send.pop((a.op[-1], a.stage, a.microbatch)).contiguous()
                ops.append(dist.P2POp(dist.isend, t, self._global(a.peer), self.pp_group))
                keep.append(t)
            else:
                buf = torch.empty(self.act_shape, dtype=self.dtype, device=self.device)
                (self._fwd_in if a.op == "RECV_F" else self._bwd_in)[key] = buf
                ops.append(dist.P2POp(dist.irecv, buf, self._global(a.peer), self.pp_group))
                has_recv = True
        what = " ".join(map(str, batch))
        works = dist.batch_isend_irecv(ops)
        if has_recv:
            self._wait(works, what)
        else:
            self._pending.append((works, keep, what))

    def _progress(self) -> None:
        for stream in self._streams:
            stream.progress()

    @property
    def wait_s(self) -> float:
        """Seconds this rank's compute waited in pipeline P2P since the last step began (module docstring).
        On CUDA this synchronizes with the last wait's end event: read it once per step, late."""
        if not self._wait_events:
            return self._wait_host_s
        self._wait_events[-1][1].synchronize()
        return sum(a.elapsed_time(b) for a, b in self._wait_events) / 1000.0

    def _wait(self, works: list, what: str) -> None:
        from moeforge.parallel.mesh import peer_guard

        t0 = time.perf_counter()
        if self._device_timing:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        with peer_guard(f"pipeline p2p [{what}] on pp rank {self.pp_rank}", self.pp_group,
                        self.timeout.total_seconds()):
            for w in works:
                if w is not None and not (w.wait(self.timeout) if self._host_timeout else w.wait()):
                    raise RuntimeError(f"timed out after {self.timeout.total_seconds():g}s")
        if self._device_timing:
            end.record()
            self._wait_events.append((start, end))
        else:
            self._wait_host_s += time.perf_counter() - t0

    # ---- parameters held on several pp ranks --------------------------------------------------------------
    def _holders(self, fqn: str) -> list[int]:
        """pp ranks that hold the top-level part `fqn` (embed, layers.<i>, norm, head, mtp.<k>)."""
        return sorted({self.rank_of_stage(s, m) for s, parts in enumerate(self.plan) if fqn in parts
                       for m in range(self.n_micro)})

    def _local_parts(self) -> dict[str, torch.nn.Module]:
        parts = {}
        for st in self.stages.values():
            if st.embed is not None:
                parts["embed"] = st.embed
            parts.update({f"layers.{k}": v for k, v in st.layers.items()})
            parts.update({f"mtp.{k}": v for k, v in st.mtp.items()})
            if st.is_last:
                parts["norm"], parts["head"] = st.norm, st.head
        return parts

    def named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """Every parameter on this rank once, by its logical name (shared modules counted once)."""
        out, seen = [], set()
        for fqn, mod in sorted(self._local_parts().items()):
            for n, p in mod.named_parameters(prefix=fqn):
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append((n, p))
        return out

    def owned_named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """The parameters this rank counts in the global grad norm: a part held by several pp ranks
        (embedding copies, DualPipe's twins) is counted on the lowest of them only."""
        own = {f for f in self._local_parts() if self._holders(f)[0] == self.pp_rank}
        return [(n, p) for n, p in self.named_parameters() if _part_of(n) in own]

    def _tied_exchange(self, tensors_of: Callable[[torch.nn.Module], list[torch.Tensor]], what: str) -> None:
        """For every part held by several pp ranks: replace each tensor by the sum over the holders, in
        rank order (so every holder gets the same bits). Point-to-point with each peer, one flat buffer."""
        parts = self._local_parts()
        by_peer: dict[int, list[str]] = {}
        for fqn in sorted(parts):
            for r in self._holders(fqn):
                if r != self.pp_rank:
                    by_peer.setdefault(r, []).append(fqn)
        if not by_peer:
            return
        tensors = {f: tensors_of(parts[f]) for f in {f for fs in by_peer.values() for f in fs}}
        received: dict[str, dict[int, list[torch.Tensor]]] = {}
        for peer, fqns in sorted(by_peer.items()):
            mine = [t for f in fqns for t in tensors[f]]
            if not mine:
                continue
            flat = torch.cat([t.reshape(-1) for t in mine])
            buf = torch.empty_like(flat)
            g = self._global(peer)
            works = dist.batch_isend_irecv([dist.P2POp(dist.isend, flat, g, self.pp_group),
                                            dist.P2POp(dist.irecv, buf, g, self.pp_group)])
            self._wait(works, f"{what} with pp rank {peer}: {', '.join(fqns)}")
            pieces = iter(buf.split([t.numel() for t in mine]))
            for f in fqns:
                received.setdefault(f, {})[peer] = [next(pieces).view_as(t) for t in tensors[f]]
        with torch.no_grad():
            for f, from_peer in received.items():
                holders = self._holders(f)
                for i, t in enumerate(tensors[f]):
                    parts_ = [t.clone() if r == self.pp_rank else from_peer[r][i] for r in holders]
                    total = parts_[0]
                    for x in parts_[1:]:
                        total = total + x
                    t.copy_(total)

    def reduce_tied_grads(self) -> None:
        """Sum the gradients of parameters held on several pp ranks: the embedding's copy on the last
        stage (1F1B/ZB1P with MTP, pp > 1) and every parameter of DualPipe's twin stages (rank r and
        pp-1-r hold the same two stages). DualPipeV shares the embedding on rank 0 in memory: nothing
        to do. Call after step(), before the data-parallel reduction and clipping. A missing grad counts
        as zeros (and is materialised) so that both ranks send the same layout."""
        def grads(mod):
            out = []
            for p in mod.parameters():
                if p.requires_grad:
                    g = getattr(p, "main_grad", None)  # ZeRO-1's FP32 grad buffer (parallel/zero.py)
                    if g is None:
                        if p.grad is None:
                            p.grad = torch.zeros_like(p)
                        g = p.grad
                    out.append(g)
            return out

        self._tied_exchange(grads, "reduce_tied_grads")

    def reduce_tied_loads(self) -> None:
        """DualPipe: sum each MoE layer's tokens_per_expert over the two ranks holding it (each ran half
        of the micro-batches). Call before the dp all-reduce of the loads and the bias update."""
        from moeforge.model.moe import MoE

        self._tied_exchange(lambda mod: [m.tokens_per_expert for m in mod.modules() if isinstance(m, MoE)],
                            "reduce_tied_loads")


def _part_of(name: str) -> str:
    head, _, rest = name.partition(".")
    return f"{head}.{rest.partition('.')[0]}" if head in ("layers", "mtp") else head
