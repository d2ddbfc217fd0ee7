"""ShardedAdamW: AdamW with ZeRO-1 (TR §3.2: ZeRO-1 DP; TR §3.3: FP32 master weights, weight gradients and
optimizer states, AdamW moments optionally BF16).

Layout. The parameters of one group (dense ones over dp, routed experts over edp) are laid out in one
flat buffer, decayed parameters first and then the rest, each part sorted by name. The buffer is cut into
buckets at parameter boundaries (a bucket closes once it holds `bucket_numel` elements; a larger parameter
is a bucket of its own), and each bucket is padded to a multiple of n·`align` elements, n the group size.
Rank i of the group owns slice i of every bucket: [start + i·k, start + (i+1)·k), k = bucket / n. A group
that fits one bucket is the plain layout: rank i owns [i·S, (i+1)·S) of the whole buffer. A parameter lies
in one bucket, so a rank owns one contiguous range of each flattened parameter at most (checkpoints key the
optimizer state by those ranges: train/checkpoint.py).

Three flat buffers per group, on the parameters' device:
- weights: the whole padded buffer in the parameters' dtype; the parameters are views into it, so it *is*
  the model's weights (build the optimizer after the model is materialised, on its device);
- grads: the whole padded buffer in FP32 (Megatron's `main_grad`): every parameter gets `p.main_grad`, a
  view of it. Autograd's accumulation lands there through a hook on each parameter's AccumulateGrad node
  (the first micro-batch's grad is added in, then an FP32 parameter's `.grad` *is* the view and later
  micro-batches accumulate in place; a BF16 parameter's `.grad` is dropped after each add, so its grads
  accumulate in FP32). The pipeline's split backward adds straight into `main_grad` (dualpipe/stage.py
  `_accumulate`). A `.grad` assigned by hand replaces the parameter's grad at the next reduce or step.
- masters and moments for the rank's slices only: m, v (shard numel, `moment_dtype`); the FP32 master
  weights are the weights buffer's own slices when the parameters are FP32, else an FP32 shard of their own.

One step (train/trainer.py):
    reduce_gradients()   reduce-scatter each bucket of the grads over the group (SUM, in place: the rank's
                         slice receives the sum), then divide the slice by dp (dense and experts both:
                         parallel/grad_sync.py's normalisation)
    clip_grad_norm_()    global norm from the squares of each rank's slices, all-reduced (fp64) over dp,
                         then pp; only the slices are scaled
    step(lr)             AdamW on the slices; BF16 parameters: the updated FP32 master is cast to BF16 in the
                         rank's slice of the weights; then all_gather_single of each bucket (in place)
                         gives every rank every weight (half the bytes in BF16)
    zero_grad()          zero the grad buffers

The update formula, shared by every layout (no group, or a group of 1, is the single-process AdamW):

    p ← p·(1 − lr·wd)                  (decoupled weight decay; not for `no_decay` params)
    m ← β1·m + (1 − β1)·g               (lerp, as torch.optim.AdamW)
    v ← β2·v + (1 − β2)·g²
    p ← p − lr/(1 − β1^t) · m / (sqrt(v)/sqrt(1 − β2^t) + eps)

This is torch.optim.AdamW(foreach=False) step for step; BF16 moments are stored in BF16 and the arithmetic
runs in FP32. Every operation is element-wise, and with slice boundaries aligned to `align` elements a
slice goes through the same vectorised kernels as the whole buffer, so ZeRO-1 and the unsharded optimizer
produce bitwise-identical FP32 parameters from the same gradients. A missing grad counts as zeros (unlike
torch.optim, which skips the parameter), so sharded and unsharded runs agree. step() without
reduce_gradients() takes the grads as already reduced (identical on every rank of the group).

The planner prices the same layout: `dp_bytes_per_step` (what a rank sends per step in the reduce-scatter
and the all-gather) and `memory_per_rank` (weights, grads, masters, moments) are pure functions of the
parameter sizes, and the runtime counts its bytes with `counters` (comm/counters.py, prefix "dp/").
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
import torch.distributed as dist

from moeforge.comm.counters import DP_EVENTS, ByteCounters
from moeforge.model.transformer import is_expert_param
from .mesh import peer_guard

BUCKET_NUMEL = 1 << 27  # elements per bucket before it closes: 512 MiB of FP32 grads per collective at most


def _no_decay_default(name: str, p: torch.Tensor) -> bool:
    return p.ndim < 2


# ---- the layout as pure functions (shared with the planner) ------------------------------------------------


@dataclass(frozen=True)
class Bucket:
    start: int  # flat offset of the bucket
    numel: int  # padded size: a multiple of n·align; rank i owns [start + i·k, start + (i+1)·k), k = numel / n
    local: int  # offset of a rank's slice in its shard (the moments, the masters)
    used: int  # elements that belong to parameters (the rest is padding)


def flat_buckets(numels: int | Sequence[int], n: int, align: int = 128,
                 bucket_numel: int = BUCKET_NUMEL) -> list[Bucket]:
    """The buckets of a group whose parameters have `numels` elements, in flat order (an int: one
    parameter of that size), sharded over n ranks. Pure: the optimizer and the planner both call it."""
    sizes = [numels] if isinstance(numels, int) else list(numels)
    if n < 1 or align < 1 or bucket_numel < 1:
        raise ValueError(f"flat_buckets: n={n}, align={align}, bucket_numel={bucket_numel} must be >= 1")
    out, start, local, used = [], 0, 0, 0
    for i, size in enumerate(sizes):
        used += size
        if used and (used >= bucket_numel or i == len(sizes) - 1 or used + sizes[i + 1] > bucket_numel):
            k = max(1, math.ceil(used / (n * align))) * align
            out.append(Bucket(start, k * n, local, used))
            start, local, used = start + k * n, local + k, 0
    return out


def _bytes_of(numels, n: int, elem: int, align: int, bucket_numel: int) -> int:
    """Bytes one rank sends in a ring reduce-scatter (or all-gather) of every bucket: (n−1)/n of each."""
    if n <= 1:
        return 0
    return sum((n - 1) * (b.numel // n) * elem for b in flat_buckets(numels, n, align, bucket_numel))


def dp_bytes_per_step(dense_numels, expert_numels, dp: int, edp: int, grad_bytes: int = 4, weight_bytes: int = 4,
                      align: int = 128, bucket_numel: int = BUCKET_NUMEL) -> dict[str, int]:
    """Data-parallel bytes one rank sends per optimizer step under ZeRO-1, as a ring moves them (what
    NCCL's ring algorithm sends per rank: (n−1)/n of each buffer): the reduce-scatter of the FP32 grads
    and the all-gather of the updated weights (`weight_bytes`: 4 for FP32 parameters, 2 for BF16), dense
    parameters over dp and routed experts over edp. `*_numels`: this rank's parameter sizes in the
    optimizer's flat order (ShardedAdamW.flat_numels()), or their total as an int (the bucket padding is
    then that of one bucket: at most (buckets − 1)·n·align elements fewer)."""
    rs = _bytes_of(dense_numels, dp, grad_bytes, align, bucket_numel) + \
        _bytes_of(expert_numels, edp, grad_bytes, align, bucket_numel)
    ag = _bytes_of(dense_numels, dp, weight_bytes, align, bucket_numel) + \
        _bytes_of(expert_numels, edp, weight_bytes, align, bucket_numel)
    return {"grad_reduce_scatter": rs, "weight_all_gather": ag}


def memory_per_rank(dense_numels, expert_numels, dp: int, edp: int, weight_bytes: int = 4, moment_bytes: int = 4,
                    align: int = 128, bucket_numel: int = BUCKET_NUMEL) -> dict[str, int]:
    """Bytes ShardedAdamW holds on one rank, by category: weights (the padded flat weight buffer the
    parameters live in, every element), grads (the padded FP32 grad buffer, every element), masters
    (FP32 copies of the rank's slices; 0 when the parameters are FP32: the weights are the masters) and
    moments (m and v of the rank's slices). Arguments as dp_bytes_per_step."""
    out = dict.fromkeys(("weights", "grads", "masters", "moments"), 0)
    for numels, n in ((dense_numels, dp), (expert_numels, edp)):
        buckets = flat_buckets(numels, n, align, bucket_numel)
        total = sum(b.numel for b in buckets)
        shard = total // n
        out["weights"] += total * weight_bytes
        out["grads"] += total * 4
        out["masters"] += shard * 4 if weight_bytes != 4 else 0
        out["moments"] += 2 * shard * moment_bytes
    return out


# ---- one group --------------------------------------------------------------------------------------------


@dataclass
class _Segment:
    name: str
    param: torch.Tensor
    start: int  # offset of the parameter in the flat buffer
    numel: int
    main_grad: torch.Tensor | None = None  # its view of the grad buffer


class _FlatGroup:
    """The flat buffers of one process group's parameters, and this rank's slices of them."""

    def __init__(self, named: list[tuple[str, torch.Tensor]], no_decay, group, moment_dtype, align: int, kind: str,
                 bucket_numel: int):
        self.kind, self.group = kind, group
        self.n = 1 if group is None else dist.get_world_size(group)
        self.rank = 0 if group is None else dist.get_rank(group)
        decay = sorted(((n, p) for n, p in named if not no_decay(n, p)), key=lambda x: x[0])
        plain = sorted(((n, p) for n, p in named if no_decay(n, p)), key=lambda x: x[0])
        dtypes = sorted({str(p.dtype).removeprefix("torch.") for _, p in named})
        if len(dtypes) > 1:
            raise ValueError(f"ShardedAdamW {kind}: parameters of several dtypes {dtypes} in one group; model.dtype "
                             f"gives every parameter one dtype")
        self.dtype = named[0][1].dtype if named else torch.float32
        self.fp32 = self.dtype == torch.float32
        if not (self.fp32 or self.dtype == torch.bfloat16 or self.dtype == torch.float16):
            raise ValueError(f"ShardedAdamW {kind}: parameters of dtype {self.dtype}: float32, bfloat16 or float16")
        # the flat order: every bucket's padding is at its end, so offsets advance bucket by bucket
        order = decay + plain
        self.buckets = flat_buckets([p.numel() for _, p in order], self.n, align, bucket_numel) if order else []
        self.segments, self.decay_end, b = [], 0, 0
        offset, in_bucket = 0, 0
        for i, (name, p) in enumerate(order):
            if in_bucket == self.buckets[b].used and b + 1 < len(self.buckets):  # full: skip its padding
                b, in_bucket = b + 1, 0
                offset = self.buckets[b].start
            self.segments.append(_Segment(name, p, offset, p.numel()))
            offset, in_bucket = offset + p.numel(), in_bucket + p.numel()
            if i == len(decay) - 1:
                self.decay_end = offset
        self.numel = sum(p.numel() for _, p in named)  # elements of parameters (no padding)
        if self.n > 1:  # every rank of the group must lay out the same parameters, or the shards mean nothing
            layout = zlib.crc32(repr([(s.name, tuple(s.param.shape)) for s in self.segments]).encode())
            # on the parameters' device: the group is NCCL on GPUs (no pickled objects, no host tensors)
            dev = named[0][1].device if named else torch.device("cpu")
            mine = torch.tensor([layout, self.numel], dtype=torch.int64).to(dev)
            seen_t = torch.empty(self.n * 2, dtype=torch.int64, device=dev)
            with peer_guard(f"ShardedAdamW init ({kind}: layout check)", group):
                dist.all_gather_single(seen_t, mine, group=group)
            seen = [tuple(x) for x in seen_t.view(self.n, 2).tolist()]
            if len(set(seen)) > 1:
                raise ValueError(f"ShardedAdamW {kind}: ranks {dist.get_process_group_ranks(group)} hold different "
                                 f"parameters (layout crc, numel per rank: {seen}); wrong group or wrong is_expert?")
        self.total = sum(bk.numel for bk in self.buckets)
        self.shard = self.total // self.n
        device = named[0][1].device if named else torch.device("cpu")
        self.weights = torch.zeros(self.total, dtype=self.dtype, device=device)
        self.grads = torch.zeros(self.total, dtype=torch.float32, device=device)
        with torch.no_grad():
            for s in self.segments:
                view = self.weights[s.start:s.start + s.numel].view_as(s.param)
                view.copy_(s.param.detach())
                s.param.data = view
                s.main_grad = self.grads[s.start:s.start + s.numel].view_as(s.param)
        # this rank's slice of each bucket: (flat start, local start, k)
        self.slices = [(bk.start + self.rank * (bk.numel // self.n), bk.local, bk.numel // self.n)
                       for bk in self.buckets]
        self.master = None if self.fp32 else torch.empty(self.shard, dtype=torch.float32, device=device)
        self.refresh_master()
        self.exp_avg = torch.zeros(self.shard, dtype=moment_dtype, device=device)
        self.exp_avg_sq = torch.zeros(self.shard, dtype=moment_dtype, device=device)
        # the parameter pieces this rank owns: (segment, first element, last element + 1 in the parameter,
        # offset of the first element in the rank's shard)
        self.pieces = []
        for s in self.segments:
            for lo, local, k in self.slices:
                a, b_ = max(lo, s.start), min(lo + k, s.start + s.numel)
                if a < b_:
                    self.pieces.append((s, a - s.start, b_ - s.start, local + a - lo))

    def master_slice(self, i: int) -> torch.Tensor:
        lo, local, k = self.slices[i]
        return self.weights[lo:lo + k] if self.fp32 else self.master[local:local + k]

    def grad_slices(self) -> list[torch.Tensor]:
        return [self.grads[lo:lo + k] for lo, _, k in self.slices]

    @torch.no_grad()
    def refresh_master(self) -> None:
        if not self.fp32:
            for i, (lo, local, k) in enumerate(self.slices):
                self.master[local:local + k].copy_(self.weights[lo:lo + k])

    def reduce_scatter(self, divide_by: int, counters: ByteCounters) -> None:
        for bk, (lo, _, k) in zip(self.buckets, self.slices):
            mine = self.grads[lo:lo + k]
            if self.n > 1:
                # in place: the rank's slice of the bucket receives the bucket's sum over the group
                with peer_guard(f"ShardedAdamW.reduce_gradients ({self.kind}: reduce_scatter_single)", self.group):
                    dist.reduce_scatter_single(mine, self.grads[bk.start:bk.start + bk.numel], group=self.group)
                counters.add_collective("grad_reduce_scatter", (self.n - 1) * k * self.grads.element_size())
            if divide_by != 1:
                mine.div_(divide_by)

    def gather(self, counters: ByteCounters) -> None:
        if self.n > 1:
            for bk, (lo, _, k) in zip(self.buckets, self.slices):
                with peer_guard(f"ShardedAdamW.step ({self.kind}: all_gather_single)", self.group):
                    dist.all_gather_single(self.weights[bk.start:bk.start + bk.numel], self.weights[lo:lo + k],
                                           group=self.group)
                counters.add_collective("weight_all_gather", (self.n - 1) * k * self.weights.element_size())


def _covered(intervals: list[tuple[int, int]]) -> int:
    """Length of the union of half-open intervals."""
    total, end = 0, None
    for lo, hi in sorted(intervals):
        if end is None or lo > end:
            total, end = total + hi - lo, hi
        elif hi > end:
            total, end = total + hi - end, hi
    return total


def _size(pg) -> int:
    return 1 if pg is None else dist.get_world_size(pg)


class ShardedAdamW:
    def __init__(self, named_params: Iterable[tuple[str, torch.Tensor]], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.1,
                 no_decay: Callable[[str, torch.Tensor], bool] = _no_decay_default,
                 moment_dtype: torch.dtype = torch.float32, dense_group: dist.ProcessGroup | None = None,
                 expert_group: dist.ProcessGroup | None = None,
                 is_expert: Callable[[str], bool] = is_expert_param, align: int = 128,
                 bucket_numel: int = BUCKET_NUMEL, counters: ByteCounters | None = None):
        if moment_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"moment_dtype={moment_dtype} must be torch.float32 or torch.bfloat16")
        seen, named = set(), []
        for n, p in named_params:
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                named.append((n, p))
        self.lr, self.betas, self.eps, self.weight_decay = lr, tuple(betas), eps, weight_decay
        self.moment_dtype, self.align, self.bucket_numel = moment_dtype, align, bucket_numel
        self.step_count = 0
        # dp, the divisor of both groups' grads (parallel/grad_sync.py): the dense group is dp
        self.dp = _size(dense_group)
        self.counters = counters if counters is not None else ByteCounters("dp/", events=DP_EVENTS, links=None)
        self.groups = [
            _FlatGroup([(n, p) for n, p in named if not is_expert(n)], no_decay, dense_group, moment_dtype,
                       align, "dense over dp", bucket_numel),
            _FlatGroup([(n, p) for n, p in named if is_expert(n)], no_decay, expert_group, moment_dtype,
                       align, "experts over edp", bucket_numel),
        ]
        self.params = [p for _, p in named]
        self._reduced = False  # reduce_gradients ran since the last zero_grad: the grad slices are the sums
        self._hooks = []
        with torch.enable_grad():
            for g in self.groups:
                for s in g.segments:
                    self._hook(s)

    def _hook(self, s: _Segment) -> None:
        """Send autograd's accumulation of s.param into its main_grad: a hook on the parameter's AccumulateGrad
        node runs after the node (and after any post-accumulate-grad hook, such as a memory tracker's)."""
        p, main = s.param, s.main_grad
        p.main_grad = main
        acc = p.view_as(p).grad_fn.next_functions[0][0]  # the node autograd keeps for the leaf while we hold it
        fp32 = p.dtype == torch.float32

        def fold(*_):
            g = p.grad
            if g is None or g is main:
                return
            with torch.no_grad():
                main.add_(g)
            p.grad = main if fp32 else None  # FP32: later micro-batches accumulate in place

        self._hooks.append((acc, acc.register_hook(fold)))

    @torch.no_grad()
    def _collect(self) -> None:
        """A grad assigned by hand (p.grad that is not the main_grad view) is the parameter's grad, as in
        torch.optim: copy it into the grad buffer (autograd's own are folded in by the hooks at once)."""
        for g in self.groups:
            for s in g.segments:
                grad = s.param.grad
                if grad is not None and grad is not s.main_grad:
                    s.main_grad.copy_(grad)
                    s.param.grad = s.main_grad if g.fp32 else None

    def flat_numels(self) -> dict[str, list[int]]:
        """{"dense": [...], "experts": [...]}: parameter sizes in flat order (dp_bytes_per_step's input)."""
        return {g.kind.split()[0]: [s.numel for s in g.segments] for g in self.groups}

    @torch.no_grad()
    def reduce_gradients(self) -> None:
        """ZeRO-1's gradient reduction: each rank's slices of the grad buffers receive the SUM over the group
        (dense over dp, experts over edp), divided by dp. Collective over both groups."""
        self._collect()
        for g in self.groups:
            if g.numel:
                g.reduce_scatter(self.dp, self.counters)
        self._reduced = True

    @torch.no_grad()
    def grad_norm(self, groups=None, norm_params: Iterable[tuple[str, torch.Tensor]] | None = None) -> torch.Tensor:
        """Global L2 norm of the reduced grads (after reduce_gradients), an fp32 device scalar: squares of
        each rank's slices (fp64 sum), all-reduced over dp (each dense element is on one rank of dp, each
        expert element on one rank of edp, and dp = edp × ep), then pp. norm_params: the parameters the
        norm counts (DualPipe's twin stages count once: parallel/grad_sync.clip_grad_norm_)."""
        from .grad_sync import _group, all_reduce_fp64_

        dense, experts = self.groups
        ep = _size(_group(groups, "ep"))
        if dense.n * 1 != experts.n * ep and experts.numel:
            raise ValueError(f"ShardedAdamW.grad_norm: dense group of {dense.n} ranks is not the expert group "
                             f"({experts.n}) x ep ({ep}): the optimizer's groups are not meshes.dp and meshes.edp")
        count = None if norm_params is None else {id(p) for _, p in norm_params}
        # one norm per parameter piece, accumulated in fp64 (an fp32 norm of a 2M-element tensor is off by
        # ~3e-5 on CPU, and by a different amount for each way of cutting it into pieces)
        parts = [g.grads[s.start + a:s.start + b] for g in self.groups for s, a, b, _ in g.pieces
                 if count is None or id(s.param) in count]
        device = self.groups[0].grads.device if dense.numel else experts.grads.device
        sq = torch.stack(torch._foreach_norm(parts, 2.0, dtype=torch.float64)).square().sum() if parts else \
            torch.zeros((), dtype=torch.float64, device=device)
        if dense.n > 1:
            all_reduce_fp64_(sq, dense.group, "clip_grad_norm_ (shard squares, all-reduce over dp)")
        pp = _group(groups, "pp")
        if pp is not None:
            all_reduce_fp64_(sq, pp, "clip_grad_norm_ (all-reduce over pp)")
        return sq.sqrt().float()

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, groups=None,
                        norm_params: Iterable[tuple[str, torch.Tensor]] | None = None) -> torch.Tensor:
        """Scale this rank's grad slices by min(1, max_norm / (norm + 1e-6)); returns the global norm."""
        if not self._reduced:
            raise RuntimeError("ShardedAdamW.clip_grad_norm_ before reduce_gradients: the slices are not the sums")
        norm = self.grad_norm(groups, norm_params)
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        slices = [x for g in self.groups for x in g.grad_slices()]
        if slices:
            torch._foreach_mul_(slices, coef.to(slices[0].device))
        return norm

    @torch.no_grad()
    def step(self, lr: float | None = None) -> None:
        lr = self.lr if lr is None else lr
        self._collect()
        self.step_count += 1
        for g in self.groups:
            if g.numel:
                self._update(g, lr)
                g.gather(self.counters)
                # the parameters are views written through the buffer, a write their version counters do not
                # see: bump them, or what keys on the version (fp8/cache.py's FP8 weight copies) stays stale
                for s in g.segments:
                    torch.autograd.graph.increment_version(s.param)

    def _update(self, g: _FlatGroup, lr: float) -> None:
        beta1, beta2 = self.betas
        t = self.step_count
        step_size = lr / (1 - beta1 ** t)
        for i, (lo, local, k) in enumerate(g.slices):
            p, grad = g.master_slice(i), g.grads[lo:lo + k]
            if self.weight_decay and g.decay_end > lo:
                p[: min(g.decay_end, lo + k) - lo].mul_(1 - lr * self.weight_decay)
            m, v = g.exp_avg[local:local + k], g.exp_avg_sq[local:local + k]
            if self.moment_dtype != torch.float32:
                m, v = m.float(), v.float()
            m.lerp_(grad, 1 - beta1)
            v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (v.sqrt() / (1 - beta2 ** t) ** 0.5).add_(self.eps)
            p.addcdiv_(m, denom, value=-step_size)
            if self.moment_dtype != torch.float32:
                g.exp_avg[local:local + k].copy_(m)
                g.exp_avg_sq[local:local + k].copy_(v)
            if not g.fp32:
                g.weights[lo:lo + k].copy_(p)  # the rank's slice of the low-precision weights, then all-gathered

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the grad buffers (the grads live there whatever set_to_none says); with set_to_none, drop
        every parameter's .grad view as torch.optim does (the next backward attaches it again)."""
        for g in self.groups:
            g.grads.zero_()
            for s in g.segments:
                s.param.grad = None if set_to_none or not g.fp32 else s.main_grad
        self._reduced = False

    def grad_buffers(self) -> list[torch.Tensor]:
        """The FP32 grad buffers (memory accounting: train/dryrun.py)."""
        return [g.grads for g in self.groups if g.numel]

    def memory_bytes(self) -> dict[str, int]:
        """What this rank holds, by memory_per_rank's categories (measured from the tensors)."""
        out = dict.fromkeys(("weights", "grads", "masters", "moments"), 0)
        for g in self.groups:
            out["weights"] += g.weights.numel() * g.weights.element_size()
            out["grads"] += g.grads.numel() * g.grads.element_size()
            out["masters"] += 0 if g.master is None else g.master.numel() * g.master.element_size()
            out["moments"] += (g.exp_avg.numel() + g.exp_avg_sq.numel()) * g.exp_avg.element_size()
        return out

    def state_bytes(self) -> int:
        """Bytes of optimizer state held on this rank (the moments of its shards, and FP32 masters where
        the parameters are not FP32)."""
        return sum(t.numel() * t.element_size() for t in self.state_tensors().values())

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """This rank's state tensors by name ("dense.exp_avg", "experts.exp_avg_sq", "dense.master", ...),
        not copies."""
        out = {}
        for g in self.groups:
            kind = g.kind.split()[0]
            out[f"{kind}.exp_avg"], out[f"{kind}.exp_avg_sq"] = g.exp_avg, g.exp_avg_sq
            if g.master is not None:
                out[f"{kind}.master"] = g.master
        return out

    def shard_layout(self) -> dict[str, tuple[tuple[int, ...], int, int]]:
        """{parameter name: (its shape, start, end)}: the element range [start, end) of each flattened
        parameter whose moments this rank owns (the ranges state_dict covers)."""
        return {s.name: (tuple(s.param.shape), a, b) for g in self.groups for s, a, b, _ in g.pieces}

    def state_dict(self) -> dict:
        """This rank's moments, keyed by parameter name and the element range [start, end) of the
        flattened parameter they cover; any layout can reassemble them (see load_state_dict). A
        parameter that is not FP32 also gets "master": its FP32 value over that range, which lives
        only in the optimizer's master shard."""
        state = {}
        for g in self.groups:
            for s, a, b, off in g.pieces:
                state[s.name] = {"shape": tuple(s.param.shape), "start": a, "end": b,
                                 "exp_avg": g.exp_avg[off:off + b - a].clone(),
                                 "exp_avg_sq": g.exp_avg_sq[off:off + b - a].clone()}
                if g.master is not None:
                    state[s.name]["master"] = g.master[off:off + b - a].clone()
        return {"step": self.step_count, "moment_dtype": str(self.moment_dtype).removeprefix("torch."),
                "state": state}

    def load_state_dict(self, state_dict: dict | list[dict]) -> None:
        """Load from one state_dict, or from the list of every rank's state_dict of another layout:
        each parameter range this rank owns is assembled from whichever pieces overlap it. FP32 masters
        of non-FP32 parameters come from the pieces' "master" where saved, else from the parameter."""
        sds = state_dict if isinstance(state_dict, list) else [state_dict]
        steps = {sd["step"] for sd in sds}
        if len(steps) != 1:
            raise ValueError(f"optimizer state pieces disagree on the step: {sorted(steps)}")
        self.step_count = steps.pop()
        self.refresh_master()
        with torch.no_grad():
            for g in self.groups:
                for s, a, b, off0 in g.pieces:
                    got = []
                    off = off0 - a  # shard offset of the parameter's element 0
                    for sd in sds:
                        e = sd["state"].get(s.name)
                        if e is None or tuple(e["shape"]) != tuple(s.param.shape):
                            continue
                        lo, hi = max(a, e["start"]), min(b, e["end"])
                        if lo >= hi:
                            continue
                        src = slice(lo - e["start"], hi - e["start"])
                        g.exp_avg[off + lo:off + hi].copy_(e["exp_avg"][src])
                        g.exp_avg_sq[off + lo:off + hi].copy_(e["exp_avg_sq"][src])
                        if "master" in e and g.master is not None:
                            g.master[off + lo:off + hi].copy_(e["master"][src])
                        got.append((lo, hi))
                    covered = _covered(got)
                    if covered < b - a:
                        raise ValueError(f"optimizer state for {s.name}[{a}:{b}] (shape {tuple(s.param.shape)}) "
                                         f"is missing from the state_dict ({covered} of {b - a} elements found)")

    @torch.no_grad()
    def refresh_master(self) -> None:
        """Copy the rank's slices of non-FP32 weights into their FP32 masters: after the parameters were
        loaded in place (the masters, not the parameters, are what the next step updates)."""
        for g in self.groups:
            g.refresh_master()
