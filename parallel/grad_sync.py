"""Data-parallel gradient reduction and global-norm clipping.

Normalisation. Each rank's loss is the mean over its own tokens and the global loss is
L = (1/dp) · Σ_r L_r over the dp ranks of a stage. So:
- dense grads: all-reduce SUM over dp, then divide by dp;
- routed-expert grads (names containing ".experts."): the EP all-to-all backward has already summed
  the contributions of every ep rank's tokens into the rank that holds the expert, so all-reduce SUM
  over edp only, then divide by dp (not edp).
Grads are coalesced into flat buffers (one per group, split at `bucket_numel`) so gloo sees a few
large all-reduces, not one per parameter. A missing grad (a parameter unused this step) counts as
zeros and is materialised, so every rank of a group passes the same buffer.

Clipping. The norm is over every unique parameter of the whole model: dense params are replicated
over dp (count once), experts differ across ep (sum their squares over ep), stages differ across pp
(sum over pp). It equals torch.nn.utils.clip_grad_norm_ on the single-process model.

ZeRO-1. The trainer does not all-reduce: parallel/zero.ShardedAdamW.reduce_gradients reduce-scatters the
same sums into each rank's slice of a flat FP32 grad buffer (same normalisation), and
clip_grad_norm_(..., zero=optimizer) takes the norm from those slices (each element on one rank of dp:
the squares are summed over dp, then pp) and scales only them. reduce_gradients below is the all-reduce
form: the reference the ZeRO-1 path is tested against (tests/dist/test_zero_bytes.py).
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.distributed as dist

from moeforge.model.transformer import is_expert_param

from .mesh import peer_guard

BUCKET_NUMEL = 1 << 27  # 512 MiB of fp32 per flat buffer at most


def _group(groups, axis: str) -> dist.ProcessGroup | None:
    """groups: a parallel.mesh.Meshes, a dict {axis: group}, or None (single process)."""
    if groups is None:
        return None
    pg = groups.get(axis) if isinstance(groups, dict) else getattr(groups, axis, None)
    return pg if pg is not None and dist.get_world_size(pg) > 1 else None


def _size(pg: dist.ProcessGroup | None) -> int:
    return 1 if pg is None else dist.get_world_size(pg)


def _unique(named_params: Iterable[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
    seen, out = set(), []
    for name, p in named_params:
        if id(p) not in seen and p.requires_grad:
            seen.add(id(p))
            out.append((name, p))
    return out


def _allreduce_flat(params: list[torch.Tensor], group: dist.ProcessGroup, divide_by: int, what: str,
                    bucket_numel: int) -> None:
    """SUM-all-reduce the grads of `params` through flat buffers, then divide by `divide_by`."""
    bucket: list[torch.Tensor] = []
    numel = 0

    def flush():
        if not bucket:
            return
        flat = torch.cat([p.grad.reshape(-1) for p in bucket])
        with peer_guard(what, group):
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        flat.div_(divide_by)
        for p, g in zip(bucket, flat.split([p.numel() for p in bucket])):
            p.grad.copy_(g.view_as(p.grad))
        bucket.clear()

    for p in params:
        if bucket and (numel + p.numel() > bucket_numel or p.grad.dtype != bucket[0].grad.dtype):
            flush()
            numel = 0
        bucket.append(p)
        numel += p.numel()
    flush()


@torch.no_grad()
def reduce_gradients(named_params: Iterable[tuple[str, torch.Tensor]], groups,
                     is_expert: Callable[[str], bool] = is_expert_param, bucket_numel: int = BUCKET_NUMEL) -> None:
    """Dense grads: SUM over dp / dp. Expert grads: SUM over edp / dp. In place on p.grad."""
    params = _unique(named_params)
    for _, p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    dp, edp = _group(groups, "dp"), _group(groups, "edp")
    n_dp = _size(dp)
    dense = [p for n, p in params if not is_expert(n)]
    expert = [p for n, p in params if is_expert(n)]
    if dp is not None and dense:
        _allreduce_flat(dense, dp, n_dp, "reduce_gradients (dense, all-reduce over dp)", bucket_numel)
    if expert and n_dp > 1:
        if edp is not None:
            _allreduce_flat(expert, edp, n_dp, "reduce_gradients (experts, all-reduce over edp)", bucket_numel)
        else:  # edp = 1 (ep = dp): the all-to-all backward already summed every rank's tokens
            torch._foreach_div_([p.grad for p in expert], n_dp)


@torch.no_grad()
def grad_norm(named_params: Iterable[tuple[str, torch.Tensor]], groups,
              is_expert: Callable[[str], bool] = is_expert_param) -> torch.Tensor:
    """Global L2 norm of the (reduced) grads of the whole model, as an fp32 scalar on the grads' device."""
    params = [(n, p) for n, p in _unique(named_params) if p.grad is not None]
    device = params[0][1].grad.device if params else torch.device("cpu")
    sq = {}
    for kind, sel in (("dense", False), ("expert", True)):
        grads = [p.grad for n, p in params if is_expert(n) == sel]
        # accumulated in fp64: the same number whatever the layout (ZeRO-1 cuts parameters into pieces), to
        # rounding; an fp32 norm of a 2M-element tensor is off by ~3e-5 on CPU
        norms = torch._foreach_norm(grads, 2.0, dtype=torch.float64) if grads else []
        sq[kind] = torch.stack(norms).square().sum() if grads else \
            torch.zeros((), dtype=torch.float64, device=device)
    ep, pp = _group(groups, "ep"), _group(groups, "pp")
    if ep is not None:  # each ep rank holds different experts; edp replicas are identical
        with peer_guard("clip_grad_norm_ (expert squares, all-reduce over ep)", ep):
            dist.all_reduce(sq["expert"], group=ep)
    total = sq["dense"] + sq["expert"]
    if pp is not None:  # each stage holds different layers
        with peer_guard("clip_grad_norm_ (all-reduce over pp)", pp):
            dist.all_reduce(total, group=pp)
    return total.sqrt().float()


