"""Blockwise FP8 training, DeepSeek-V3 style (TR §3.3). How it works here:

Every nn.Linear of attention, the dense FFN, the experts and the MTP projection becomes an Fp8Linear
(apply_fp8). Its three GEMMs read E4M3 operands (3 mantissa bits, max 448) with one FP32 scale per tile:
    Fprop  Y  = X @ W.T    X in 1 x 128 tiles (one token, 128 channels)   W in 128 x 128 blocks
    Dgrad  dX = dY @ W     dY in 1 x 128 tiles                            W: the same blocks, transposed
    Wgrad  dW = dY.T @ X   dY and X in 128 x 1 tiles (128 tokens, one channel): tokens are K here
A scale is computed online from the tile itself: s = amax(|tile|) / 448, so the largest element maps to
448 and q = x / s rounds to E4M3 (saturating at ±448). With power_of_2_scales the scale is rounded up to
2^k, making x / s exact in the exponent (the form used for the MoE dispatch payload). Scales are stored
as fp32 tensors beside q: act (T, K/128), weight (N/128, K/128); edges that are not multiples of 128
form partial tiles (zero-padded for the amax only).
The GEMM multiplies one 128-wide K block on the FP8 tensor cores, then promotes the partial sum to
FP32, scales it by a_s[m, k] * b_s[n, k] and adds it to an FP32 accumulator: the promotion every 128
that keeps FP8's ~14-bit MMA accumulation from hurting long K. Output and gradients leave in the
activation / master-weight dtype (FP32 or BF16); master weights never change dtype, FP8 copies are
transient. Embedding, output head, MoE gate, norms and the attention core stay high precision.
Backends (Fp8Config.backend, explicit and logged): emulate = reference.py torch math on CPU or GPU;
triton = kernels.py; cublas = torch scaled_mm blockwise (SM90, CUDA >= 12.9). NaN/inf propagate: a
non-finite value poisons its tile's scale, so every output it touches is NaN, never a clamped number.
Typical error vs float64 on Gaussian data: ~3.7% relative (Frobenius) per GEMM, see reference.e4m3_rel_rms.
"""

from fp8.config import BACKENDS, Fp8Config
from fp8.gemm import Fp8Ops, check_backend, get_ops, unavailable_reason
from fp8.linear import (
    Fp8Linear,
    Fp8LinearFunction,
    WeightGradStore,
    apply_fp8,
    default_exclude,
    set_wgrad_store,
)
from fp8.reference import dequantize_from_dispatch, quantize_for_dispatch

__all__ = [
    "BACKENDS",
    "Fp8Config",
    "Fp8Linear",
    "Fp8LinearFunction",
    "Fp8Ops",
    "WeightGradStore",
    "apply_fp8",
    "check_backend",
    "default_exclude",
    "dequantize_from_dispatch",
    "get_ops",
    "quantize_for_dispatch",
    "set_wgrad_store",
    "unavailable_reason",
]
