"""The step's scalars made global: every rank holds the same numbers afterwards.

Losses are sums over this rank's micro-batches; summing them over dp and pp gives the whole step's sum
(with a pipeline only the ranks holding a last stage have LM/MTP losses, only the stages holding MoE
layers have aux losses; the others add zeros). MoE statistics per layer are taken as a MAX over pp:
each pp rank fills the rows of its own layers and leaves the others at zero (DualPipe's twin stages
hold equal rows), so the MAX is the assembled matrix.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from moeforge.parallel.grad_sync import all_reduce_sum_
from moeforge.parallel.mesh import Meshes


def sum_over_dp_pp(values: list[float], meshes: Meshes | None) -> list[float]:
    """Each value summed over the dp and pp groups (as float64); unchanged in a single process."""
    if meshes is None or (meshes.dims.dp == 1 and meshes.dims.pp == 1):
        return values
    t = torch.tensor(values, dtype=torch.float64)
    all_reduce_sum_([t], meshes, "dp")
    if meshes.dims.pp > 1:
        all_reduce_sum_([t], meshes, "pp")
    return t.tolist()


def max_over_pp_(t: torch.Tensor, meshes: Meshes | None) -> torch.Tensor:
    """In place: the element-wise MAX over the pp group (a no-op without a pipeline)."""
    if meshes is not None and meshes.dims.pp > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=meshes.pp)
    return t
