"""The step's scalars made global: every rank holds the same numbers afterwards.

Losses are sums over this rank's micro-batches; summing them over dp and pp gives the whole step's sum
(with a pipeline only the ranks holding a last stage have LM/MTP losses, only the stages holding MoE
layers have aux losses; the others add zeros). MoE statistics per layer are taken as a MAX over pp:
each pp rank fills the rows of its own layers and leaves the others at zero (DualPipe's twin stages
hold equal rows), so the MAX is the assembled matrix.

Everything here reduces tensors on the model's device: the groups are NCCL on GPUs, and NCCL takes
device tensors only (the dry run, train/dryrun.py, fails a host tensor on a device group). The host
reads the results once per step (train/trainer.py).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from moeforge.parallel.grad_sync import all_reduce_sum_
from moeforge.parallel.mesh import Meshes


def sum_over_dp_pp_(t: torch.Tensor, meshes: Meshes | None) -> torch.Tensor:
    """In place: t summed over the dp and pp groups (unchanged in a single process)."""
    if meshes is not None and meshes.dims.dp > 1:
        all_reduce_sum_([t], meshes, "dp")
    if meshes is not None and meshes.dims.pp > 1:
        all_reduce_sum_([t], meshes, "pp")
    return t


def max_over_pp_(t: torch.Tensor, meshes: Meshes | None) -> torch.Tensor:
    """In place: the element-wise MAX over the pp group (a no-op without a pipeline)."""
    if meshes is not None and meshes.dims.pp > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=meshes.pp)
    return t
