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
Backward reads FP8 caches (TR §3.3.3; fp8/cache.py, Fp8Config.cache_fp8_activations / cache_fp8_weights): a
Linear saves X as Fprop's 1 x 128 tiles and converts them to Wgrad's 128 x 1 tiles (act_requant_t: exact
with power_of_2_scales, a second rounding without); the grouped experts save xs, h1, h3 as FP8 tiles and
recompute SwiGLU; wo keeps its input in BF16. W's FP8 blocks are made once per weight version.
Expected error vs float64 on Gaussian data: sqrt(2) x 2.66% = 3.7% relative (Frobenius) per GEMM, two
operands' E4M3 rounding (reference.e4m3_rel_rms derives the 2.66%).
"""

import importlib

# Public name -> the submodule that defines it. Nothing is imported until a name is first used (PEP 562), so
# `fp8.config` (the job config, `moeforge plan`) does not pull in torch. A new public name is one line here.
_LAZY = {
    "GroupedExperts": "grouped",
    "GroupedLayout": "grouped",
    "GroupedSwiGLUFunction": "grouped",
    "apply_grouped_experts": "grouped",
    "get_grouped_ops": "grouped",
    "BACKENDS": "config",
    "Fp8Config": "config",
    "Fp8Ops": "gemm",
    "check_backend": "gemm",
    "get_ops": "gemm",
    "unavailable_reason": "gemm",
    "Fp8WeightCache": "cache",
    "act_cache_bytes_per_element": "cache",
    "weight_cache_bytes": "cache",
    "fp8_weight_cache_bytes": "linear",
    "default_keep_input": "linear",
    "Fp8Linear": "linear",
    "Fp8LinearFunction": "linear",
    "apply_fp8": "linear",
    "default_exclude": "linear",
    "dequantize_from_dispatch": "reference",
    "quantize_for_dispatch": "reference",
}
_SUBMODULES = ("cache", "config", "gemm", "linear", "reference")  # `import fp8; fp8.reference` keeps working

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | set(_SUBMODULES))
