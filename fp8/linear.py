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

from moeforge.fp8.cache import Fp8WeightCache, weight_cache_bytes
from moeforge.fp8.config import Fp8Config
from moeforge.fp8.gemm import Fp8Ops, check_backend, get_ops

logger = logging.getLogger("moeforge.fp8")


def _wgrad(dy2: torch.Tensor, x_t: tuple[torch.Tensor, torch.Tensor], ops: Fp8Ops, cfg: Fp8Config,
           dtype: torch.dtype) -> torch.Tensor:
    """dW = dY.T @ X with dY quantized 128 x 1 along the tokens, X given as its 128 x 1 tiles, accumulated in FP32."""
    gq_t, gs_t = ops.act_quant_t(dy2, cfg.block, cfg.power_of_2_scales)  # (N, T), (N, T/128)
    return ops.gemm(gq_t, gs_t, *x_t, cfg.block, torch.float32).to(dtype)


def _weight_fp8(weight: torch.Tensor, ops: Fp8Ops, cfg: Fp8Config, cache: Fp8WeightCache | None):
    """W's 128 x 128 blocks: from the module's cache (one quantization per weight version) or made now."""
    def make():
        return ops.weight_quant(weight, cfg.block, cfg.power_of_2_scales)

    return make() if cache is None else cache.get((ops.name, cfg.block, cfg.power_of_2_scales), (weight,), make)


def _act_tiles(x: torch.Tensor, x2: torch.Tensor, ops: Fp8Ops, cfg: Fp8Config, share: bool):
    """X's 1 x 128 tiles. With `share` they are also left on the tensor x (an attribute, gone with x), so the
    next Fp8Linear that reads the same tensor (wq_a and wkv_a; w1 and w3) reuses them: one quantization
    and one cached copy, not two (two FP8 copies of a shared BF16 input would cost as much as the BF16)."""
    share = share and not x.is_inference()  # an inference tensor has no version counter
    key = (ops.name, cfg.block, cfg.power_of_2_scales, x._version, tuple(x.shape)) if share else None
    hit = getattr(x, "_fp8_act_tiles", None) if share else None
    if hit is not None and hit[0] == key:
        return hit[1]
    tiles = ops.act_quant(x2, cfg.block, cfg.power_of_2_scales)
    if share:
        x._fp8_act_tiles = (key, tiles)
    return tiles


class Fp8LinearFunction(torch.autograd.Function):
    """y = x @ W.T (+ b) with FP8 Fprop/Dgrad/Wgrad.

    Saved for backward (TR §3.3.3), with cache_x (default: cfg.cache_fp8_activations): X's 1 x 128 FP8 tiles
    from Fprop (1 + 4/128 bytes per element; shared with every other Fp8Linear that reads the same tensor,
    see _act_tiles), turned into Wgrad's 128 x 1 tiles by ops.act_requant_t;
    without: X itself (its dtype), quantized 128 x 1 in backward. W's FP8 blocks come from `wcache`
    (Fp8WeightCache: one quantization per weight version, shared by every micro-batch) and are saved beside
    W; without a cache they are made in forward and again in backward, and only W is saved.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, ops: Fp8Ops, cfg: Fp8Config, wcache: Fp8WeightCache | None = None,
                cache_x: bool | None = None):
        cache_x = cfg.cache_fp8_activations if cache_x is None else cache_x
        x2 = x.reshape(-1, x.shape[-1])
        xq, xs = _act_tiles(x, x2, ops, cfg, share=cache_x)
        wq, ws = _weight_fp8(weight, ops, cfg, wcache)
        y = ops.gemm(xq, xs, wq, ws, cfg.block, x.dtype)  # Fprop
        if bias is not None:
            y = y + bias.to(y.dtype)
        need_x = ctx.needs_input_grad[1]  # X is read by Wgrad only
        saved_x = ((xq, xs) if cache_x else (x2,)) if need_x else ()
        saved_w = (wq, ws) if wcache is not None else ()  # the cache's tensors: no bytes of their own per call
        ctx.save_for_backward(weight, *saved_w, *saved_x)
        ctx.n_w, ctx.cache_x = len(saved_w), cache_x
        ctx.ops, ctx.cfg = ops, cfg
        ctx.x_shape, ctx.x_dtype, ctx.has_bias = x.shape, x.dtype, bias is not None
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        weight, *rest = ctx.saved_tensors
        w_fp8, saved_x = rest[:ctx.n_w], rest[ctx.n_w:]
        ops, cfg = ctx.ops, ctx.cfg
        bs, p2 = cfg.block, cfg.power_of_2_scales
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = dw = db = None
        if ctx.needs_input_grad[0]:  # Dgrad: W's 128 x 128 blocks are the same read transposed
            gq, gs = ops.act_quant(dy2, bs, p2)
            wq, ws = w_fp8 if w_fp8 else ops.weight_quant(weight, bs, p2)
            dx = ops.gemm(gq, gs, wq.t(), ws.t(), bs, ctx.x_dtype).view(ctx.x_shape)
        if ctx.needs_input_grad[1]:  # Wgrad: X's 128 x 1 tiles from the cached 1 x 128 tiles, or from X
            x_t = ops.act_requant_t(*saved_x, bs, p2) if ctx.cache_x else ops.act_quant_t(saved_x[0], bs, p2)
            dw = _wgrad(dy2, x_t, ops, cfg, weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy2.sum(dim=0, dtype=torch.float32).to(dy.dtype)
        return dx, dw, db, None, None, None, None


class Fp8Linear(nn.Linear):
    """nn.Linear (same parameters, same state_dict keys) computing its GEMMs in blockwise FP8.

    It stays an nn.Linear subclass so code that initializes or inspects Linears keeps working.
    `cache_input` (default: config.cache_fp8_activations; apply_fp8 turns it off for wo) says whether backward
    keeps X as FP8 tiles; `weight_cache` holds W's FP8 copy (config.cache_fp8_weights), not part of state_dict.
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
        self.cache_input = config.cache_fp8_activations
        self.weight_cache = Fp8WeightCache() if config.cache_fp8_weights else None

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
        return Fp8LinearFunction.apply(x, self.weight, self.bias, self.ops, self.config, self.weight_cache,
                                       self.cache_input)

    def extra_repr(self) -> str:
        cache = "fp8" if self.cache_input else "high precision"
        return f"{super().extra_repr()}, fp8={self.ops.name}, saved input: {cache}"


