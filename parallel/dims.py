"""ParallelDims: the degrees of the (pp, edp, ep) layout, validated before any process group forms.

world = pp × dp, and expert parallelism is carved out of data parallelism: dp = edp × ep (TR §3.2:
PP16 × EP64 × ZeRO-1 DP, no TP). Every check raises ValueError naming the config key and the numbers,
e.g. "parallel.ep=3 must divide dp=4 (world_size=8 / parallel.pp=2)".
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ParallelDims:
    world_size: int
    pp: int = 1
    ep: int = 1
    ranks_per_node: int | None = None  # None: every rank on one node

    def __post_init__(self):
        w, pp, ep, rpn = self.world_size, self.pp, self.ep, self.ranks_per_node
        if w < 1:
            raise ValueError(f"world_size={w} must be >= 1")
        if pp < 1 or w % pp:
            raise ValueError(f"parallel.pp={pp} must be >= 1 and divide world_size={w} (pp·dp = world size)")
        dp = w // pp
        if ep < 1 or dp % ep:
            raise ValueError(f"parallel.ep={ep} must be >= 1 and divide dp={dp} (world_size={w} / parallel.pp={pp})")
        if rpn is not None and (rpn < 1 or w % rpn):
            raise ValueError(f"parallel.ranks_per_node={rpn} must be >= 1 and divide world_size={w}")

    @property
    def dp(self) -> int:
        return self.world_size // self.pp

    @property
    def edp(self) -> int:
        return self.dp // self.ep

    @property
    def n_nodes(self) -> int:
        return self.world_size // (self.ranks_per_node or self.world_size)

    def validate(self, n_routed_experts: int) -> "ParallelDims":
        """Check the expert count against ep; returns self so it chains."""
        if self.ep > n_routed_experts:
            raise ValueError(f"parallel.ep={self.ep} expert-parallel ranks exceed model.n_routed_experts="
                             f"{n_routed_experts}: some ranks would hold no expert")
        if n_routed_experts % self.ep:
            raise ValueError(f"model.n_routed_experts={n_routed_experts} is not divisible by parallel.ep={self.ep}")
        return self

    @classmethod
    def from_config(cls, parallel, world_size: int, local_world_size: int | None = None,
                    n_routed_experts: int | None = None) -> "ParallelDims":
        """From the `parallel` config slice; ranks_per_node defaults to torchrun's local world size."""
        rpn = parallel.ranks_per_node if parallel.ranks_per_node is not None else local_world_size
        dims = cls(world_size=world_size, pp=parallel.pp, ep=parallel.ep, ranks_per_node=rpn)
        return dims.validate(n_routed_experts) if n_routed_experts is not None else dims

    def __str__(self) -> str:
        return (f"world={self.world_size} pp={self.pp} dp={self.dp} (edp={self.edp} × ep={self.ep}) "
                f"ranks_per_node={self.ranks_per_node or self.world_size}")
