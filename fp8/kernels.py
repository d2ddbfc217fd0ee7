"""Triton kernels for blockwise FP8, with the signatures of fp8/reference.py.

  quantize(x, block, power_of_2_scales)  one kernel for 1 x 128, 128 x 1 and 128 x 128 groups
  act_quant / act_quant_t / weight_quant  the three uses of it in Fp8Linear
  act_requant_t(q, s)                     cached 1 x 128 tiles -> 128 x 1 tiles, transposed (Wgrad's X operand)
  gemm(a_q, a_s, b_q, b_s)               C = A @ B.T, FP8 tl.dot per 128-wide K block, promoted to FP32

Importing this module needs triton; fp8/gemm.py imports it only when the triton backend is chosen.
Under TRITON_INTERPRET=1 the kernels run on CPU tensors (tests/unit/test_fp8_triton_interpret.py); the
interpreter's fp32 -> fp8 cast is wrong, so those tests read the quantizer's pre-cast values (`_q_dtype`)
and feed the GEMM with torch-quantized operands.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeforge.fp8.reference import FP8_DTYPE, b_scale_kind, cdiv, check_gemm_args



@triton.jit
def _amax(ax, axis: tl.constexpr):
    # tl.max drops NaN (maxnum on the GPU); a NaN anywhere in a group must poison its scale instead.
    n_nan = tl.sum((ax != ax).to(tl.int32), axis)
    return tl.where(n_nan > 0, float("nan"), tl.max(ax, axis))


@triton.jit
def _scale_from_amax(amax, POW2: tl.constexpr):
    # s = amax / 448 (IEEE division, bitwise equal to torch), floored at the smallest normal fp32.
    s = tl.maximum(tl.math.div_rn(amax, 448.0), 1.1754943508222875e-38, propagate_nan=tl.PropagateNan.ALL)
    if POW2:  # round up to a power of two: add 0x7FFFFF to the bits and clear the mantissa
        is_nan = s != s
        bits = tl.where(is_nan, 0, s.to(tl.int32, bitcast=True))
        p2 = ((bits + 0x7FFFFF) & -8388608).to(tl.float32, bitcast=True)
        s = tl.where(is_nan, s, p2)
    return s


@triton.jit
def _quant_kernel(
    x_ptr, q_ptr, s_ptr, R, C,
    sxr, sxc, sqr, sqc, ssr, ssc,
    GROUP_R: tl.constexpr, GROUP_C: tl.constexpr, TILE_R: tl.constexpr, TILE_C: tl.constexpr,
    POW2: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_r = pid_r * TILE_R + tl.arange(0, TILE_R)
    offs_c = pid_c * TILE_C + tl.arange(0, TILE_C)
    mask = (offs_r[:, None] < R) & (offs_c[None, :] < C)
    x = tl.load(x_ptr + offs_r[:, None] * sxr + offs_c[None, :] * sxc, mask=mask, other=0.0).to(tl.float32)
    ax = tl.abs(x)  # the zero padding of edge blocks never raises an amax
    if GROUP_R == 1:  # 1 x TILE_C groups: one scale per row of the tile
        s = _scale_from_amax(_amax(ax, 1), POW2)
        y = tl.math.div_rn(x, s[:, None])
        tl.store(s_ptr + offs_r * ssr + pid_c * ssc, s, mask=offs_r < R)
    elif GROUP_C == 1:  # TILE_R x 1 groups: one scale per column of the tile
        s = _scale_from_amax(_amax(ax, 0), POW2)
        y = tl.math.div_rn(x, s[None, :])
        tl.store(s_ptr + pid_r * ssr + offs_c * ssc, s, mask=offs_c < C)
    else:  # one TILE_R x TILE_C block
        s = _scale_from_amax(_amax(_amax(ax, 1), 0), POW2)
        y = tl.math.div_rn(x, s)
        tl.store(s_ptr + pid_r * ssr + pid_c * ssc, s)
    y = tl.minimum(tl.maximum(y, -448.0, propagate_nan=tl.PropagateNan.ALL), 448.0, propagate_nan=tl.PropagateNan.ALL)
    tl.store(q_ptr + offs_r[:, None] * sqr + offs_c[None, :] * sqc, y.to(q_ptr.dtype.element_ty), mask=mask)


def _launch_quant(x2, q, s, q_strides, s_strides, block, power_of_2_scales):
    br, bc = block
    R, C = x2.shape
    if br == 1:
        tile_r, tile_c = 32, bc
    elif bc == 1:
        tile_r, tile_c = br, 32
    else:
        tile_r, tile_c = br, bc
    grid = (cdiv(R, tile_r), cdiv(C, tile_c))
    if grid[0] * grid[1] == 0:
        return
    _quant_kernel[grid](
        x2, q, s, R, C,
        x2.stride(0), x2.stride(1), *q_strides, *s_strides,
        GROUP_R=br, GROUP_C=bc, TILE_R=tile_r, TILE_C=tile_c, POW2=power_of_2_scales,
        num_warps=8 if tile_r * tile_c >= 128 * 128 else 4,
    )


def quantize(
    x: torch.Tensor,
    block: tuple[int, int] = (1, 128),
    power_of_2_scales: bool = False,
    *,
    _q_dtype: torch.dtype = FP8_DTYPE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as reference.quantize. `_q_dtype=torch.float32` stores the clamped x / s before the
    cast (used by the CPU interpreter tests, whose fp8 cast is wrong)."""
    br, bc = block
    for b in block:
        if b != 1 and (b < 16 or b & (b - 1)):
            raise ValueError(f"Triton quantize needs power-of-two blocks >= 16 (or 1), got {block=}")
    if br != 1 and x.dim() != 2:
        raise ValueError(f"{br}x{bc} blocks need a 2-D tensor, got shape {tuple(x.shape)}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]) if br == 1 else x
    R, C = x2.shape
    q = torch.empty(R, C, dtype=_q_dtype, device=x.device)
    s = torch.empty(cdiv(R, br), cdiv(C, bc), dtype=torch.float32, device=x.device)
    _launch_quant(x2, q, s, q.stride(), s.stride(), block, power_of_2_scales)
    if br == 1:
        return q.view(*lead, C), s.view(*lead, s.shape[-1])
    return q, s


def act_quant(x, block_size: int = 128, power_of_2_scales: bool = False, *, _q_dtype=FP8_DTYPE):
    return quantize(x, (1, block_size), power_of_2_scales, _q_dtype=_q_dtype)


def weight_quant(w, block_size: int = 128, power_of_2_scales: bool = False, *, _q_dtype=FP8_DTYPE):
    return quantize(w, (block_size, block_size), power_of_2_scales, _q_dtype=_q_dtype)


def act_quant_t(x, block_size: int = 128, power_of_2_scales: bool = False, *, _q_dtype=FP8_DTYPE):
    """block_size x 1 groups of x (T, C), written transposed and contiguous: q_t (C, T), s_t (C, T/128)."""
    if x.dim() != 2:
        raise ValueError(f"act_quant_t needs a 2-D (tokens, channels) tensor, got shape {tuple(x.shape)}")
    T, C = x.shape
    q_t = torch.empty(C, T, dtype=_q_dtype, device=x.device)
    s_t = torch.empty(C, cdiv(T, block_size), dtype=torch.float32, device=x.device)
    # element (t, c) of the 128 x 1 tiling goes to q_t[c, t]; scale (tb, c) to s_t[c, tb]
    _launch_quant(x, q_t, s_t, (1, T), (1, s_t.stride(0)), (block_size, 1), power_of_2_scales)
    return q_t, s_t


@triton.jit
def _requant_t_kernel(
    q_ptr, s_ptr, qt_ptr, st_ptr, T, C,
    sqt, sqc, sst, ssc, sqtc, sqtt, sstc, sstt,
    BLOCK: tl.constexpr, TILE_C: tl.constexpr, POW2: tl.constexpr,
):
    # one program: BLOCK tokens x TILE_C channels; x = q * s (fp32, as reference.dequantize), then one
    # BLOCK x 1 scale per channel and the codes written transposed: q_t[c, t], s_t[c, token tile]
    pid_t = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_t = pid_t * BLOCK + tl.arange(0, BLOCK)
    offs_c = pid_c * TILE_C + tl.arange(0, TILE_C)
    mask = (offs_t[:, None] < T) & (offs_c[None, :] < C)
    q = tl.load(q_ptr + offs_t[:, None] * sqt + offs_c[None, :] * sqc, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + offs_t[:, None] * sst + (offs_c[None, :] // BLOCK) * ssc, mask=mask, other=0.0)
    x = q * s  # padding: 0 * 0; a NaN/inf tile dequantizes to NaN and poisons its 128 x 1 scales
    sc = _scale_from_amax(_amax(tl.abs(x), 0), POW2)
    y = tl.math.div_rn(x, sc[None, :])
    y = tl.minimum(tl.maximum(y, -448.0, propagate_nan=tl.PropagateNan.ALL), 448.0, propagate_nan=tl.PropagateNan.ALL)
    tl.store(st_ptr + offs_c * sstc + pid_t * sstt, sc, mask=offs_c < C)
    tl.store(qt_ptr + offs_c[None, :] * sqtc + offs_t[:, None] * sqtt, y.to(qt_ptr.dtype.element_ty), mask=mask)


def act_requant_t(q, s, block_size: int = 128, power_of_2_scales: bool = False, *, _q_dtype=FP8_DTYPE):
    """Same contract as reference.act_requant_t: 1 x 128 tiles (q (T, C), s (T, C/128)) -> q_t (C, T),
    s_t (C, T/128), contiguous. One read of the FP8 tiles, one write; no high-precision copy of X."""
    if q.dim() != 2:
        raise ValueError(f"act_requant_t needs 2-D (tokens, channels) tiles, got shape {tuple(q.shape)}")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"Triton act_requant_t needs a power-of-two block >= 16, got {block_size}")
    T, C = q.shape
    if tuple(s.shape) != (T, cdiv(C, block_size)):
        raise ValueError(f"scales must be {(T, cdiv(C, block_size))} for 1x{block_size} tiles, got {tuple(s.shape)}")
    q_t = torch.empty(C, T, dtype=_q_dtype, device=q.device)
    s_t = torch.empty(C, cdiv(T, block_size), dtype=torch.float32, device=q.device)
    tile_c = 32
    grid = (cdiv(T, block_size), cdiv(C, tile_c))
    if grid[0] * grid[1]:
        _requant_t_kernel[grid](
            q, s, q_t, s_t, T, C,
            q.stride(0), q.stride(1), s.stride(0), s.stride(1), q_t.stride(0), q_t.stride(1),
            s_t.stride(0), s_t.stride(1),
            BLOCK=block_size, TILE_C=tile_c, POW2=power_of_2_scales, num_warps=4,
        )
    return q_t, s_t


@triton.jit
def _tile_ids(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of program `pid` in grouped launch order: GROUP_M row tiles share the same
    B columns while they are in L2."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    first_m = (pid // (GROUP_M * num_n)) * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % group_size), (pid % (GROUP_M * num_n)) // group_size


@triton.jit
def _gemm_kernel(
    a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, M, N, K,
    sam, sak, sbn, sbk, scm, scn, sasm, sask, sbsn, sbsk,
    B_SCALE_ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    a_ptrs = a_ptr + offs_m[:, None] * sam + offs_k[None, :] * sak  # (BLOCK_M, BLOCK_K) of A
    b_ptrs = b_ptr + offs_k[:, None] * sbk + offs_n[None, :] * sbn  # (BLOCK_K, BLOCK_N) of B.T
    as_ptrs = as_ptr + offs_m * sasm
    bs_ptrs = bs_ptr + (offs_n // B_SCALE_ROWS) * sbsn  # 1: a scale per row of B; 128: per 128 x 128 block
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = offs_k < K - kb * BLOCK_K
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        sa = tl.load(as_ptrs + kb * sask, mask=m_ok, other=0.0)
        sb = tl.load(bs_ptrs + kb * sbsk, mask=n_ok, other=0.0)
        # one K block on the tensor cores, then promoted: scaled and added in FP32 registers
        acc += tl.dot(a, b) * sa[:, None] * sb[None, :]
        a_ptrs += BLOCK_K * sak
        b_ptrs += BLOCK_K * sbk
    c_ptrs = c_ptr + offs_m[:, None] * scm + offs_n[None, :] * scn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


DEFAULT_GEMM_CONFIG = {"BLOCK_M": 128, "BLOCK_N": 128, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}


def gemm(
    a_q: torch.Tensor,
    a_s: torch.Tensor,
    b_q: torch.Tensor,
    b_s: torch.Tensor,
    block_size: int = 128,
    out_dtype: torch.dtype = torch.float32,
    *,
    config: dict | None = None,
) -> torch.Tensor:
    """C = A @ B.T, same contract as reference.gemm. `config` overrides tile sizes/warps/stages (bench)."""
    M, N, K, nk = check_gemm_args(a_q, a_s, b_q, b_s, block_size)
    kind = b_scale_kind(b_s, N, nk, block_size)
    # FP8 wgmma wants both operands K-major: a transposed view (W.T in Dgrad) is copied once here.
    a_q = a_q.contiguous()
    b_q = b_q.contiguous()
    c = torch.empty(M, N, dtype=out_dtype, device=a_q.device)
    if M == 0 or N == 0:
        return c
    if K == 0:
        return c.zero_()
    cfg = {**DEFAULT_GEMM_CONFIG, **(config or {})}
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    grid = (cdiv(M, bm) * cdiv(N, bn),)
    _gemm_kernel[grid](
        a_q, b_q, c, a_s, b_s, M, N, K,
        a_q.stride(0), a_q.stride(1), b_q.stride(0), b_q.stride(1), c.stride(0), c.stride(1),
        a_s.stride(0), a_s.stride(1), b_s.stride(0), b_s.stride(1),
        B_SCALE_ROWS=1 if kind == "row" else block_size,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=block_size, GROUP_M=cfg["GROUP_M"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return c
