"""Plain-PyTorch blockwise FP8: quantize, dequantize and the blockwise-scaled GEMM.

This is the ground truth that fp8/kernels.py (Triton) and the cuBLAS path are tested against, and it is
also the `emulate` backend, so it has to be fast enough to train the tiny model on two CPU cores: every
function is a handful of vectorized ops over reshaped blocks, with no Python loop over blocks.

Conventions (the same in kernels.py):
  - q is float8_e4m3fn with the shape of x; s is float32 with one entry per block, s = amax / 448
    (optionally rounded up to a power of two); x ~= q * s.
  - Blocks at the right/bottom edge may be partial (shapes need not be multiples of 128); they are
    zero-padded for the amax, and the padding never reaches q.
  - gemm(a_q, a_s, b_q, b_s) = A @ B.T with A (M, K) in 1 x 128 tiles and B (N, K) either in 1 x 128
    tiles (b_s: (N, K/128)) or in 128 x 128 blocks (b_s: (N/128, K/128)).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite E4M3 value
SCALE_MIN = 2.0**-126  # smallest normal fp32: the floor of every scale (an all-zero block gets it)
_GEMM_CHUNK_ELEMS = 1 << 26  # cap on the (K-blocks, M, N) partial-sum buffer: 256 MiB of fp32


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def ceil_pow2(s: torch.Tensor) -> torch.Tensor:
    """Round positive fp32 values up to a power of two, exactly: add 0x7FFFFF to the bits, clear the mantissa.

    A normal value with a non-zero mantissa carries into the exponent; an exact power of two does not move;
    inf stays inf. NaN is kept as NaN (the bit trick would turn it into -0.0).
    """
    bits = s.view(torch.int32)
    bits = torch.where(torch.isnan(s), torch.zeros_like(bits), bits)
    p2 = ((bits + 0x7FFFFF) & -0x800000).view(torch.float32)  # -0x800000 == 0xFF800000: sign + exponent
    return torch.where(torch.isnan(s), s, p2)


def scale_from_amax(amax: torch.Tensor, power_of_2_scales: bool = False) -> torch.Tensor:
    """s = amax / 448 in fp32, floored at SCALE_MIN; NaN stays NaN, inf stays inf (both poison the block)."""
    s = (amax.float() / FP8_MAX).clamp_min(SCALE_MIN)
    return ceil_pow2(s) if power_of_2_scales else s


def _check_block(block: tuple[int, int], x: torch.Tensor) -> tuple[int, int]:
    br, bc = block
    if br < 1 or bc < 1:
        raise ValueError(f"block sizes must be positive, got {block=}")
    if br != 1 and x.dim() != 2:
        raise ValueError(f"{br}x{bc} blocks need a 2-D tensor, got shape {tuple(x.shape)}")
    return br, bc


def quantize(
    x: torch.Tensor, block: tuple[int, int] = (1, 128), power_of_2_scales: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise E4M3 quantization of x (..., R, C) with (br, bc) blocks -> (q like x, s (..., R/br, C/bc)).

    (1, 128): activations, any leading shape. (128, 1): 2-D only, groups run down the columns (tokens).
    (128, 128): weights, 2-D only. Edge blocks are partial (ceil-divided counts).
    """
    br, bc = _check_block(block, x)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]) if br == 1 else x
    R, C = x2.shape
    nr, nc = cdiv(R, br), cdiv(C, bc)
    xf = x2.float()
    if nr * br != R or nc * bc != C:
        xf = F.pad(xf, (0, nc * bc - C, 0, nr * br - R))
    xb = xf.view(nr, br, nc, bc)
    amax = xb.abs().amax(dim=(1, 3))  # (nr, nc); amax propagates NaN
    s = scale_from_amax(amax, power_of_2_scales)
    # x / s, not x * (1 / s): the element equal to amax lands on 448 (or just above it, then clamped)
    q = (xb / s[:, None, :, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    q = q.reshape(nr * br, nc * bc)  # a view unless x was a strided view itself
    if nr * br != R or nc * bc != C:
        q = q[:R, :C].clone()  # its own storage: a row slice is contiguous but would keep the padded buffer alive
    if br == 1:
        return q.reshape(*lead, C), s.reshape(*lead, nc)
    return q, s


_E4M3_TO_F32 = torch.arange(256, dtype=torch.uint8).view(FP8_DTYPE).float()  # every code's value, CPU


def _to_f32(q: torch.Tensor) -> torch.Tensor:
    """E4M3 -> fp32 (exact). On CPU through a 256-entry table (faster than the scalar cast: docs/fp8.md).

    Not for fake tensors (no values to look up): a fake mode would turn the table into a fake of its own,
    and the next fake mode of the process (the dry run, then the planner's measurement) could not mix it."""
    if q.device.type != "cpu" or isinstance(q, FakeTensor):
        return q.float()
    return torch.take(_E4M3_TO_F32, q.view(torch.uint8).long())


def dequantize(
    q: torch.Tensor, s: torch.Tensor, block: tuple[int, int] = (1, 128), out_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """q * s with every scale broadcast over its (br, bc) block, partial edge blocks included."""
    br, bc = _check_block(block, q)
    lead = q.shape[:-1]
    q2 = q.reshape(-1, q.shape[-1]) if br == 1 else q
    R, C = q2.shape
    nr, nc = cdiv(R, br), cdiv(C, bc)
    s2 = s.reshape(nr, nc)
    qf = _to_f32(q2)
    if nr * br != R or nc * bc != C:
        qf = F.pad(qf, (0, nc * bc - C, 0, nr * br - R))
    x = (qf.view(nr, br, nc, bc) * s2[:, None, :, None]).reshape(nr * br, nc * bc)
    if nr * br != R or nc * bc != C:
        x = x[:R, :C]
    return x.to(out_dtype).reshape(*lead, C) if br == 1 else x.to(out_dtype)


def act_quant(
    x: torch.Tensor, block_size: int = 128, power_of_2_scales: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """1 x block_size tiles along the last dim (per token, per 128 channels): x (..., K) -> q (..., K), s (..., K/128)."""
    return quantize(x, (1, block_size), power_of_2_scales)


def act_quant_t(
    x: torch.Tensor, block_size: int = 128, power_of_2_scales: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """block_size x 1 tiles of x (T, C) along the tokens, returned transposed for the Wgrad GEMM.

    Returns (q_t (C, T), s_t (C, T/128)) = the 1 x 128 tiling of x.T. Here they are transposed views of
    quantize(x, (128, 1)) (no copy); kernels.act_quant_t writes them contiguous. gemm() accepts both.
    """
    if x.dim() != 2:
        raise ValueError(f"act_quant_t needs a 2-D (tokens, channels) tensor, got shape {tuple(x.shape)}")
    q, s = quantize(x, (block_size, 1), power_of_2_scales)
    return q.t(), s.t()


def act_requant_t(
    q: torch.Tensor, s: torch.Tensor, block_size: int = 128, power_of_2_scales: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Wgrad operand from cached 1 x block_size tiles: (q (T, C), s (T, C/128)) -> (q_t (C, T), s_t (C, T/128)).

    Defined as act_quant_t(dequantize(q, s)): the tiles are dequantized in FP32 (q * s, one IEEE product)
    and requantized block_size x 1 along the tokens. With power-of-2 scales both steps are exact in the
    exponent, so the 128 x 1 codes hold the very values the 1 x 128 tiles held (no second rounding) except
    where a value falls below E4M3's smallest normal (2^-6) of its new tile's scale and loses mantissa bits;
    with arbitrary scales every value is rounded a second time (docs/fp8.md, "FP8 activation caches").
    """
    if q.dim() != 2:
        raise ValueError(f"act_requant_t needs 2-D (tokens, channels) tiles, got shape {tuple(q.shape)}")
    return act_quant_t(dequantize(q, s, (1, block_size)), block_size, power_of_2_scales)


def weight_quant(
    w: torch.Tensor, block_size: int = 128, power_of_2_scales: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """block_size x block_size blocks: w (N, K) -> q (N, K), s (N/128, K/128)."""
    return quantize(w, (block_size, block_size), power_of_2_scales)


def b_scale_kind(b_s: torch.Tensor, N: int, nk: int, block_size: int) -> str:
    """'row' if b_s holds 1 x 128 tiles of B (N, nk), 'block' for 128 x 128 blocks (N/128, nk).

    The two shapes coincide only for N <= 1, where both readings give the same numbers.
    """
    if tuple(b_s.shape) == (N, nk):
        return "row"
    if tuple(b_s.shape) == (cdiv(N, block_size), nk):
        return "block"
    raise ValueError(
        f"b_s must be (N, K/{block_size}) = {(N, nk)} for 1x{block_size} tiles or "
        f"(N/{block_size}, K/{block_size}) = {(cdiv(N, block_size), nk)} for blocks, got {tuple(b_s.shape)}"
    )


def check_gemm_args(a_q, a_s, b_q, b_s, block_size: int) -> tuple[int, int, int, int]:
    """Shapes and dtypes of a blockwise GEMM; returns (M, N, K, number of K blocks)."""
    if a_q.dim() != 2 or b_q.dim() != 2 or a_q.shape[1] != b_q.shape[1]:
        raise ValueError(f"gemm computes A (M, K) @ B (N, K).T, got A {tuple(a_q.shape)}, B {tuple(b_q.shape)}")
    if a_q.dtype != FP8_DTYPE or b_q.dtype != FP8_DTYPE:
        raise TypeError(f"gemm operands must be {FP8_DTYPE}, got {a_q.dtype} and {b_q.dtype}")
    if a_s.dtype != torch.float32 or b_s.dtype != torch.float32:
        raise TypeError(f"gemm scales must be float32, got {a_s.dtype} and {b_s.dtype}")
    M, K = a_q.shape
    N = b_q.shape[0]
    nk = cdiv(K, block_size)
    if tuple(a_s.shape) != (M, nk):
        raise ValueError(f"a_s must be (M, K/{block_size}) = {(M, nk)}, got {tuple(a_s.shape)}")
    b_scale_kind(b_s, N, nk, block_size)
    return M, N, K, nk


def _is_transposed(t: torch.Tensor) -> bool:
    return t.dim() == 2 and not t.is_contiguous() and t.t().is_contiguous()


def _dequant_operand(q: torch.Tensor, s: torch.Tensor, kind: str, block_size: int, dtype=torch.float32):
    """(R, K) operand -> fp32, dequantized in its storage layout (a transposed view stays a free view)."""
    if _is_transposed(q):  # e.g. W.T for Dgrad or act_quant_t's views for Wgrad
        block = (block_size, 1) if kind == "row" else (block_size, block_size)
        return dequantize(q.t(), s.t(), block, dtype).t()
    block = (1, block_size) if kind == "row" else (block_size, block_size)
    return dequantize(q, s, block, dtype)


def gemm(
    a_q: torch.Tensor,
    a_s: torch.Tensor,
    b_q: torch.Tensor,
    b_s: torch.Tensor,
    block_size: int = 128,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """C = A @ B.T from blockwise-scaled E4M3 operands, accumulated in FP32. The `emulate` backend.

    Dequantizes each block (q * s, one fp32 rounding) and runs one FP32 matmul over the whole K. On the
    GPU the recipe promotes the tensor-core partial sums to FP32 every 128 along K because the FP8 MMA
    accumulates with ~14 bits; an FP32 matmul has no such accumulator, so here the whole sum is already
    FP32 and the result equals the per-block-promoted one (gemm_blockwise) to FP32 rounding (~1e-7).
    """
    M, N, K, nk = check_gemm_args(a_q, a_s, b_q, b_s, block_size)
    if K == 0:
        return torch.zeros(M, N, dtype=out_dtype, device=a_q.device)
    a = _dequant_operand(a_q, a_s, "row", block_size)
    b = _dequant_operand(b_q, b_s, b_scale_kind(b_s, N, nk, block_size), block_size)
    return (a @ b.t()).to(out_dtype)


def _k_blocks(q: torch.Tensor, nk: int, block_size: int) -> torch.Tensor:
    """(R, K) fp8 -> (nk, R, block_size) fp32 (exact: every E4M3 value is an fp32 value), K zero-padded."""
    R, K = q.shape
    qf = _to_f32(q)
    if nk * block_size != K:
        qf = F.pad(qf, (0, nk * block_size - K))
    return qf.reshape(R, nk, block_size).transpose(0, 1)


def gemm_blockwise(
    a_q: torch.Tensor,
    a_s: torch.Tensor,
    b_q: torch.Tensor,
    b_s: torch.Tensor,
    block_size: int = 128,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The recipe written out literally, as the Triton kernel runs it: C = sum_k (A_k @ B_k.T) * a_s[:, k] * b_s[., k].

    P_k is the product of the raw E4M3 values of one 128-wide K block (the tensor-core MMA), scaled and
    added to an FP32 accumulator (the promotion). All K blocks run as one batched matmul.
    """
    M, N, K, nk = check_gemm_args(a_q, a_s, b_q, b_s, block_size)
    sb = b_s if b_scale_kind(b_s, N, nk, block_size) == "row" else b_s.repeat_interleave(block_size, dim=0)[:N]
    a = _k_blocks(a_q, nk, block_size)  # (nk, M, bs)
    b = _k_blocks(b_q, nk, block_size)  # (nk, N, bs)
    out = torch.zeros(M, N, dtype=torch.float32, device=a_q.device)
    step = max(1, _GEMM_CHUNK_ELEMS // max(1, M * N))
    for k0 in range(0, nk, step):  # one pass unless the partial sums would exceed 256 MiB
        k1 = min(nk, k0 + step)
        p_kMN = torch.bmm(a[k0:k1], b[k0:k1].transpose(1, 2))
        p_kMN.mul_(a_s.t()[k0:k1, :, None]).mul_(sb.t()[k0:k1, None, :])
        out += p_kMN.sum(dim=0)
    return out.to(out_dtype)


def gemm_f64(a_q, a_s, b_q, b_s, block_size: int = 128) -> torch.Tensor:
    """The same product in float64 from the dequantized operands: isolates the accumulation error."""
    M, N, K, nk = check_gemm_args(a_q, a_s, b_q, b_s, block_size)
    a = _dequant_operand(a_q, a_s, "row", block_size, torch.float64)
    b = _dequant_operand(b_q, b_s, b_scale_kind(b_s, N, nk, block_size), block_size, torch.float64)
    return a @ b.t()


def e4m3_rel_rms() -> float:
    """RMS relative rounding error of E4M3 for data whose mantissas follow Benford's law (Gaussian data).

    Round-to-nearest with 3 mantissa bits: the absolute error in the binade [2^e, 2^(e+1)) is uniform on
    ±2^(e-4), variance 2^(2e-6)/12; relative to x = m 2^e: E[d^2] = 2^-6/12 * E[1/m^2], and with
    p(m) = 1/(m ln 2) on [1, 2), E[1/m^2] = 3/(8 ln 2). So d_rms = sqrt(2^-6/12 * 3/(8 ln 2)) ~= 0.0266.
    """
    return math.sqrt(2.0**-6 / 12.0 * 3.0 / (8.0 * math.log(2.0)))


def quantize_for_dispatch(x: torch.Tensor, block_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """The MoE dispatch payload (TR §3.3): 1 x 128 tiles, power-of-2 scales, E4M3 sent as uint8.

    x (T, D) -> (payload uint8 (T, D), scales fp32 (T, D/128)). uint8 because collectives (gloo, and
    NCCL in older torch) do not take fp8 tensors; the bytes are the E4M3 bits unchanged.
    """
    q, s = act_quant(x, block_size, power_of_2_scales=True)
    return q.view(torch.uint8), s


def dequantize_from_dispatch(
    payload: torch.Tensor, scales: torch.Tensor, block_size: int = 128, out_dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """Inverse of quantize_for_dispatch: (uint8 (T, D), scales (T, D/128)) -> x (T, D) in out_dtype."""
    if payload.dtype != torch.uint8:
        raise TypeError(f"dispatch payload must be uint8 (E4M3 bits), got {payload.dtype}")
    return dequantize(payload.view(FP8_DTYPE), scales, (1, block_size), out_dtype)
