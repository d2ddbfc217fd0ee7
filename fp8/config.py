"""Fp8Config: the `fp8` slice of the job config (conf/fp8/{off,blockwise}.yaml sets the values)."""

from __future__ import annotations

from dataclasses import dataclass

BACKENDS = ("emulate", "triton", "cublas")


@dataclass(frozen=True)
class Fp8Config:
    enabled: bool = False
    backend: str = "emulate"  # emulate (torch math, CPU or GPU) | triton (GPU) | cublas (torch._scaled_mm, SM90, CUDA >= 12.9)
    power_of_2_scales: bool = False  # round every scale up to a power of two (exact rescaling, UE8M0-compatible)
    act_block: int = 128  # activations / gradients: 1 x act_block tiles (128 x 1 along tokens for Wgrad)
    weight_block: int = 128  # weights: weight_block x weight_block blocks
    grouped_experts: bool = True  # routed experts as one grouped FP8 call (fp8/grouped.py), not a loop; same numerics
    # TR §3.3.3: Linear backward reads its input from the FP8 1 x 128 tiles Fprop made (converted to 128 x 1 for
    # Wgrad), and the grouped experts keep xs, h1, h3 as FP8 tiles and recompute SwiGLU; false: high precision
    cache_fp8_activations: bool = True
    cache_fp8_weights: bool = True  # keep each weight's FP8 blocks between micro-batches until the weight changes

    def __post_init__(self) -> None:
        for name in ("enabled", "power_of_2_scales", "grouped_experts", "cache_fp8_activations", "cache_fp8_weights"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"fp8.{name} must be true or false, got {getattr(self, name)!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"fp8.backend must be one of {BACKENDS}, got {self.backend!r}")
        for name in ("act_block", "weight_block"):
            b = getattr(self, name)
            if not (isinstance(b, int) and b >= 16 and b & (b - 1) == 0):
                raise ValueError(f"fp8.{name} must be a power of two >= 16, got {b!r}")
        # The K tiles of both GEMM operands must line up: each K block of 128 is one FP32 promotion.
        if self.act_block != self.weight_block:
            raise ValueError(
                f"fp8.act_block and fp8.weight_block must be equal (they tile the same K axis), "
                f"got act_block={self.act_block}, weight_block={self.weight_block}"
            )
        if self.backend == "cublas" and self.act_block != 128:
            raise ValueError(f"fp8.backend=cublas supports only 128-wide blocks, got fp8.act_block={self.act_block}")

    @property
    def block(self) -> int:
        return self.act_block
