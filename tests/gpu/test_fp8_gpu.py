"""FP8 backends on a real GPU: Triton and cuBLAS against the emulate reference on the same device.

Tolerances. Quantizers: bitwise (same IEEE division, same round-to-nearest-even cast after the clamp).
GEMMs: Hopper's FP8 MMA accumulates a 128-wide K block with ~14 significant bits before our FP32
promotion (TR §3.3.2), so against emulate's FP32 sums a relative Frobenius difference of ~1e-4 is
expected; we allow 2e-3, still 20x below the E4M3 quantization error (~3.7e-2) and far below what a
wrong index or scale produces (O(1)).
"""

import copy

import pytest
import torch

from moeforge.fp8 import Fp8Config, Fp8Linear, apply_fp8, get_ops, unavailable_reason
from moeforge.fp8 import reference as R

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
GEMM_TOL = 2e-3
DEV = "cuda"


def _need(backend):
    reason = unavailable_reason(backend)
    if reason is not None:
        pytest.skip(reason)
    return get_ops(backend)


def rel(c, ref):
    return ((c.double() - ref.double()).norm() / ref.double().norm()).item()


def _randn(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    return (torch.randn(*shape, generator=g, device=DEV) * 3).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize(
    "shape,block", [((77, 200), (1, 128)), ((4096, 7168), (1, 128)), ((200, 130), (128, 1)),
                    ((2048, 1536), (128, 1)), ((200, 130), (128, 128)), ((7168, 2048), (128, 128))]
)
def test_triton_quantize_bitwise(shape, block, pow2, dtype):
    ops = _need("triton")
    from moeforge.fp8 import kernels

    x = _randn(*shape, dtype=dtype)
    x.view(-1)[:3] = 0
    qk, sk = kernels.quantize(x, block, pow2)
    qr, sr = R.quantize(x, block, pow2)
    assert torch.equal(sk, sr)
    assert torch.equal(qk.view(torch.uint8), qr.view(torch.uint8))
    if block == (128, 1):
        qt, st = ops.act_quant_t(x, 128, pow2)
        assert qt.is_contiguous() and torch.equal(qt.view(torch.uint8), qr.t().contiguous().view(torch.uint8))
        assert torch.equal(st, sr.t())


def test_triton_quantize_nan_inf():
    _need("triton")
    from moeforge.fp8 import kernels

    x = _randn(4, 384)
    x[1, 5], x[2, 300] = float("nan"), float("inf")
    qk, sk = kernels.act_quant(x)
    _, sr = R.act_quant(x)
    assert torch.isnan(sk[1, 0]) and torch.isinf(sk[2, 2])  # tl.max alone would drop the NaN
    assert torch.equal(torch.isnan(sk), torch.isnan(sr)) and torch.equal(sk[~torch.isnan(sk)], sr[~torch.isnan(sr)])
    assert torch.isnan(qk[1, :128].float()).all()


def _gemm_cases(M, K, N, seed=0):
    a, b, dy = _randn(M, K, seed=seed), _randn(N, K, seed=seed + 1), _randn(M, N, seed=seed + 2)
    aq, as_ = R.act_quant(a)
    bq, bs = R.weight_quant(b)
    gq, gs = R.act_quant(dy)
    return {
        "fprop": (aq, as_, bq, bs),
        "dgrad": (gq, gs, bq.t(), bs.t()),
        "wgrad": (*R.act_quant_t(dy), *R.act_quant_t(a)),
    }


@pytest.mark.parametrize("backend", ["triton", "cublas"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,K,N", [(77, 200, 130), (512, 1024, 384), (4096, 2048, 7168)])
def test_gemm_vs_emulate(backend, out_dtype, M, K, N):
    ops = _need(backend)
    for case, args in _gemm_cases(M, K, N).items():
        c = ops.gemm(*args, 128, out_dtype)
        assert c.dtype == out_dtype and c.shape == R.gemm(*args).shape, case
        tol = GEMM_TOL + (2.0**-8 if out_dtype == torch.bfloat16 else 0)
        assert rel(c, R.gemm(*args)) < tol, (backend, case, rel(c, R.gemm(*args)))


@pytest.mark.parametrize("backend", ["triton", "cublas"])
def test_gemm_nan_propagates(backend):
    ops = _need(backend)
    a, b = _randn(256, 256), _randn(256, 256, seed=1)
    a[3, 10], a[7, 200] = float("nan"), float("inf")
    c = ops.gemm(*R.act_quant(a), *R.weight_quant(b), 128, torch.float32)
    bad = torch.isnan(c).all(dim=1)
    assert bad.nonzero().flatten().tolist() == [3, 7] and torch.isfinite(c[~bad]).all()


@pytest.mark.parametrize("backend", ["triton", "cublas"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_linear_matches_emulate(backend, dtype):
    _need(backend)
    torch.manual_seed(0)
    lin = torch.nn.Linear(1024, 768, bias=False, device=DEV, dtype=dtype)
    torch.nn.init.normal_(lin.weight)
    ref = Fp8Linear.from_linear(copy.deepcopy(lin), Fp8Config(enabled=True, backend="emulate"))
    f = Fp8Linear.from_linear(copy.deepcopy(lin), Fp8Config(enabled=True, backend=backend))
    x = _randn(2, 300, 1024, dtype=dtype)
    dy = _randn(2, 300, 768, dtype=dtype, seed=5)
    grads = []
    for m in (ref, f):
        xi = x.clone().requires_grad_()
        y = m(xi)
        y.backward(dy)
        grads.append((y, xi.grad, m.weight.grad))
    tol = GEMM_TOL + (2.0**-7 if dtype == torch.bfloat16 else 0)
    for name, g_ref, g in zip(("Y", "dX", "dW"), grads[0], grads[1]):
        assert g.dtype == dtype and rel(g, g_ref) < tol, (name, rel(g, g_ref))


@pytest.mark.parametrize("backend", ["triton", "cublas"])
def test_apply_fp8_on_gpu(backend):
    _need(backend)
    m = torch.nn.Sequential(torch.nn.Linear(256, 512, bias=False), torch.nn.GELU(), torch.nn.Linear(512, 256)).to(DEV)
    apply_fp8(m, Fp8Config(enabled=True, backend=backend))
    assert isinstance(m[0], Fp8Linear) and m[0].ops.name == backend
    y = m(_randn(8, 64, 256))
    y.sum().backward()
    assert torch.isfinite(y).all() and m[0].weight.grad is not None and m[2].bias.grad is not None