@torch.no_grad()
def clip_grad_norm_(named_params: Iterable[tuple[str, torch.Tensor]], max_norm: float, groups=None,
                    is_expert: Callable[[str], bool] = is_expert_param,
                    norm_params: Iterable[tuple[str, torch.Tensor]] | None = None, zero=None) -> torch.Tensor:
    """Scale grads in place by min(1, max_norm / (norm + 1e-6)); returns the global norm (fp32 tensor).

    `norm_params` (default: named_params) are the params the norm counts: where a stage lives on two
    ranks (DualPipe, not V, holds stages r and PP-1-r on rank r), pass chunk 0's params only, so every
    stage counts once; all of named_params are scaled. `zero`: a ShardedAdamW whose reduce_gradients ran:
    the grads are its reduced slices (named_params are its parameters); the norm comes from them and only
    they are scaled (ShardedAdamW.clip_grad_norm_)."""
    if zero is not None:
        return zero.clip_grad_norm_(max_norm, groups, norm_params)
    named_params = list(named_params)
    norm = grad_norm(named_params if norm_params is None else norm_params, groups, is_expert)
    grads = [p.grad for _, p in _unique(named_params) if p.grad is not None]
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    if grads:
        torch._foreach_mul_(grads, coef.to(grads[0].device))
    return norm


def all_reduce_fp64_(sq: torch.Tensor, pg: dist.ProcessGroup, what: str) -> None:
    """SUM one fp64 scalar (a sum of squares) over `pg`, in place."""
    with peer_guard(what, pg):
        dist.all_reduce(sq, group=pg)


@torch.no_grad()
def all_reduce_sum_(tensors: list[torch.Tensor], groups, axis: str = "dp") -> None:
    """SUM small tensors over one axis in one flat all-reduce (MoE loads for the bias update, loss sums)."""
    pg = _group(groups, axis)
    if pg is None or not tensors:
        return
    flat = torch.cat([t.reshape(-1).double() for t in tensors])
    with peer_guard(f"all_reduce_sum_ over {axis}", pg):
        dist.all_reduce(flat, group=pg)
    for t, x in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(x.view_as(t))
