"""Fused Triton kernels for the MoE expert path, each beside its torch twin (`*_ref`, the same contract).

  permute_quant(x, src)       rows x[src[i]] (a zero row where src[i] < 0) quantized in one pass: 1 x 128
                              tiles -> q (R, C), s (R, C/128); or 128 x 1 tiles along the rows, written
                              transposed -> q_t (C, R), s_t (C, R/128) (the Wgrad operand). With src the
                              padded-row map of fp8.grouped.GroupedLayout this is "sort by expert + pad to
                              128 + quantize"; with power_of_2_scales it is the dispatch payload's quantizer.
  swiglu_quant(h1, h3)        silu(h1) * h3 quantized 1 x 128; h itself is never written
  rmsnorm_quant(x, w, eps)    y = rms_norm(x) * w (in x's dtype) and y quantized 1 x 128, one read of x

Why they pay (bytes moved per element, BF16 activations, FP8 out): unfused, permute (gather, pad) then
quantize reads and writes 2 + 2 + 2 + 2 and reads 2, writes 1 (11 B); fused: read 2, write 1 (3 B).
SwiGLU then quantize: silu (2 + 2), mul (2 + 2 + 2), quantize (2 + 1) = 13 B; fused: 2 + 2 + 1 = 5 B.
RMSNorm then quantize: 2 + 2, then 2 + 1 = 7 B (more with torch's FP32 upcast); fused: 2 + 2 + 1 = 5 B.

Numerics. permute_quant is the quantizer of fp8/kernels.py behind a row index: scales bitwise equal to
fp8.reference, codes too (the same IEEE division and cast). swiglu_quant and rmsnorm_quant round their
intermediate to the input dtype exactly where torch's unfused ops do (silu, then the product; the norm's
output), but their exp / sqrt and sum order are Triton's, so h or y may differ from torch by an ulp in
rare elements and with it a scale by an ulp or a code by one step: their tests use tolerances.
Under TRITON_INTERPRET=1 (CPU tests) the interpreter's fp32 -> fp8 / bf16 casts are wrong: `_q_dtype=
torch.float32` stores the pre-cast values and the tests cast them with torch, in FP32 only.
Importing this module needs no triton (the twins are torch); the kernels exist when triton is installed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moeforge.fp8 import reference as R
from moeforge.fp8.reference import FP8_DTYPE, cdiv

try:  # the kernels need triton; the torch twins below do not
    import triton
    import triton.language as tl

    from moeforge.fp8.kernels import _amax, _scale_from_amax
except ImportError:
    triton = None


# ---- torch twins ------------------------------------------------------------------------------------

def gather_rows(x: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """out[i] = x[src[i]], a zero row where src[i] < 0 (exact copies)."""
    out = x.new_zeros(src.numel(), x.shape[1])
    keep = (src >= 0).nonzero().squeeze(1)
    return out.index_copy_(0, keep, x.index_select(0, src[keep]))


def permute_quant_ref(x, src, block_size: int = 128, power_of_2_scales: bool = False, transposed: bool = False):
    g = gather_rows(x, src)
    if transposed:
        return R.act_quant_t(g, block_size, power_of_2_scales)
    return R.act_quant(g, block_size, power_of_2_scales)


def swiglu_quant_ref(h1, h3, block_size: int = 128, power_of_2_scales: bool = False):
    return R.act_quant(F.silu(h1) * h3, block_size, power_of_2_scales)


def rmsnorm_quant_ref(x, weight, eps: float = 1e-6, block_size: int = 128, power_of_2_scales: bool = False):
    """model.mla.RMSNorm (FP32 math, output in x's dtype) followed by Fp8Linear's 1 x 128 quantization."""
    y = F.rms_norm(x.float(), (x.size(-1),), weight.float(), eps).type_as(x)
    q, s = R.act_quant(y, block_size, power_of_2_scales)
    return y, q, s


# ---- Triton kernels ---------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _store_quant(x, offs_r, offs_c, R, C, q_ptr, s_ptr, sqr, sqc, ssr, ssc, pid_r, pid_c,
                     GROUP_R: tl.constexpr, POW2: tl.constexpr):
        # x: fp32 (TILE_R, TILE_C); 1 x TILE_C groups when GROUP_R == 1, else TILE_R x 1 groups
        ax = tl.abs(x)
        if GROUP_R == 1:
            s = _scale_from_amax(_amax(ax, 1), POW2)
            y = tl.math.div_rn(x, s[:, None])
            tl.store(s_ptr + offs_r * ssr + pid_c * ssc, s, mask=offs_r < R)
        else:
            s = _scale_from_amax(_amax(ax, 0), POW2)
            y = tl.math.div_rn(x, s[None, :])
            tl.store(s_ptr + pid_r * ssr + offs_c * ssc, s, mask=offs_c < C)
        y = tl.minimum(tl.maximum(y, -448.0, propagate_nan=tl.PropagateNan.ALL), 448.0,
                       propagate_nan=tl.PropagateNan.ALL)
        mask = (offs_r[:, None] < R) & (offs_c[None, :] < C)
        tl.store(q_ptr + offs_r[:, None] * sqr + offs_c[None, :] * sqc, y.to(q_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _permute_quant_kernel(x_ptr, src_ptr, q_ptr, s_ptr, R, C, sxr, sxc, sqr, sqc, ssr, ssc,
                              GROUP_R: tl.constexpr, TILE_R: tl.constexpr, TILE_C: tl.constexpr,
                              POW2: tl.constexpr):
        pid_r = tl.program_id(0)
        pid_c = tl.program_id(1)
        offs_r = pid_r * TILE_R + tl.arange(0, TILE_R)
        offs_c = pid_c * TILE_C + tl.arange(0, TILE_C)
        src = tl.load(src_ptr + offs_r, mask=offs_r < R, other=-1)
        mask = (src[:, None] >= 0) & (offs_c[None, :] < C)
        x = tl.load(x_ptr + src[:, None].to(tl.int64) * sxr + offs_c[None, :] * sxc, mask=mask, other=0.0)
        _store_quant(x.to(tl.float32), offs_r, offs_c, R, C, q_ptr, s_ptr, sqr, sqc, ssr, ssc, pid_r, pid_c,
                     GROUP_R, POW2)

    @triton.jit
    def _swiglu_quant_kernel(h1_ptr, h3_ptr, q_ptr, s_ptr, R, C, s1r, s3r, sqr, ssr,
                             TILE_R: tl.constexpr, BLOCK: tl.constexpr, ROUND: tl.constexpr, POW2: tl.constexpr):
        pid_r = tl.program_id(0)
        pid_c = tl.program_id(1)
        offs_r = pid_r * TILE_R + tl.arange(0, TILE_R)
        offs_c = pid_c * BLOCK + tl.arange(0, BLOCK)
        mask = (offs_r[:, None] < R) & (offs_c[None, :] < C)
        a = tl.load(h1_ptr + offs_r[:, None] * s1r + offs_c[None, :], mask=mask, other=0.0).to(tl.float32)
        b = tl.load(h3_ptr + offs_r[:, None] * s3r + offs_c[None, :], mask=mask, other=0.0).to(tl.float32)
        act = tl.math.div_rn(a, 1.0 + tl.exp(-a))  # silu, as torch writes it: x / (1 + exp(-x))
        if ROUND:  # BF16/FP16 in: round where torch's unfused silu and mul round their outputs
            act = act.to(h1_ptr.dtype.element_ty).to(tl.float32)
            h = (act * b).to(h1_ptr.dtype.element_ty).to(tl.float32)
        else:
            h = act * b
        _store_quant(h, offs_r, offs_c, R, C, q_ptr, s_ptr, sqr, 1, ssr, 1, pid_r, pid_c, 1, POW2)

    @triton.jit
    def _rmsnorm_quant_kernel(x_ptr, w_ptr, y_ptr, q_ptr, s_ptr, R, C, eps, sxr, syr, sqr, ssr,
                              TILE_R: tl.constexpr, BLOCK: tl.constexpr, ROUND: tl.constexpr, POW2: tl.constexpr):
        pid_r = tl.program_id(0)
        offs_r = pid_r * TILE_R + tl.arange(0, TILE_R)
        r_ok = offs_r < R
        ss = tl.zeros((TILE_R,), dtype=tl.float32)
        for c0 in range(0, C, BLOCK):  # pass 1: sum of squares in FP32
            offs_c = c0 + tl.arange(0, BLOCK)
            m = r_ok[:, None] & (offs_c[None, :] < C)
            x = tl.load(x_ptr + offs_r[:, None] * sxr + offs_c[None, :], mask=m, other=0.0).to(tl.float32)
            ss += tl.sum(x * x, 1)
        rstd = tl.math.div_rn(1.0, tl.math.sqrt_rn(tl.math.div_rn(ss, C * 1.0) + eps))
        for c0 in range(0, C, BLOCK):  # pass 2 (x again, from L2): y = x * rstd * w, written and quantized
            offs_c = c0 + tl.arange(0, BLOCK)
            m = r_ok[:, None] & (offs_c[None, :] < C)
            x = tl.load(x_ptr + offs_r[:, None] * sxr + offs_c[None, :], mask=m, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + offs_c, mask=offs_c < C, other=0.0).to(tl.float32)
            y = (x * rstd[:, None]) * w[None, :]
            if ROUND:  # the norm's output is rounded to x's dtype before the GEMM quantizes it
                y = y.to(y_ptr.dtype.element_ty).to(tl.float32)
            tl.store(y_ptr + offs_r[:, None] * syr + offs_c[None, :], y.to(y_ptr.dtype.element_ty), mask=m)
            _store_quant(y, offs_r, offs_c, R, C, q_ptr, s_ptr, sqr, 1, ssr, 1, pid_r, c0 // BLOCK, 1, POW2)


def _need_triton() -> None:
    if triton is None:
        raise RuntimeError("moeforge.fp8.fused kernels need the triton package; the *_ref torch twins do not")


def _check_block(block_size: int) -> None:
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")


def permute_quant(x, src, block_size: int = 128, power_of_2_scales: bool = False, transposed: bool = False,
                  *, _q_dtype: torch.dtype = FP8_DTYPE):
    """Same contract as permute_quant_ref: x (M, C), src (R,) int64 (< 0: zero row)."""
    _need_triton()
    _check_block(block_size)
    if x.dim() != 2 or src.dim() != 1:
        raise ValueError(f"permute_quant needs x (M, C) and src (R,), got {tuple(x.shape)} and {tuple(src.shape)}")
    Rn, C = src.numel(), x.shape[1]
    if transposed:  # 128 x 1 groups along the rows; element (r, c) goes to q_t[c, r], scale (rb, c) to s_t[c, rb]
        q = torch.empty(C, Rn, dtype=_q_dtype, device=x.device)
        s = torch.empty(C, cdiv(Rn, block_size), dtype=torch.float32, device=x.device)
        qs, ss, tile, group_r = (1, Rn), (1, s.stride(0)), (block_size, 32), block_size
    else:
        q = torch.empty(Rn, C, dtype=_q_dtype, device=x.device)
        s = torch.empty(Rn, cdiv(C, block_size), dtype=torch.float32, device=x.device)
        qs, ss, tile, group_r = q.stride(), s.stride(), (32, block_size), 1
    grid = (cdiv(Rn, tile[0]), cdiv(C, tile[1]))
    if grid[0] * grid[1]:
        _permute_quant_kernel[grid](
            x, src, q, s, Rn, C, x.stride(0), x.stride(1), *qs, *ss,
            GROUP_R=group_r, TILE_R=tile[0], TILE_C=tile[1], POW2=power_of_2_scales,
            num_warps=8 if tile[0] * tile[1] >= 128 * 128 else 4,
        )
    return q, s


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def swiglu_quant(h1, h3, block_size: int = 128, power_of_2_scales: bool = False, *, _q_dtype=FP8_DTYPE):
    """Same contract as swiglu_quant_ref: h1, h3 (..., C) -> q (..., C), s (..., C/128)."""
    _need_triton()
    _check_block(block_size)
    if h1.shape != h3.shape or h1.dtype != h3.dtype:
        raise ValueError(f"swiglu_quant needs h1, h3 of one shape and dtype, "
                         f"got {tuple(h1.shape)}/{h1.dtype}, {tuple(h3.shape)}/{h3.dtype}")
    lead, C = h1.shape[:-1], h1.shape[-1]
    a, b = _rows(h1), _rows(h3)
    Rn = a.shape[0]
    q = torch.empty(Rn, C, dtype=_q_dtype, device=h1.device)
    s = torch.empty(Rn, cdiv(C, block_size), dtype=torch.float32, device=h1.device)
    tile_r = 16
    grid = (cdiv(Rn, tile_r), cdiv(C, block_size))
    if grid[0] * grid[1]:
        _swiglu_quant_kernel[grid](
            a, b, q, s, Rn, C, a.stride(0), b.stride(0), q.stride(0), s.stride(0),
            TILE_R=tile_r, BLOCK=block_size, ROUND=h1.dtype != torch.float32, POW2=power_of_2_scales, num_warps=4,
        )
    return q.view(*lead, C), s.view(*lead, s.shape[-1])


def rmsnorm_quant(x, weight, eps: float = 1e-6, block_size: int = 128, power_of_2_scales: bool = False,
                  *, _q_dtype=FP8_DTYPE):
    """Same contract as rmsnorm_quant_ref: x (..., C), weight (C,) -> y (..., C) in x's dtype, q, s (..., C/128)."""
    _need_triton()
    _check_block(block_size)
    lead, C = x.shape[:-1], x.shape[-1]
    x2 = _rows(x)
    Rn = x2.shape[0]
    y = torch.empty(Rn, C, dtype=x.dtype, device=x.device)
    q = torch.empty(Rn, C, dtype=_q_dtype, device=x.device)
    s = torch.empty(Rn, cdiv(C, block_size), dtype=torch.float32, device=x.device)
    tile_r = 8
    if Rn:
        _rmsnorm_quant_kernel[(cdiv(Rn, tile_r),)](
            x2, weight.contiguous(), y, q, s, Rn, C, float(eps), x2.stride(0), y.stride(0), q.stride(0), s.stride(0),
            TILE_R=tile_r, BLOCK=block_size, ROUND=x.dtype != torch.float32, POW2=power_of_2_scales, num_warps=4,
        )
    return y.view(*lead, C), q.view(*lead, C), s.view(*lead, s.shape[-1])
