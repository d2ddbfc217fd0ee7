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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("T,C", [(77, 200), (300, 130), (4096, 7168), (2048, 1536)])
def test_triton_requant_t_bitwise(T, C, pow2, dtype):
    """The cached-activation conversion (1 x 128 tiles -> 128 x 1, transposed) with real fp8 casts."""
    ops = _need("triton")
    x = _randn(T, C, dtype=dtype)
    x[:, :5] *= 1e-3  # channels whose 128 x 1 scales differ from their tokens' 1 x 128 ones
    q, s = R.act_quant(x, 128, pow2)
    qt, st = ops.act_requant_t(q, s, 128, pow2)
    qr, sr = R.act_requant_t(q, s, 128, pow2)
    assert qt.is_contiguous() and qt.shape == (C, T) and st.shape == (C, -(-T // 128))
    assert torch.equal(st, sr.contiguous())
    assert torch.equal(qt.view(torch.uint8), qr.contiguous().view(torch.uint8))
    if pow2:  # no second rounding: the converted tiles hold the cached values (normal range of the new tile)
        d1 = R.dequantize(q, s, (1, 128))
        d2 = R.dequantize(qt.t(), st.t(), (128, 1))
        normal = d1.abs() >= 2.0 ** -6 * st.t().repeat_interleave(128, 0)[:T]
        assert torch.equal(d1[normal], d2[normal])


def test_triton_requant_t_nan_inf():
    ops = _need("triton")
    x = _randn(300, 384)
    x[1, 5], x[2, 300] = float("nan"), float("inf")
    q, s = R.act_quant(x)
    qt, st = ops.act_requant_t(q, s)
    _, sr = R.act_requant_t(q, s)
    assert torch.equal(torch.isnan(st), torch.isnan(sr)) and torch.equal(st[~torch.isnan(st)], sr[~torch.isnan(sr)])
    # the NaN tile (token 1, channels 0-127) and the inf tile (token 2, channels 256-383: q * inf) poison the
    # 128 x 1 scales of their channels in tokens 0-127; channels 128-255 and later tokens stay finite
    assert torch.isnan(st[:128, 0]).all() and torch.isnan(st[256:, 0]).all()
    assert torch.isfinite(st[128:256, 0]).all() and torch.isfinite(st[:, 1:]).all()


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


@pytest.mark.parametrize("cached", [True, False])
@pytest.mark.parametrize("backend", ["triton", "cublas"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_linear_matches_emulate(backend, dtype, cached):
    """cached: X saved as FP8 tiles and converted for Wgrad (act_requant_t), W from the weight cache."""
    _need(backend)
    torch.manual_seed(0)
    lin = torch.nn.Linear(1024, 768, bias=False, device=DEV, dtype=dtype)
    torch.nn.init.normal_(lin.weight)
    kw = dict(cache_fp8_activations=cached, cache_fp8_weights=cached)
    ref = Fp8Linear.from_linear(copy.deepcopy(lin), Fp8Config(enabled=True, backend="emulate", **kw))
    f = Fp8Linear.from_linear(copy.deepcopy(lin), Fp8Config(enabled=True, backend=backend, **kw))
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
def test_fp8_linear_weight_cache_on_gpu(backend):
    """Micro-batches share W's FP8 copy until an in-place update; a step re-quantizes (same bits as fresh)."""
    _need(backend)
    torch.manual_seed(0)
    f = Fp8Linear(512, 256, bias=False, device=DEV, config=Fp8Config(enabled=True, backend=backend))
    x = _randn(64, 512)
    y0 = f(x)
    (wq, _), = [v for _, _, v in f.weight_cache._entries.values()]
    assert torch.equal(f(x), y0) and [v for _, _, v in f.weight_cache._entries.values()][0][0] is wq
    with torch.no_grad():
        f.weight.mul_(-1)
    y1 = f(x)
    assert torch.equal(y1, -y0)  # E4M3 and the block scales are symmetric: a fresh copy, not the stale one
    assert f.weight_cache.nbytes() == 512 * 256 + 4 * 2 * 4


@pytest.mark.parametrize("backend", ["triton", "cublas"])
def test_apply_fp8_on_gpu(backend):
    _need(backend)
    m = torch.nn.Sequential(torch.nn.Linear(256, 512, bias=False), torch.nn.GELU(), torch.nn.Linear(512, 256)).to(DEV)
    apply_fp8(m, Fp8Config(enabled=True, backend=backend))
    assert isinstance(m[0], Fp8Linear) and m[0].ops.name == backend
    y = m(_randn(8, 64, 256))
    y.sum().backward()
    assert torch.isfinite(y).all() and m[0].weight.grad is not None and m[2].bias.grad is not None
