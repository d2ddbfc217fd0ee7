"""The `parallel` slice of the job config (validated against the world size later, in ParallelDims)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ParallelConfig:
    pp: int = 1  # pipeline stages (ranks along the pipeline)
    ep: int = 1  # expert-parallel degree, carved out of data parallelism (dp = world / pp)
    ranks_per_node: int | None = None  # None: torchrun's local world size
    backend: str = "auto"  # auto (nccl on CUDA, gloo on CPU) | gloo | nccl
    timeout_s: float = 300.0  # every process group's collective timeout
    two_hop: bool = False  # EP dispatch crosses the inter-node link once per destination node, then NVLink
    fp8_dispatch: bool = False  # EP dispatch payload in E4M3 (1x128 tiles, power-of-2 scales); combine stays high precision

    def __post_init__(self):
        if self.pp < 1:
            raise ValueError(f"parallel.pp must be >= 1, got {self.pp}")
        if self.ep < 1:
            raise ValueError(f"parallel.ep must be >= 1, got {self.ep}")
        if self.ranks_per_node is not None and self.ranks_per_node < 1:
            raise ValueError(f"parallel.ranks_per_node must be >= 1, got {self.ranks_per_node}")
        if self.backend not in ("auto", "gloo", "nccl"):
            raise ValueError(f"parallel.backend={self.backend!r} not in auto|gloo|nccl")
        if self.timeout_s <= 0:
            raise ValueError(f"parallel.timeout_s must be > 0, got {self.timeout_s}")
