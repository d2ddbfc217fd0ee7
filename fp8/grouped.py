"""Grouped blockwise FP8 GEMMs for the routed experts, and one autograd function for a layer's SwiGLU experts.

Layout (DeepGEMM's m-grouped "contiguous" layout). The dispatcher sorts token copies by expert: counts[g]
rows for expert g, back to back (M rows). Here each expert's rows start at a multiple of ALIGN = 128 in a
padded buffer of M_pad = sum_g ceil(counts[g] / 128) * 128 rows whose padding rows are zero
(GroupedLayout). Then every 128-row tile of A belongs to one expert, and every 128-token tile of a Wgrad
operand lies inside one expert: the 128 x 1 quantization tiles never mix experts, exactly as when each
expert's rows are quantized on their own. Padding costs up to 127 rows per expert (~12% at 512 rows each).
    m-grouped   C[rows of g] = A[rows of g] @ B[g].T       Fprop (B = W) and Dgrad (B = W.T); G weights
    k-grouped   C[g] = A_t[:, rows of g] @ B_t[:, rows of g].T     Wgrad: the tokens of g are the K axis
Both keep the dense recipe (fp8/__init__.py): 1 x 128 activation tiles, 128 x 128 weight blocks, and a
partial sum per 128-wide K block promoted to FP32 with its two scales.

Backends (GroupedOps, from Fp8Config.backend):
    emulate  a loop over the experts calling fp8.reference.gemm on each one's rows, every elementwise op
             on each expert's own rows: bitwise equal to the per-expert Fp8Linear loop (tests prove it)
    triton   the two kernels below (one launch per GEMM) and fp8/fused.py's fused quantizers
    cublas   a loop of cuBLAS blockwise GEMMs (torch has no blockwise grouped scaled_mm)

GroupedSwiGLUFunction runs y = w2(silu(w1 x) * w3 x) for all experts of a layer with 3 grouped GEMMs
forward, 3 Dgrad and 3 Wgrad backward, same math as three Fp8Linear per expert. The per-expert weights
stay separate Parameters (state_dict unchanged): they are stacked per call (a copy of the layer's
expert weights in forward and again in backward, transient). apply_grouped_experts installs the
runner on every MoE layer (model.moe.run_experts calls it).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from itertools import accumulate
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from moeforge.fp8 import fused
from moeforge.fp8 import reference as R
from moeforge.fp8.cache import Fp8WeightCache
from moeforge.fp8.config import Fp8Config
from moeforge.fp8.gemm import Fp8Ops, check_backend, get_ops
from moeforge.fp8.reference import FP8_DTYPE, cdiv

try:  # the Triton kernels need triton; the layout, the emulate path and the autograd function do not
    import triton
    import triton.language as tl

    from moeforge.fp8.kernels import _tile_ids
except ImportError:
    triton = None

logger = logging.getLogger("moeforge.fp8")
ALIGN = 128  # rows per expert are padded to a multiple of this (DeepGEMM's contiguous-layout alignment)


@dataclass(frozen=True, eq=False)
class GroupedLayout:
    """Where the M sorted rows (counts[g] for group g) live in the padded buffer of m_pad rows."""

    counts: tuple[int, ...]
    offsets: tuple[int, ...]  # G + 1 padded row offsets, multiples of align
    align: int
    dst: torch.Tensor  # (M,) int64: padded row of each sorted row
    src: torch.Tensor  # (m_pad,) int64: sorted row of each padded row, -1 for padding
    row_group: torch.Tensor  # (m_pad,) int32: group of each padded row, -1 for padding (m-grouped kernel)
    bounds: torch.Tensor  # (G, 2) int32: first padded row, first row past the real ones (k-grouped kernel)

    @classmethod
    def build(cls, counts, device=None, align: int = ALIGN) -> "GroupedLayout":
        counts = tuple(int(c) for c in counts)
        if any(c < 0 for c in counts) or align < 1:
            raise ValueError(f"counts must be >= 0 and align >= 1, got {counts=}, {align=}")
        offsets = tuple(accumulate((cdiv(c, align) * align for c in counts), initial=0))
        starts = tuple(accumulate(counts, initial=0))
        M, m_pad, G = starts[-1], offsets[-1], len(counts)
        # one small host -> device copy (4 numbers per group); the per-row maps are built on the device
        small = torch.tensor([*counts, *(o - s for o, s in zip(offsets, starts)),
                              *(v for o, c in zip(offsets, counts) for v in (o, o + c))], dtype=torch.int64)
        cnt, shift, bounds = small.to(device).split([G, G + 1, 2 * G])
        rows = torch.arange(M, device=cnt.device)
        dst = rows + shift[:-1].repeat_interleave(cnt, output_size=M)
        src = torch.full((m_pad,), -1, dtype=torch.int64, device=cnt.device).index_copy_(0, dst, rows)
        group = torch.arange(G, dtype=torch.int32, device=cnt.device).repeat_interleave(cnt, output_size=M)
        row_group = torch.full((m_pad,), -1, dtype=torch.int32, device=cnt.device).index_copy_(0, dst, group)
        return cls(counts, offsets, align, dst, src, row_group, bounds.int().view(G, 2))

    @property
    def m(self) -> int:
        return sum(self.counts)

    @property
    def m_pad(self) -> int:
        return self.offsets[-1]

    def rows(self, g: int) -> slice:
        return slice(self.offsets[g], self.offsets[g] + self.counts[g])

    def tiles(self, g: int, block_size: int) -> slice:
        """The 128 x 1 scale rows (along the padded tokens) of group g."""
        first = self.offsets[g] // block_size
        return slice(first, first + cdiv(self.counts[g], block_size))

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """(M, C) sorted rows -> (m_pad, C), zero padding rows."""
        return x.new_zeros(self.m_pad, x.shape[1]).index_copy_(0, self.dst, x)

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        return x.index_select(0, self.dst)


def _check_mgrouped(a_q, a_s, b_q, b_s, layout: GroupedLayout, block_size: int) -> tuple[int, int, int]:
    if a_q.dim() != 2 or b_q.dim() != 3 or a_q.shape[1] != b_q.shape[2]:
        raise ValueError(f"m-grouped GEMM: A (M_pad, K), B (G, N, K), got {tuple(a_q.shape)}, {tuple(b_q.shape)}")
    if a_q.dtype != FP8_DTYPE or b_q.dtype != FP8_DTYPE:
        raise TypeError(f"operands must be {FP8_DTYPE}, got {a_q.dtype} and {b_q.dtype}")
    (M, K), (G, N, _) = a_q.shape, b_q.shape
    nk = cdiv(K, block_size)
    if M != layout.m_pad or G != len(layout.counts) or layout.align % block_size:
        raise ValueError(f"A has {M} rows and B {G} groups; the layout has {layout.m_pad} rows, "
                         f"{len(layout.counts)} groups, align {layout.align} (a multiple of {block_size=})")
    if tuple(a_s.shape) != (M, nk) or tuple(b_s.shape) != (G, cdiv(N, block_size), nk):
        raise ValueError(f"scales: a_s must be {(M, nk)}, b_s {(G, cdiv(N, block_size), nk)}, "
                         f"got {tuple(a_s.shape)}, {tuple(b_s.shape)}")
    return M, N, K


def _check_kgrouped(a_q_t, a_s_t, b_q_t, b_s_t, layout: GroupedLayout, block_size: int) -> tuple[int, int]:
    if a_q_t.dim() != 2 or b_q_t.dim() != 2 or a_q_t.shape[1] != b_q_t.shape[1]:
        raise ValueError(f"k-grouped GEMM: A_t (N, M_pad), B_t (K, M_pad), "
                         f"got {tuple(a_q_t.shape)}, {tuple(b_q_t.shape)}")
    (N, M), K = a_q_t.shape, b_q_t.shape[0]
    nt = cdiv(M, block_size)
    if M != layout.m_pad or layout.align % block_size:
        raise ValueError(f"operands have {M} tokens, the layout {layout.m_pad} (align {layout.align}, {block_size=})")
    if tuple(a_s_t.shape) != (N, nt) or tuple(b_s_t.shape) != (K, nt):
        raise ValueError(f"scales must be {(N, nt)} and {(K, nt)}, got {tuple(a_s_t.shape)}, {tuple(b_s_t.shape)}")
    return N, K


# ---- the twins: one dense GEMM per group ------------------------------------------------------------

def gemm_grouped_ref(a_q, a_s, b_q, b_s, layout: GroupedLayout, block_size: int = 128,
                     out_dtype: torch.dtype = torch.float32, *, gemm: Callable = R.gemm) -> torch.Tensor:
    """m-grouped C (M_pad, N) = A[rows of g] @ B[g].T per group through the dense `gemm`; padding rows 0."""
    M, N, K = _check_mgrouped(a_q, a_s, b_q, b_s, layout, block_size)
    c = torch.zeros(M, N, dtype=out_dtype, device=a_q.device)
    for g, n in enumerate(layout.counts):
        if n:
            r = layout.rows(g)
            c[r] = gemm(a_q[r], a_s[r], b_q[g], b_s[g], block_size, out_dtype)
    return c


def gemm_wgrad_grouped_ref(a_q_t, a_s_t, b_q_t, b_s_t, layout: GroupedLayout, block_size: int = 128,
                           *, gemm: Callable = R.gemm) -> torch.Tensor:
    """k-grouped C (G, N, K) fp32 = A_t[:, rows of g] @ B_t[:, rows of g].T per group; 0 for empty groups."""
    N, K = _check_kgrouped(a_q_t, a_s_t, b_q_t, b_s_t, layout, block_size)
    c = torch.zeros(len(layout.counts), N, K, dtype=torch.float32, device=a_q_t.device)
    for g, n in enumerate(layout.counts):
        if n:
            r, t = layout.rows(g), layout.tiles(g, block_size)
            c[g] = gemm(a_q_t[:, r], a_s_t[:, t], b_q_t[:, r], b_s_t[:, t], block_size, torch.float32)
    return c


# ---- Triton kernels ---------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _m_grouped_kernel(
        a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, rg_ptr, M, N, K,
        sam, sak, sbg, sbn, sbk, scm, scn, sasm, sask, sbsg, sbsn, sbsk,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        # the dense kernel's launch order (fp8.kernels._tile_ids); rows of one tile are one group
        pid_m, pid_n = _tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        g = tl.load(rg_ptr + pid_m * BLOCK_M)  # -1: a tile of padding rows only, whose output is 0
        m_ok = tl.load(rg_ptr + offs_m, mask=offs_m < M, other=-1) == g
        n_ok = offs_n < N
        n_kb = tl.where(g >= 0, tl.cdiv(K, BLOCK_K), 0)
        g64 = tl.maximum(g, 0).to(tl.int64)
        a_ptrs = a_ptr + offs_m[:, None] * sam + offs_k[None, :] * sak
        b_ptrs = b_ptr + g64 * sbg + offs_k[:, None] * sbk + offs_n[None, :] * sbn  # (BLOCK_K, BLOCK_N) of B[g].T
        as_ptrs = as_ptr + offs_m * sasm
        bs_ptrs = bs_ptr + g64 * sbsg + (offs_n // BLOCK_K) * sbsn  # 128 x 128 weight blocks
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kb in range(0, n_kb):
            k_ok = offs_k < K - kb * BLOCK_K
            a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            sa = tl.load(as_ptrs + kb * sask, mask=m_ok, other=0.0)
            sb = tl.load(bs_ptrs + kb * sbsk, mask=n_ok, other=0.0)
            acc += tl.dot(a, b) * sa[:, None] * sb[None, :]  # one K block, promoted to FP32 with its scales
            a_ptrs += BLOCK_K * sak
            b_ptrs += BLOCK_K * sbk
        c_ptrs = c_ptr + offs_m[:, None] * scm + offs_n[None, :] * scn
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & n_ok[None, :])

    @triton.jit
    def _k_grouped_kernel(
        a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, bounds_ptr, N, K,
        san, sat, sbk, sbt, scg, scn, sck, sasn, sast, sbsk, sbst,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr,
    ):
        # C[g] (N, K) = sum over the 128-token tiles of group g: (A_t tile @ B_t tile.T) * sa * sb
        pid = tl.program_id(0)
        g = tl.program_id(1)
        num_k = tl.cdiv(K, BLOCK_K)
        pid_n = pid // num_k
        pid_k = pid % num_k
        t0 = tl.load(bounds_ptr + 2 * g)
        t_end = tl.load(bounds_ptr + 2 * g + 1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        offs_t = t0 + tl.arange(0, BLOCK_T)
        n_ok = offs_n < N
        k_ok = offs_k < K
        a_ptrs = a_ptr + offs_n[:, None] * san + offs_t[None, :] * sat  # (BLOCK_N, BLOCK_T)
        b_ptrs = b_ptr + offs_t[:, None] * sbt + offs_k[None, :] * sbk  # (BLOCK_T, BLOCK_K)
        as_ptrs = as_ptr + offs_n * sasn
        bs_ptrs = bs_ptr + offs_k * sbsk
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for tb in range(t0 // BLOCK_T, tl.cdiv(t_end, BLOCK_T)):
            t_ok = offs_t < t_end
            a = tl.load(a_ptrs, mask=n_ok[:, None] & t_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=t_ok[:, None] & k_ok[None, :], other=0.0)
            sa = tl.load(as_ptrs + tb * sast, mask=n_ok, other=0.0)
            sb = tl.load(bs_ptrs + tb * sbst, mask=k_ok, other=0.0)
            acc += tl.dot(a, b) * sa[:, None] * sb[None, :]
            offs_t += BLOCK_T
            a_ptrs += BLOCK_T * sat
            b_ptrs += BLOCK_T * sbt
        c_ptrs = c_ptr + g.to(tl.int64) * scg + offs_n[:, None] * scn + offs_k[None, :] * sck
        tl.store(c_ptrs, acc, mask=n_ok[:, None] & k_ok[None, :])


DEFAULT_M_CONFIG = {"BLOCK_M": 128, "BLOCK_N": 128, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}
DEFAULT_K_CONFIG = {"BLOCK_N": 128, "BLOCK_K": 128, "num_warps": 8, "num_stages": 3}


def _need_triton() -> None:
    if triton is None:
        raise RuntimeError("the Triton grouped GEMMs need the triton package")


def gemm_grouped_triton(a_q, a_s, b_q, b_s, layout: GroupedLayout, block_size: int = 128,
                        out_dtype: torch.dtype = torch.float32, *, config: dict | None = None) -> torch.Tensor:
    """m-grouped GEMM in one launch; same contract as gemm_grouped_ref. `config` overrides tiles (bench)."""
    _need_triton()
    M, N, K = _check_mgrouped(a_q, a_s, b_q, b_s, layout, block_size)
    cfg = {**DEFAULT_M_CONFIG, **(config or {})}
    if layout.align % cfg["BLOCK_M"]:
        raise ValueError(f"BLOCK_M={cfg['BLOCK_M']} must divide the layout's alignment {layout.align}")
    # FP8 wgmma wants K-major operands: transposed weights (Dgrad's W.T) are copied once here, as in kernels.gemm
    a_q, b_q = a_q.contiguous(), b_q.contiguous()
    c = torch.empty(M, N, dtype=out_dtype, device=a_q.device)
    if M == 0 or N == 0:
        return c
    if K == 0:
        return c.zero_()
    grid = (cdiv(M, cfg["BLOCK_M"]) * cdiv(N, cfg["BLOCK_N"]),)
    _m_grouped_kernel[grid](
        a_q, b_q, c, a_s, b_s, layout.row_group, M, N, K,
        a_q.stride(0), a_q.stride(1), b_q.stride(0), b_q.stride(1), b_q.stride(2), c.stride(0), c.stride(1),
        a_s.stride(0), a_s.stride(1), b_s.stride(0), b_s.stride(1), b_s.stride(2),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=block_size, GROUP_M=cfg["GROUP_M"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return c


def gemm_wgrad_grouped_triton(a_q_t, a_s_t, b_q_t, b_s_t, layout: GroupedLayout, block_size: int = 128,
                              *, config: dict | None = None) -> torch.Tensor:
    """k-grouped GEMM in one launch (grid: output tiles x groups); same contract as gemm_wgrad_grouped_ref."""
    _need_triton()
    N, K = _check_kgrouped(a_q_t, a_s_t, b_q_t, b_s_t, layout, block_size)
    cfg = {**DEFAULT_K_CONFIG, **(config or {})}
    a_q_t, b_q_t = a_q_t.contiguous(), b_q_t.contiguous()  # tokens (this GEMM's K) contiguous
    G = len(layout.counts)
    c = torch.empty(G, N, K, dtype=torch.float32, device=a_q_t.device)
    if G == 0 or N == 0 or K == 0:
        return c
    grid = (cdiv(N, cfg["BLOCK_N"]) * cdiv(K, cfg["BLOCK_K"]), G)
    _k_grouped_kernel[grid](
        a_q_t, b_q_t, c, a_s_t, b_s_t, layout.bounds, N, K,
        a_q_t.stride(0), a_q_t.stride(1), b_q_t.stride(0), b_q_t.stride(1), c.stride(0), c.stride(1), c.stride(2),
        a_s_t.stride(0), a_s_t.stride(1), b_s_t.stride(0), b_s_t.stride(1),
        BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], BLOCK_T=block_size,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return c


# ---- backends ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GroupedOps:
    """What GroupedSwiGLUFunction calls; `dense` quantizes buffers that are already padded."""

    name: str
    dense: Fp8Ops
    permute_quant: Callable  # (x (M, C) sorted, layout, block, pow2, transposed) -> padded (q, s) | (q_t, s_t)
    weight_quant: Callable  # ([G x (N, K)], block, pow2) -> q (G, N, K), s (G, N/128, K/128)
    gemm: Callable  # m-grouped: (a_q, a_s, b_q, b_s, layout, block, out_dtype) -> (M_pad, N)
    gemm_wgrad: Callable  # k-grouped: (a_q_t, a_s_t, b_q_t, b_s_t, layout, block) -> (G, N, K) fp32
    swiglu_quant: Callable  # (h1, h3 padded, layout, block, pow2) -> 1 x 128 (q, s) of silu(h1) * h3
    per_group_elementwise: bool  # silu & co. on each expert's own rows (the loop's vectorization: bitwise)


def _per_group(fn, layout: GroupedLayout, *tensors: torch.Tensor, n_out: int = 1):
    """fn on each group's rows, written into zero padded buffers: elementwise results equal the loop's bits."""
    outs = [torch.zeros_like(tensors[0]) for _ in range(n_out)]
    for g, n in enumerate(layout.counts):
        if n:
            r = layout.rows(g)
            res = fn(*(t[r] for t in tensors))
            for o, v in zip(outs, res if n_out > 1 else (res,)):
                o[r] = v
    return outs if n_out > 1 else outs[0]


def _swiglu(h1, h3):
    return F.silu(h1) * h3


def _swiglu_backward(dh, h1, h3):
    """(dh1, dh3, h) for h = silu(h1) * h3 with autograd's own formulas (MulBackward0, then silu_backward)."""
    act = F.silu(h1)
    return torch.ops.aten.silu_backward(dh * h3, h1), dh * act, act * h3


