"""Fp8Linear: nn.Linear whose three GEMMs run in blockwise FP8, and apply_fp8 (the module swap).

  Fprop  Y  = X  @ W.T    X: 1 x 128 tiles (per token)      W: 128 x 128 blocks
  Dgrad  dX = dY @ W      dY: 1 x 128 tiles (per token)     W: the same 128 x 128 blocks, transposed
  Wgrad  dW = dY.T @ X    dY, X: 128 x 1 tiles (along tokens, the K of this GEMM)
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
import torch.nn as nn

from moeforge.fp8.config import Fp8Config
from moeforge.fp8.gemm import Fp8Ops, check_backend, get_ops

logger = logging.getLogger("moeforge.fp8")


def _wgrad(dy2: torch.Tensor, x2: torch.Tensor, ops: Fp8Ops, cfg: Fp8Config, dtype: torch.dtype) -> torch.Tensor:
    """dW = dY.T @ X with both quantized 128 x 1 along the tokens, accumulated in FP32."""
    gq_t, gs_t = ops.act_quant_t(dy2, cfg.block, cfg.power_of_2_scales)  # (N, T), (N, T/128)
    xq_t, xs_t = ops.act_quant_t(x2, cfg.block, cfg.power_of_2_scales)  # (K, T), (K, T/128)
    return ops.gemm(gq_t, gs_t, xq_t, xs_t, cfg.block, torch.float32).to(dtype)


class Fp8LinearFunction(torch.autograd.Function):
    """y = x @ W.T (+ b) with FP8 Fprop/Dgrad/Wgrad. Saves x and W (master dtype); the FP8 copies are transient."""

    @staticmethod
    def forward(ctx, x, weight, bias, ops: Fp8Ops, cfg: Fp8Config):
        x2 = x.reshape(-1, x.shape[-1])
        xq, xs = ops.act_quant(x2, cfg.block, cfg.power_of_2_scales)
        wq, ws = ops.weight_quant(weight, cfg.block, cfg.power_of_2_scales)
        y = ops.gemm(xq, xs, wq, ws, cfg.block, x.dtype)  # Fprop
        if bias is not None:
            y = y + bias.to(y.dtype)
        ctx.save_for_backward(x2, weight)
        ctx.ops, ctx.cfg = ops, cfg
        ctx.x_shape, ctx.x_dtype, ctx.has_bias = x.shape, x.dtype, bias is not None
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x2, weight = ctx.saved_tensors
        ops, cfg = ctx.ops, ctx.cfg
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = dw = db = None
        if ctx.needs_input_grad[0]:  # Dgrad: W's 128 x 128 blocks are the same read transposed
            gq, gs = ops.act_quant(dy2, cfg.block, cfg.power_of_2_scales)
            wq, ws = ops.weight_quant(weight, cfg.block, cfg.power_of_2_scales)
            dx = ops.gemm(gq, gs, wq.t(), ws.t(), cfg.block, ctx.x_dtype).view(ctx.x_shape)
        if ctx.needs_input_grad[1]:  # Wgrad
            dw = _wgrad(dy2, x2, ops, cfg, weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy2.sum(dim=0, dtype=torch.float32).to(dy.dtype)
        return dx, dw, db, None, None


class Fp8Linear(nn.Linear):
    """nn.Linear (same parameters, same state_dict keys) computing its GEMMs in blockwise FP8.

    It stays an nn.Linear subclass so code that initializes or inspects Linears keeps working.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        config: Fp8Config = Fp8Config(enabled=True),
    ) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        self.config = config
        self.ops = get_ops(config.backend)

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: Fp8Config) -> "Fp8Linear":
        """Wrap `linear`'s own Parameter objects (no copy), so meta and materialized models both work."""
        with torch.device("meta"):
            new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, config=config)
        new.weight = linear.weight
        new.bias = linear.bias
        new.train(linear.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return Fp8LinearFunction.apply(x, self.weight, self.bias, self.ops, self.config)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fp8={self.ops.name}"


def default_exclude(fqn: str) -> bool:
    """Keep high precision (TR §3.3): the output head (`head`, `mtp.0.head`, ...), the MoE gate, embeddings."""
    parts = fqn.split(".")
    return parts[-1].endswith("head") or "gate" in parts or any("embed" in p for p in parts)


def apply_fp8(
    model: nn.Module,
    cfg: Fp8Config,
    *,
    exclude: Callable[[str], bool] = default_exclude,
) -> nn.Module:
    """Swap, in place, every module of type exactly nn.Linear whose qualified name `exclude` does not
    match for an Fp8Linear (subclasses, Fp8Linear included, are left alone, so a second call is a no-op).

    The Fp8Linear reuses the Linear's Parameters, so this runs before or after materialization and keeps
    optimizer/state_dict identity. Raises RuntimeError when cfg.backend cannot run on this machine.
    """
    if not cfg.enabled:
        logger.info("fp8: disabled, every Linear stays high precision")
        return model
    check_backend(cfg.backend)
    swapped: dict[int, Fp8Linear] = {}  # a Linear shared by two parents becomes one Fp8Linear
    kept: list[str] = []
    targets = []
    for fqn, mod in model.named_modules(remove_duplicate=False):
        for name, child in mod.named_children():
            if type(child) is nn.Linear:
                child_fqn = f"{fqn}.{name}" if fqn else name
                if exclude(child_fqn):
                    kept.append(child_fqn)
                else:
                    targets.append((mod, name, child))
    for parent, name, child in targets:
        if id(child) not in swapped:
            swapped[id(child)] = Fp8Linear.from_linear(child, cfg)
        setattr(parent, name, swapped[id(child)])
    if cfg.grouped_experts:  # routed experts: one grouped FP8 call per projection (same bits on emulate)
        from moeforge.fp8.grouped import apply_grouped_experts

        apply_grouped_experts(model, cfg, exclude=exclude)
    logger.info(
        "fp8: backend=%s, %d nn.Linear -> Fp8Linear (blocks 1x%d / %dx%d, power_of_2_scales=%s); high precision: %s",
        cfg.backend, len(swapped), cfg.act_block, cfg.weight_block, cfg.weight_block, cfg.power_of_2_scales,
        sorted(set(kept)) or "none",
    )
    return model

