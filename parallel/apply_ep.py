"""apply_ep: shard the routed experts over the expert-parallel group and bind the all-to-all dispatcher.

ep rank r keeps the global experts [r·E/ep, (r+1)·E/ep) of every MoE layer and deletes the others from
the layer's ModuleDict (so their memory is really gone; works on a meta-device model before
`to_empty`, and the surviving keys are still the global expert ids, so checkpoints stay layout-free).
Each MoE layer gets an AllToAllDispatcher; everything else in the model is untouched.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from moeforge.comm.all_to_all import AllToAllDispatcher
from moeforge.comm.counters import ByteCounters
from moeforge.comm.streams import CommStream
from moeforge.model.moe import MoE


def apply_ep(model: nn.Module, ep_group: dist.ProcessGroup | None, ep_rank: int, ep_size: int,
             ranks_per_node: int | None = None, two_hop: bool = False, fp8: bool = False,
             counters: ByteCounters | None = None, timeout_s: float = 300.0,
             device: torch.device | None = None) -> nn.Module:
    """Keep this rank's experts in every MoE layer of `model` and route tokens with all-to-all; returns model.

    All layers share one ByteCounters (`counters`, or a new one reachable as `moe.dispatcher.counters`)
    and one comm stream (their exchanges run on it in start order), picked by `device`, where the model
    will compute: a CUDA device gets a CudaCommStream (NCCL collectives on a CUDA stream, issued from the
    main thread), anything else a ThreadCommStream (gloo; comm/streams.py says why not both). `timeout_s`
    is the ep group's collective timeout: a thread wait gives up 30 s after it, so the collective's own
    error (which names the peer) normally comes first; on CUDA the NCCL watchdog enforces it."""
    counters = counters if counters is not None else ByteCounters()
    stream = CommStream.for_device(device, timeout_s=timeout_s + 30.0)
    for name, moe in model.named_modules():
        if not isinstance(moe, MoE):
            continue
        E = moe.n_routed_experts
        if E % ep_size:
            raise ValueError(f"{name}: n_routed_experts={E} is not divisible by parallel.ep={ep_size}")
        lo, hi = ep_rank * (E // ep_size), (ep_rank + 1) * (E // ep_size)
        for key in list(moe.experts.keys()):
            if not lo <= int(key) < hi:
                del moe.experts[key]
        if sorted(map(int, moe.experts.keys())) != list(range(lo, hi)):
            raise ValueError(f"{name}: experts {sorted(map(int, moe.experts.keys()))} after sharding, "
                             f"expected [{lo}, {hi}) for {ep_rank=} of {ep_size=}")
        moe.dispatcher = AllToAllDispatcher(ep_group, ep_rank, ep_size, E, ranks_per_node, two_hop, fp8, counters,
                                            stream)
    return model