def _looped_ops(name: str, dense: Fp8Ops) -> GroupedOps:
    def permute_quant(x, layout, bs, p2, transposed):
        return (dense.act_quant_t if transposed else dense.act_quant)(layout.pad(x), bs, p2)

    def weight_quant(ws, bs, p2):
        qs = [dense.weight_quant(w, bs, p2) for w in ws]
        return torch.stack([q for q, _ in qs]), torch.stack([s for _, s in qs])

    def swiglu_quant(h1, h3, layout, bs, p2):
        return dense.act_quant(_per_group(_swiglu, layout, h1, h3), bs, p2)

    def gemm(*args):
        return gemm_grouped_ref(*args, gemm=dense.gemm)

    def gemm_wgrad(*args):
        return gemm_wgrad_grouped_ref(*args, gemm=dense.gemm)

    return GroupedOps(name, dense, permute_quant, weight_quant, gemm, gemm_wgrad, swiglu_quant, True)


def _weight_quant_triton(ws, bs, p2):
    from moeforge.fp8 import kernels

    if ws[0].shape[0] % bs == 0:  # whole 128-row blocks: the stacked (G*N, K) view quantizes each expert alone
        G, (N, K) = len(ws), ws[0].shape
        q, s = kernels.weight_quant(torch.stack(ws).view(G * N, K), bs, p2)
        return q.view(G, N, K), s.view(G, N // bs, -1)
    qs = [kernels.weight_quant(w, bs, p2) for w in ws]
    return torch.stack([q for q, _ in qs]), torch.stack([s for _, s in qs])


def _triton_ops() -> GroupedOps:
    def permute_quant(x, layout, bs, p2, transposed):
        return fused.permute_quant(x, layout.src, bs, p2, transposed)

    def swiglu_quant(h1, h3, layout, bs, p2):
        return fused.swiglu_quant(h1, h3, bs, p2)

    return GroupedOps("triton", get_ops("triton"), permute_quant, _weight_quant_triton, gemm_grouped_triton,
                      gemm_wgrad_grouped_triton, swiglu_quant, False)


def get_grouped_ops(backend: str) -> GroupedOps:
    """The GroupedOps of `backend`; raises RuntimeError with the reason when it cannot run here."""
    check_backend(backend)
    if backend == "triton":
        return _triton_ops()
    return _looped_ops(backend, get_ops(backend))


# ---- autograd ---------------------------------------------------------------------------------------

class GroupedSwiGLUFunction(torch.autograd.Function):
    """ys = w2[g](silu(w1[g] x) * w3[g] x) for the rows of each group g; weights = (*w1s, *w3s, *w2s), G each.

    Saved for backward with cfg.cache_fp8_activations (TR §3.3.3: SwiGLU's inputs cached in FP8, its output
    recomputed): the padded xs, h1 and h3 as their 1 x 128 E4M3 tiles + FP32 scales (xs's are Fprop's own
    operand; h1, h3 are quantized once more for the cache). Backward dequantizes h1, h3, recomputes
    h = silu(h1) * h3 from them, and turns xs's tiles into Wgrad's 128 x 1 tiles (ops.dense.act_requant_t).
    Without: xs, the padded h1 and h3 in their dtype. Either way the weights (no copies); their FP8 blocks
    come from ops.weight_quant (GroupedExperts' per-layer cache). A weight of an expert with no rows gets no
    gradient (None), as in the loop.
    """

    @staticmethod
    def forward(ctx, xs, layout: GroupedLayout, ops: GroupedOps, cfg: Fp8Config, *weights):
        G = len(layout.counts)
        if len(weights) != 3 * G:
            raise ValueError(f"expected 3 x {G} expert weights (w1s, w3s, w2s), got {len(weights)}")
        bs, p2, dt = cfg.block, cfg.power_of_2_scales, xs.dtype
        w1, w3, w2 = (ops.weight_quant(weights[i * G:(i + 1) * G], bs, p2) for i in range(3))
        xq, xsc = ops.permute_quant(xs, layout, bs, p2, False)  # sort + pad + quantize: (M_pad, D)
        h1 = ops.gemm(xq, xsc, *w1, layout, bs, dt)  # (M_pad, I)
        h3 = ops.gemm(xq, xsc, *w3, layout, bs, dt)
        hq, hs = ops.swiglu_quant(h1, h3, layout, bs, p2)
        y = ops.gemm(hq, hs, *w2, layout, bs, dt)  # (M_pad, D)
        if cfg.cache_fp8_activations:
            acts = (xq, xsc, *ops.dense.act_quant(h1, bs, p2), *ops.dense.act_quant(h3, bs, p2))
        else:
            acts = (xs, h1, h3)
        ctx.save_for_backward(*acts, *weights)
        ctx.n_acts, ctx.x_dtype = len(acts), dt
        ctx.layout, ctx.ops, ctx.cfg = layout, ops, cfg
        return layout.unpad(y)

    @staticmethod
    def backward(ctx, dy):
        saved = ctx.saved_tensors
        acts, weights = saved[:ctx.n_acts], saved[ctx.n_acts:]
        layout, ops, cached = ctx.layout, ctx.ops, ctx.cfg.cache_fp8_activations
        G, bs, p2, dt = len(layout.counts), ctx.cfg.block, ctx.cfg.power_of_2_scales, ctx.x_dtype
        wsets = [weights[i * G:(i + 1) * G] for i in range(3)]  # w1s, w3s, w2s
        if cached:  # SwiGLU's inputs back from their FP8 tiles (padding rows: 0 * SCALE_MIN = 0)
            xq, xsc, h1q, h1s, h3q, h3s = acts
            h1 = R.dequantize(h1q, h1s, (1, bs), dt)
            h3 = R.dequantize(h3q, h3s, (1, bs), dt)
        else:
            xs, h1, h3 = acts

        def dgrad(g_pad, ws, dtype):  # dX = dY @ W[g]: W's blocks read transposed
            wq, wsc = ops.weight_quant(ws, bs, p2)
            return ops.gemm(*ops.dense.act_quant(g_pad, bs, p2), wq.transpose(1, 2), wsc.transpose(1, 2),
                            layout, bs, dtype)

        dyq, dys = ops.permute_quant(dy, layout, bs, p2, False)
        w2q, w2s = ops.weight_quant(wsets[2], bs, p2)
        dh = ops.gemm(dyq, dys, w2q.transpose(1, 2), w2s.transpose(1, 2), layout, bs, h1.dtype)
        if ops.per_group_elementwise:
            dh1, dh3, h = _per_group(_swiglu_backward, layout, dh, h1, h3, n_out=3)
        else:
            dh1, dh3, h = _swiglu_backward(dh, h1, h3)
        dx = None
        if ctx.needs_input_grad[0]:
            dx = layout.unpad(dgrad(dh1, wsets[0], dt) + dgrad(dh3, wsets[1], dt))

        dws = [None] * (3 * G)
        if any(ctx.needs_input_grad[4:]):  # dW[g] = dY[g].T @ X[g], both 128 x 1 along the tokens of g
            # the padded buffer's 128-token tiles lie inside one expert, so converting its tiles = per expert
            xq_t = ops.dense.act_requant_t(xq, xsc, bs, p2) if cached else ops.permute_quant(xs, layout, bs, p2, True)
            dw1 = ops.gemm_wgrad(*ops.dense.act_quant_t(dh1, bs, p2), *xq_t, layout, bs)
            dw3 = ops.gemm_wgrad(*ops.dense.act_quant_t(dh3, bs, p2), *xq_t, layout, bs)
            dw2 = ops.gemm_wgrad(*ops.permute_quant(dy, layout, bs, p2, True), *ops.dense.act_quant_t(h, bs, p2),
                                 layout, bs)
            dws = [dw[g].to(w.dtype) if layout.counts[g] else None
                   for dw, ws in zip((dw1, dw3, dw2), wsets) for g, w in enumerate(ws)]
            dws = [dw if need else None for dw, need in zip(dws, ctx.needs_input_grad[4:])]
        return (dx, None, None, None, *dws)


# ---- the runner model.moe.run_experts calls ---------------------------------------------------------

def _is_swiglu_expert(m: nn.Module) -> bool:
    return all(isinstance(getattr(m, n, None), nn.Linear) and getattr(m, n).bias is None for n in ("w1", "w2", "w3"))


class GroupedExperts:
    """One MoE layer's routed experts as one GroupedSwiGLUFunction: `run_grouped(mlps, xs, counts)`.

    With cfg.cache_fp8_weights the layer's stacked FP8 weights (w1s, w3s, w2s: 1 byte per weight + scales)
    stay in `weight_cache` from the first forward after an optimizer step until a weight changes (keyed on
    every weight's identity and version), so no micro-batch stacks or quantizes them again, forward or backward.
    """

    def __init__(self, cfg: Fp8Config) -> None:
        self.cfg = cfg
        self.ops = get_grouped_ops(cfg.backend)
        self.align = max(ALIGN, cfg.block)
        self.weight_cache = Fp8WeightCache() if cfg.cache_fp8_weights else None
        self._weight_quant = self.ops.weight_quant
        if self.weight_cache is not None:
            self.ops = dataclasses.replace(self.ops, weight_quant=self._cached_weight_quant)

    def _cached_weight_quant(self, ws, bs, p2):
        """ops.weight_quant through the cache: one slot per weight set (w1s, w3s, w2s), checked per call."""
        return self.weight_cache.get((id(ws[0]), len(ws), bs, p2), tuple(ws),
                                     lambda: self._weight_quant(ws, bs, p2))

    def __call__(self, mlps: list[nn.Module], xs: torch.Tensor, counts: list[int]) -> torch.Tensor:
        if len(mlps) != len(counts) or xs.dim() != 2 or xs.size(0) != sum(counts):
            raise ValueError(f"{len(mlps)} experts, {len(counts)} counts (sum {sum(counts)}), xs {tuple(xs.shape)}")
        weights = [getattr(m, name).weight for name in ("w1", "w3", "w2") for m in mlps]
        layout = GroupedLayout.build(counts, xs.device, self.align)
        return GroupedSwiGLUFunction.apply(xs, layout, self.ops, self.cfg, *weights)

    def __repr__(self) -> str:
        return f"GroupedExperts(backend={self.ops.name}, block={self.cfg.block}, align={self.align})"


def apply_grouped_experts(model: nn.Module, cfg: Fp8Config, *, exclude=None) -> int:
    """Install a GroupedExperts on the `experts` ModuleDict of every MoE layer when cfg.enabled and
    cfg.grouped_experts (else remove any): returns how many layers run grouped. Parameters, state_dict
    and the module tree are untouched; works before or after materialization, before or after apply_ep.
    `exclude(fqn)` (apply_fp8's): a layer any of whose expert Linears it matches stays high precision."""
    on = cfg.enabled and cfg.grouped_experts
    if on:
        check_backend(cfg.backend)
    n = 0
    for fqn, mod in model.named_modules():
        experts = getattr(mod, "experts", None)
        if isinstance(experts, nn.ModuleDict) and len(experts) and all(map(_is_swiglu_expert, experts.values())):
            prefix = f"{fqn}.experts" if fqn else "experts"
            kept = exclude is not None and any(exclude(f"{prefix}.{k}.{w}")
                                               for k in experts for w in ("w1", "w2", "w3"))
            layer_on = on and not kept
            experts.run_grouped = GroupedExperts(cfg) if layer_on else None
            n += layer_on
    logger.info("fp8: routed experts of %d MoE layers run as grouped FP8 GEMMs (backend=%s)", n, cfg.backend)
    return n
