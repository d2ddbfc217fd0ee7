"""Blockwise FP8 GEMMs (emulate backend) against float64, and backend selection.

Error bound, derived. With round-to-nearest on 3 mantissa bits, an element's relative error d is, in
the binade [2^e, 2^(e+1)), uniform in absolute terms on ±2^(e-4); for Gaussian data (mantissas follow
Benford's law, p(m) = 1/(m ln 2)) E[d^2] = 2^-6/12 * 3/(8 ln 2), d_rms = 0.0266 (reference.e4m3_rel_rms).
A product a_k b_k carries d_a + d_b, independent across k and of the data, so
    E||C - C64||^2 / E||C64||^2 = E[d_a^2] + E[d_b^2] = 2 d_rms^2,   i.e.  ~ sqrt(2) * 0.0266 = 0.0375,
independent of K: the errors average over K exactly as fast as the signal does. Each GEMM (Fprop,
Dgrad, Wgrad) quantizes both operands, so each lands at ~0.0375; we assert < 0.045 (20% margin for
finite samples and edge tiles) and > 0.025 (the operands really went through E4M3). The FP32
accumulation itself (same quantized operands, float64 vs FP32 sums) is ~1e-7; we assert < 2e-6.
"""

import pytest
import torch

from moeforge.fp8 import Fp8Config, check_backend, get_ops, unavailable_reason
from moeforge.fp8 import reference as R
from moeforge.fp8.gemm import cublas_gemm


pytestmark = pytest.mark.usefixtures("one_thread")


BOUND = 0.045
FLOOR = 0.025
ACC_BOUND = 2e-6


def rel(c, ref):
    return ((c.double() - ref).norm() / ref.norm()).item()


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_derived_rms_matches_prediction():
    assert abs(2**0.5 * R.e4m3_rel_rms() - 0.0375) < 5e-4
    assert FLOOR < 2**0.5 * R.e4m3_rel_rms() < BOUND


SHAPES = [(256, 512, 384), (77, 200, 130), (128, 2048, 256)]  # (M, K, N)


@pytest.mark.parametrize("M,K,N", SHAPES)
@pytest.mark.parametrize("pow2", [False, True])
def test_fprop_gemm_vs_float64(M, K, N, pow2):
    x, w = _randn(M, K, seed=0), _randn(N, K, seed=1)
    xq, xs = R.act_quant(x, 128, pow2)
    wq, ws = R.weight_quant(w, 128, pow2)
    y = R.gemm(xq, xs, wq, ws)
    assert y.shape == (M, N) and y.dtype == torch.float32
    e = rel(y, x.double() @ w.double().t())
    assert FLOOR < e < BOUND, e
    assert rel(y, R.gemm_f64(xq, xs, wq, ws)) < ACC_BOUND


@pytest.mark.parametrize("M,K,N", SHAPES)
def test_dgrad_gemm_vs_float64(M, K, N):
    dy, w = _randn(M, N, seed=2), _randn(N, K, seed=3)  # dX (M, K) = dY (M, N) @ W (N, K)
    gq, gs = R.act_quant(dy)
    wq, ws = R.weight_quant(w)
    dx = R.gemm(gq, gs, wq.t(), ws.t())  # W.T's 128 x 128 blocks are W's, transposed: no requantization
    assert dx.shape == (M, K)
    e = rel(dx, dy.double() @ w.double())
    assert FLOOR < e < BOUND, e
    assert rel(dx, R.gemm_f64(gq, gs, wq.t(), ws.t())) < ACC_BOUND


@pytest.mark.parametrize("T,K,N", [(512, 256, 384), (200, 130, 77), (2048, 384, 384)])
def test_wgrad_gemm_vs_float64(T, K, N):
    dy, x = _randn(T, N, seed=4), _randn(T, K, seed=5)  # dW (N, K) = dY.T @ X, tokens are the K axis
    gq_t, gs_t = R.act_quant_t(dy)
    xq_t, xs_t = R.act_quant_t(x)
    dw = R.gemm(gq_t, gs_t, xq_t, xs_t)
    assert dw.shape == (N, K)
    e = rel(dw, dy.double().t() @ x.double())
    assert FLOOR < e < BOUND, e
    assert rel(dw, R.gemm_f64(gq_t, gs_t, xq_t, xs_t)) < ACC_BOUND


