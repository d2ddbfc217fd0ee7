"""ShardedAdamW: AdamW with ZeRO-1 optimizer-state sharding (TR §3.2: ZeRO-1 DP, master weights FP32,
AdamW moments optionally BF16).

How it works. The parameters of one group (dense ones over dp, routed experts over edp) are laid out
in one flat FP32 buffer, decayed parameters first and then the rest, each part sorted by name, padded
so every rank's shard is a multiple of `align` elements. FP32 parameters become views into that
buffer, so the buffer *is* the model's weights (build the optimizer after the model is materialised
and on its device). Rank i of a group of n owns the contiguous slice [i·S, (i+1)·S): it keeps the
moments m, v only for that slice and updates only that slice; all_gather_into_tensor then gives every
rank the whole updated buffer. With no group (or a group of 1) the same code is the plain
single-process AdamW, so every run shares one update formula:

    p ← p·(1 − lr·wd)                  (decoupled weight decay; not for `no_decay` params)
    m ← β1·m + (1 − β1)·g               (lerp, as torch.optim.AdamW)
    v ← β2·v + (1 − β2)·g²
    p ← p − lr/(1 − β1^t) · m / (sqrt(v)/sqrt(1 − β2^t) + eps)

This is torch.optim.AdamW(foreach=False) step for step; BF16 moments are stored in BF16 and the
arithmetic runs in FP32. Every operation is element-wise, and with shard boundaries aligned to
`align` elements a slice goes through the same vectorised kernels as the whole buffer, so ZeRO-1 and
the unsharded optimizer produce bitwise-identical parameters from the same gradients.

Grads arrive already reduced (parallel.grad_sync.reduce_gradients runs first); a missing grad counts
as zeros (unlike torch.optim, which skips the parameter), so sharded and unsharded runs agree.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.distributed as dist

from moeforge.model.transformer import is_expert_param
from .mesh import peer_guard


def _no_decay_default(name: str, p: torch.Tensor) -> bool:
    return p.ndim < 2


@dataclass
class _Segment:
    name: str
    param: torch.Tensor
    start: int  # offset of the parameter in the flat buffer
    numel: int


class _FlatGroup:
    """One flat FP32 buffer over the params of one process group, and this rank's shard of it."""

    def __init__(self, named: list[tuple[str, torch.Tensor]], no_decay, group, moment_dtype, align: int, kind: str):
        self.kind, self.group = kind, group
        self.n = 1 if group is None else dist.get_world_size(group)
        self.rank = 0 if group is None else dist.get_rank(group)
        decay = sorted(((n, p) for n, p in named if not no_decay(n, p)), key=lambda x: x[0])
        plain = sorted(((n, p) for n, p in named if no_decay(n, p)), key=lambda x: x[0])
        self.segments, offset = [], 0
        for name, p in decay + plain:
            self.segments.append(_Segment(name, p, offset, p.numel()))
            offset += p.numel()
        self.numel = offset
        self.decay_end = sum(p.numel() for _, p in decay)
        if self.n > 1:  # every rank of the group must lay out the same parameters, or the shards mean nothing
            layout = zlib.crc32(repr([(s.name, tuple(s.param.shape)) for s in self.segments]).encode())
            # on the parameters' device: the group is NCCL on GPUs (no pickled objects, no host tensors)
            dev = named[0][1].device if named else torch.device("cpu")
            mine = torch.tensor([layout, self.numel], dtype=torch.int64).to(dev)
            seen_t = torch.empty(self.n * 2, dtype=torch.int64, device=dev)
            with peer_guard(f"ShardedAdamW init ({kind}: layout check)", group):
                dist.all_gather_into_tensor(seen_t, mine, group=group)
            seen = [tuple(x) for x in seen_t.view(self.n, 2).tolist()]
            if len(set(seen)) > 1:
                raise ValueError(f"ShardedAdamW {kind}: ranks {dist.get_process_group_ranks(group)} hold different "
                                 f"parameters (layout crc, numel per rank: {seen}); wrong group or wrong is_expert?")
        self.shard = max(1, math.ceil(self.numel / (self.n * align))) * align if self.numel else 0
        self.lo, self.hi = self.rank * self.shard, (self.rank + 1) * self.shard
        device = named[0][1].device if named else torch.device("cpu")
        self.flat = torch.zeros(self.shard * self.n, dtype=torch.float32, device=device)
        self.copies = []  # non-fp32 params: updated from the buffer after each gather
        with torch.no_grad():
            for s in self.segments:
                view = self.flat[s.start:s.start + s.numel]
                view.copy_(s.param.detach().reshape(-1))
                if s.param.dtype == torch.float32:
                    s.param.data = view.view_as(s.param)
                else:
                    self.copies.append(s)
        self.exp_avg = torch.zeros(self.shard, dtype=moment_dtype, device=device)
        self.exp_avg_sq = torch.zeros(self.shard, dtype=moment_dtype, device=device)
        # the parameter pieces inside [lo, hi): (segment, first element, last element + 1) in the param
        self.pieces = [(s, max(self.lo, s.start) - s.start, min(self.hi, s.start + s.numel) - s.start)
                       for s in self.segments if s.start < self.hi and s.start + s.numel > self.lo]

    def grad_shard(self) -> torch.Tensor:
        parts = []
        for s, a, b in self.pieces:
            g = s.param.grad
            parts.append(torch.zeros(b - a, dtype=torch.float32, device=self.flat.device) if g is None
                         else g.reshape(-1)[a:b].float())
        pad = self.hi - max(self.lo, min(self.hi, self.numel))
        if pad:
            parts.append(torch.zeros(pad, dtype=torch.float32, device=self.flat.device))
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def gather(self) -> None:
        if self.n > 1:
            with peer_guard(f"ShardedAdamW.step ({self.kind}: all_gather_into_tensor)", self.group):
                dist.all_gather_into_tensor(self.flat, self.flat[self.lo:self.hi].clone(), group=self.group)
        for s in self.copies:
            s.param.data.copy_(self.flat[s.start:s.start + s.numel].view_as(s.param))


