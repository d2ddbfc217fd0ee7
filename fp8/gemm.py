"""Backend dispatch: which quantizers and which blockwise GEMM an Fp8Linear calls.

  emulate  fp8/reference.py: torch ops, CPU or GPU, the numerics of the recipe without FP8 hardware
  triton   fp8/kernels.py: Triton quantizers and GEMM (needs a CUDA GPU; FP8 tl.dot needs SM89+)
  cublas   torch.nn.functional.scaled_mm with BlockWise1x128 / BlockWise128x128 scales (SM90, CUDA >= 12.9);
           quantizers from Triton when it is installed, else from torch

A backend that cannot run here raises at once with the reason; nothing ever falls back silently.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from moeforge.fp8 import reference
from moeforge.fp8.config import BACKENDS
from moeforge.fp8.reference import b_scale_kind, cdiv, check_gemm_args


@dataclass(frozen=True)
class Fp8Ops:
    """The calls Fp8Linear makes; every backend has the signatures of fp8/reference.py."""

    name: str
    act_quant: Callable  # (x (..., K), block, pow2) -> q, s (..., K/128)          1 x 128
    act_quant_t: Callable  # (x (T, C), block, pow2) -> q_t (C, T), s_t (C, T/128)   128 x 1, transposed
    weight_quant: Callable  # (w (N, K), block, pow2) -> q, s (N/128, K/128)          128 x 128
    gemm: Callable  # (a_q, a_s, b_q, b_s, block, out_dtype) -> A @ B.T
    act_requant_t: Callable  # (q (T, C), s (T, C/128), block, pow2) -> q_t (C, T), s_t (C, T/128): cached 1 x 128 -> 128 x 1


def _has_triton() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # a stubbed-out sys.modules["triton"] = None
        return False


def _cuda_version() -> tuple[int, int]:
    v = torch.version.cuda or "0.0"
    major, minor = (v.split(".") + ["0"])[:2]
    return int(major), int(minor)


def unavailable_reason(backend: str) -> str | None:
    """None when `backend` can run on this machine, otherwise why not (for the error message)."""
    if backend not in BACKENDS:
        return f"fp8.backend must be one of {BACKENDS}, got {backend!r}"
    if backend == "emulate":
        return None
    if not torch.cuda.is_available():
        return f"fp8.backend={backend} needs a CUDA GPU and torch.cuda.is_available() is False; use fp8.backend=emulate"
    if backend == "triton":
        if not _has_triton():
            return "fp8.backend=triton needs the triton package (pip install triton)"
        major, minor = torch.cuda.get_device_capability()
        if (major, minor) < (8, 9):
            return f"fp8.backend=triton needs FP8 tensor cores (SM89+), found sm{major}{minor}"
        return None
    # cublas
    if torch.version.hip:
        return "fp8.backend=cublas: blockwise scaled_mm is CUDA-only (ROCm found)"
    major, minor = torch.cuda.get_device_capability()
    if major != 9:
        return f"fp8.backend=cublas: torch blockwise scaled_mm (1x128, 128x128) runs on SM90 only, found sm{major}{minor}"
    if _cuda_version() < (12, 9):
        return f"fp8.backend=cublas needs CUDA >= 12.9 (cublasLt blockwise scaling), torch has CUDA {torch.version.cuda}"
    if not hasattr(F, "scaled_mm") or not hasattr(F, "ScalingType"):
        return f"fp8.backend=cublas needs torch.nn.functional.scaled_mm (torch >= 2.10), found torch {torch.__version__}"
    return None


def check_backend(backend: str) -> None:
    reason = unavailable_reason(backend)
    if reason is not None:
        raise RuntimeError(reason)


def _pad_fp8(q: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Zero-pad an fp8 matrix to (rows, cols), contiguous (fp8 has no pad kernel: go through uint8)."""
    R, C = q.shape
    if (R, C) == (rows, cols):
        return q.contiguous()
    return F.pad(q.contiguous().view(torch.uint8), (0, cols - C, 0, rows - R)).view(q.dtype)


def _pad_scales(s: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    R, C = s.shape
    if (R, C) == (rows, cols):
        return s
    return F.pad(s, (0, cols - C, 0, rows - R), value=1.0)


def cublas_gemm(
    a_q: torch.Tensor,
    a_s: torch.Tensor,
    b_q: torch.Tensor,
    b_s: torch.Tensor,
    block_size: int = 128,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """C = A @ B.T through cuBLASLt blockwise scaling (the DeepSeek recipes of torch's scaled_mm).

    cuBLAS wants A (M, K) row-major, B as a (K, N) column-major matrix (our (N, K) row-major), 1 x 128
    scales as (rows, K/128) with stride (1, rows), and 128 x 128 scales as (round_up(K/128, 4), N/128)
    with stride (1, round_up(K/128, 4)). M, N, K are zero-padded to multiples of 128 (scales padded with 1).
    """
    if block_size != 128:
        raise ValueError(f"cublas blockwise scaling is fixed at 128, got {block_size=}")
    if a_q.device.type != "cuda":
        raise RuntimeError(f"fp8.backend=cublas runs on CUDA tensors, got a tensor on {a_q.device}")
    M, N, K, nk = check_gemm_args(a_q, a_s, b_q, b_s, block_size)
    kind = b_scale_kind(b_s, N, nk, block_size)
    if M == 0 or N == 0 or K == 0:
        return torch.zeros(M, N, dtype=out_dtype, device=a_q.device)
    Mp, Np, Kp = (cdiv(v, 128) * 128 for v in (M, N, K))
    a = _pad_fp8(a_q, Mp, Kp)
    b = _pad_fp8(b_q, Np, Kp)
    scale_a = _pad_scales(a_s, Mp, nk).t().contiguous().t()  # (Mp, nk), stride (1, Mp)
    ST = F.ScalingType
    if kind == "row":
        scale_b = _pad_scales(b_s, Np, nk).t().contiguous().t()  # (Np, nk), stride (1, Np)
        recipe_b = ST.BlockWise1x128
    else:
        L4 = cdiv(nk, 4) * 4
        scale_b = _pad_scales(b_s, Np // 128, L4).contiguous().t()  # (L4, Np/128), stride (1, L4)
        recipe_b = ST.BlockWise128x128
    out = F.scaled_mm(
        a, b.t(), scale_a, ST.BlockWise1x128, scale_b, recipe_b, output_dtype=out_dtype
    )
    return out if (Mp, Np) == (M, N) else out[:M, :N].contiguous()


def get_ops(backend: str) -> Fp8Ops:
    """The Fp8Ops of `backend`; raises RuntimeError with the reason when it cannot run here."""
    check_backend(backend)
    if backend == "emulate":
        R = reference
        return Fp8Ops("emulate", R.act_quant, R.act_quant_t, R.weight_quant, R.gemm, R.act_requant_t)
    if backend == "triton":
        from moeforge.fp8 import kernels as K

        return Fp8Ops("triton", K.act_quant, K.act_quant_t, K.weight_quant, K.gemm, K.act_requant_t)
    Q = reference
    if _has_triton():
        from moeforge.fp8 import kernels as Q
    return Fp8Ops("cublas", Q.act_quant, Q.act_quant_t, Q.weight_quant, cublas_gemm, Q.act_requant_t)