@pytest.mark.parametrize("M,K,N", SHAPES)
def test_dequantized_matmul_equals_per_block_promotion(M, K, N):
    """emulate's FP32 matmul over all of K vs the literal recipe: per-128 partial products, scaled, summed."""
    x, w = _randn(M, K, seed=6), _randn(N, K, seed=7)
    xq, xs = R.act_quant(x)
    for wq, ws in (R.weight_quant(w), R.act_quant(w)):  # 128 x 128 blocks and 1 x 128 rows for B
        ref = R.gemm_f64(xq, xs, wq, ws)
        assert rel(R.gemm_blockwise(xq, xs, wq, ws), ref) < ACC_BOUND
        assert rel(R.gemm(xq, xs, wq, ws), R.gemm_blockwise(xq, xs, wq, ws).double()) < ACC_BOUND


def test_bf16_operands_and_output():
    x, w = _randn(96, 320, seed=8).bfloat16(), _randn(160, 320, seed=9).bfloat16()
    xq, xs = R.act_quant(x)
    wq, ws = R.weight_quant(w)
    y = R.gemm(xq, xs, wq, ws, out_dtype=torch.bfloat16)
    assert y.dtype == torch.bfloat16
    assert FLOOR < rel(y, x.double() @ w.double().t()) < BOUND


def test_nan_and_inf_propagate_through_gemm():
    x, w = _randn(64, 256, seed=10), _randn(256, 256, seed=11)
    x[3, 10] = float("nan")
    x[7, 200] = float("inf")
    w[130, 5] = float("nan")  # weight block (1, 0): output columns 128..255
    xq, xs = R.act_quant(x)
    wq, ws = R.weight_quant(w)
    y = R.gemm(xq, xs, wq, ws)
    bad_rows = torch.isnan(y[:, :128]).all(dim=1)
    assert bad_rows.nonzero().flatten().tolist() == [3, 7]  # inf never becomes a finite 448 * s
    assert torch.isfinite(y[~bad_rows, :128]).all()
    assert torch.isnan(y[:, 128:]).all()


def test_empty_and_degenerate_shapes():
    xq, xs = R.act_quant(torch.zeros(0, 200))
    wq, ws = R.weight_quant(torch.randn(130, 200))
    assert R.gemm(xq, xs, wq, ws).shape == (0, 130)
    aq, as_ = R.act_quant_t(torch.zeros(0, 64))  # Wgrad of an expert that got no tokens: K = 0
    bq, bs = R.act_quant_t(torch.zeros(0, 32))
    dw = R.gemm(aq, as_, bq, bs)
    assert dw.shape == (64, 32) and (dw == 0).all()
    one_q, one_s = R.act_quant(torch.randn(1, 200))  # N = 1: row and block scale shapes coincide
    assert torch.allclose(R.gemm(xq[:0], xs[:0], one_q, one_s), torch.zeros(0, 1))


def test_gemm_rejects_bad_arguments():
    xq, xs = R.act_quant(torch.randn(8, 256))
    wq, ws = R.weight_quant(torch.randn(256, 256))
    with pytest.raises(ValueError, match="a_s must be"):
        R.gemm(xq, xs[:, :1], wq, ws)
    with pytest.raises(ValueError, match="b_s must be"):
        R.gemm(xq, xs, wq, ws[:1])
    with pytest.raises(ValueError, match="A \\(M, K\\)"):
        R.gemm(xq, xs, wq[:, :128], ws)
    with pytest.raises(TypeError, match="float8"):
        R.gemm(xq.float(), xs, wq, ws)


def test_config_validation_names_the_key():
    with pytest.raises(ValueError, match="fp8.backend"):
        Fp8Config(backend="cutlass")
    with pytest.raises(ValueError, match="fp8.act_block"):
        Fp8Config(act_block=100)
    with pytest.raises(ValueError, match="fp8.act_block and fp8.weight_block"):
        Fp8Config(act_block=64, weight_block=128)
    assert Fp8Config().backend == "emulate" and not Fp8Config().enabled


def test_emulate_backend_is_the_reference():
    ops = get_ops("emulate")
    assert ops.name == "emulate" and ops.gemm is R.gemm and ops.act_quant is R.act_quant
    assert unavailable_reason("emulate") is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("backend", ["triton", "cublas"])
def test_gpu_backends_refuse_without_cuda(backend):
    with pytest.raises(RuntimeError, match=f"fp8.backend={backend} needs a CUDA GPU"):
        check_backend(backend)
    with pytest.raises(RuntimeError, match="CUDA"):
        get_ops(backend)


def test_cublas_gemm_rejects_cpu_tensors():
    xq, xs = R.act_quant(torch.randn(8, 256))
    wq, ws = R.weight_quant(torch.randn(256, 256))
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        cublas_gemm(xq, xs, wq, ws)
