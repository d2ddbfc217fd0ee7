"""Where values computed on the device cross to the host.

A host read (`.item()`, `.tolist()`, `float(t)`, `.cpu()`) of a CUDA tensor blocks the Python thread
until the GPU has caught up with everything queued before it: the GPU then idles while Python queues the
next kernels. A training step therefore reads the host only where the algorithm cannot do without:

- the routing counts of each all-to-all (its split sizes) and of each grouped GEMM (its rows per
  expert) are host integers: one read per exchange, through `routing_counts` below;
- the step's losses, grad norm and MoE statistics: one read per step (train/trainer.py), after the
  optimizer step is queued.

`routing_counts` is also the dry run's one stand-in for data (train/dryrun.py): there tensors are fake
(shapes, no values), so the counts a real router would produce do not exist, and the dry run takes
`uniform()` instead: the counts when routing spreads tokens evenly over the experts, which is what the
planner assumes (launcher/plan.py). The read itself still happens, so the dry run counts it.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch

_uniform = False


def routing_counts(counts: torch.Tensor, uniform: Callable[[], list]) -> list:
    """counts.tolist(): the one host read of a dispatch. `uniform()` -> the same nested list shape with
    the counts of evenly spread routing, used by the dry run (where `counts` has no values)."""
    host = counts.tolist()
    return uniform() if _uniform else host


@contextlib.contextmanager
def uniform_routing():
    """Inside: routing_counts returns its uniform() stand-in (the dry run only)."""
    global _uniform
    before, _uniform = _uniform, True
    try:
        yield
    finally:
        _uniform = before


def even_split(total: int, n: int) -> list[int]:
    """`total` spread over n parts as evenly as integers allow (the first parts get the remainder)."""
    q, r = divmod(total, n)
    return [q + (i < r) for i in range(n)]