def _covered(intervals: list[tuple[int, int]]) -> int:
    """Length of the union of half-open intervals."""
    total, end = 0, None
    for lo, hi in sorted(intervals):
        if end is None or lo > end:
            total, end = total + hi - lo, hi
        elif hi > end:
            total, end = total + hi - end, hi
    return total


class ShardedAdamW:
    def __init__(self, named_params: Iterable[tuple[str, torch.Tensor]], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.1,
                 no_decay: Callable[[str, torch.Tensor], bool] = _no_decay_default,
                 moment_dtype: torch.dtype = torch.float32, dense_group: dist.ProcessGroup | None = None,
                 expert_group: dist.ProcessGroup | None = None,
                 is_expert: Callable[[str], bool] = is_expert_param, align: int = 128):
        if moment_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"moment_dtype={moment_dtype} must be torch.float32 or torch.bfloat16")
        seen, named = set(), []
        for n, p in named_params:
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                named.append((n, p))
        self.lr, self.betas, self.eps, self.weight_decay = lr, tuple(betas), eps, weight_decay
        self.moment_dtype = moment_dtype
        self.step_count = 0
        self.groups = [
            _FlatGroup([(n, p) for n, p in named if not is_expert(n)], no_decay, dense_group, moment_dtype,
                       align, "dense over dp"),
            _FlatGroup([(n, p) for n, p in named if is_expert(n)], no_decay, expert_group, moment_dtype,
                       align, "experts over edp"),
        ]
        self.params = [p for _, p in named]

    @torch.no_grad()
    def step(self, lr: float | None = None) -> None:
        lr = self.lr if lr is None else lr
        self.step_count += 1
        for g in self.groups:
            if g.numel:
                self._update(g, lr)
                g.gather()

    def _update(self, g: _FlatGroup, lr: float) -> None:
        beta1, beta2 = self.betas
        t = self.step_count
        p = g.flat[g.lo:g.hi]
        grad = g.grad_shard()
        if self.weight_decay and g.decay_end > g.lo:
            p[: min(g.decay_end, g.hi) - g.lo].mul_(1 - lr * self.weight_decay)
        m, v = (g.exp_avg, g.exp_avg_sq) if self.moment_dtype == torch.float32 else \
            (g.exp_avg.float(), g.exp_avg_sq.float())
        m.lerp_(grad, 1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step_size = lr / (1 - beta1 ** t)
        denom = (v.sqrt() / (1 - beta2 ** t) ** 0.5).add_(self.eps)
        p.addcdiv_(m, denom, value=-step_size)
        if self.moment_dtype != torch.float32:
            g.exp_avg.copy_(m)
            g.exp_avg_sq.copy_(v)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    def state_bytes(self) -> int:
        """Bytes of optimizer state held on this rank (the moments of its shards)."""
        return sum(t.numel() * t.element_size() for t in self.state_tensors().values())

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """This rank's state tensors by name ("dense.exp_avg", "experts.exp_avg_sq", ...), not copies."""
        return {f"{g.kind.split()[0]}.{k}": t for g in self.groups
                for k, t in (("exp_avg", g.exp_avg), ("exp_avg_sq", g.exp_avg_sq))}

    def shard_layout(self) -> dict[str, tuple[tuple[int, ...], int, int]]:
        """{parameter name: (its shape, start, end)}: the element range [start, end) of each flattened
        parameter whose moments this rank owns (the ranges state_dict covers)."""
        return {s.name: (tuple(s.param.shape), a, b) for g in self.groups for s, a, b in g.pieces}

    def state_dict(self) -> dict:
        """This rank's moments, keyed by parameter name and the element range [start, end) of the
        flattened parameter they cover; any layout can reassemble them (see load_state_dict). A
        parameter that is not FP32 also gets "master": its FP32 value over that range, which lives
        only in the optimizer's flat buffer."""
        state = {}
        for g in self.groups:
            for s, a, b in g.pieces:
                off = s.start + a - g.lo
                state[s.name] = {"shape": tuple(s.param.shape), "start": a, "end": b,
                                 "exp_avg": g.exp_avg[off:off + b - a].clone(),
                                 "exp_avg_sq": g.exp_avg_sq[off:off + b - a].clone()}
                if s.param.dtype != torch.float32:
                    state[s.name]["master"] = g.flat[s.start + a:s.start + b].clone()
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
                for s, a, b in g.pieces:
                    got = []
                    off = s.start - g.lo  # flat-shard offset of the parameter's element 0
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
                        if "master" in e and s.param.dtype != torch.float32:
                            g.flat[s.start + lo:s.start + hi].copy_(e["master"][src])
                        got.append((lo, hi))
                    covered = _covered(got)
                    if covered < b - a:
                        raise ValueError(f"optimizer state for {s.name}[{a}:{b}] (shape {tuple(s.param.shape)}) "
                                         f"is missing from the state_dict ({covered} of {b - a} elements found)")

    @torch.no_grad()
    def refresh_master(self) -> None:
        """Copy every non-FP32 parameter into its FP32 master in the flat buffer: after its value was
        loaded in place (the buffer, not the parameter, is what the next step updates)."""
        for g in self.groups:
            for s in g.copies:
                g.flat[s.start:s.start + s.numel].copy_(s.param.detach().reshape(-1))