def default_exclude(fqn: str) -> bool:
    """Keep high precision (TR §3.3): the output head (`head`, `mtp.0.head`, ...), the MoE gate, embeddings."""
    parts = fqn.split(".")
    return parts[-1].endswith("head") or "gate" in parts or any("embed" in p for p in parts)


def default_keep_input(fqn: str) -> bool:
    """Fp8Linears whose backward keeps the input in high precision although cache_fp8_activations is on.

    The attention output projection `wo`: TR §3.3.3 caches its input in a custom E5M6 format (it feeds the
    attention backward's precision-sensitive path). Torch has no 12-bit dtype, so moeforge keeps it in the
    activation dtype (BF16: more mantissa than E5M6, 2 bytes instead of 1.5; docs/fp8.md)."""
    return fqn.split(".")[-1] == "wo"


def fp8_weight_cache_bytes(model: nn.Module, cfg: Fp8Config) -> int:
    """Bytes the FP8 weight caches of `model` hold once warm (0 with cache_fp8_weights off): one per weight of
    every Fp8Linear (grouped experts included: they cache the same blocks stacked) + an FP32 scale per block.
    Works on a meta model; fp8.cache.weight_cache_bytes prices one weight without building anything."""
    if not (cfg.enabled and cfg.cache_fp8_weights):
        return 0
    seen = {id(m): m for m in model.modules() if isinstance(m, Fp8Linear)}
    return sum(weight_cache_bytes(m.out_features, m.in_features, cfg.weight_block) for m in seen.values())


def apply_fp8(
    model: nn.Module,
    cfg: Fp8Config,
    *,
    exclude: Callable[[str], bool] = default_exclude,
    keep_input: Callable[[str], bool] = default_keep_input,
) -> nn.Module:
    """Swap, in place, every module of type exactly nn.Linear whose qualified name `exclude` does not
    match for an Fp8Linear (subclasses, Fp8Linear included, are left alone, so a second call is a no-op).
    With cfg.cache_fp8_activations, the swapped Linears whose name `keep_input` matches (wo) still save
    their input in high precision for backward.

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
                    targets.append((mod, name, child, child_fqn))
    kept_input: list[str] = []
    for parent, name, child, child_fqn in targets:
        if id(child) not in swapped:
            swapped[id(child)] = Fp8Linear.from_linear(child, cfg)
        if cfg.cache_fp8_activations and keep_input(child_fqn):
            swapped[id(child)].cache_input = False
            kept_input.append(child_fqn)
        setattr(parent, name, swapped[id(child)])
    if cfg.grouped_experts:  # routed experts: one grouped FP8 call per projection (same bits on emulate)
        from moeforge.fp8.grouped import apply_grouped_experts

        apply_grouped_experts(model, cfg, exclude=exclude)
    logger.info(
        "fp8: backend=%s, %d nn.Linear -> Fp8Linear (blocks 1x%d / %dx%d, power_of_2_scales=%s); high precision: %s; "
        "backward caches: activations %s (inputs kept high precision: %s), weights %s",
        cfg.backend, len(swapped), cfg.act_block, cfg.weight_block, cfg.weight_block, cfg.power_of_2_scales,
        sorted(set(kept)) or "none",
        f"FP8 1x{cfg.act_block} tiles" if cfg.cache_fp8_activations else "high precision",
        sorted(set(kept_input)) or "none", "FP8, one copy per weight version" if cfg.cache_fp8_weights else "off",
    )
    return model

