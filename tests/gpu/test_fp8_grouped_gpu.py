"""fp8/grouped.py and fp8/fused.py on a real GPU: Triton against the emulate twins on the same device.

Tolerances. Grouped GEMMs vs the per-group reference GEMM: 2e-3 relative, as the dense GEMMs
(tests/gpu/test_fp8_gpu.py: Hopper's FP8 MMA sums a 128-wide K block with ~14 bits before our FP32
promotion). permute_quant: bitwise (the dense quantizer behind a row index). swiglu_quant /
rmsnorm_quant on BF16: the kernel's exp / rsqrt and sum order may move the BF16 intermediate by an ulp,
so scales within 1e-2 relative, < 1% of the codes one step away. The whole expert MLP in BF16 vs
emulate: 2e-2 (each BF16 intermediate rounding that flips adds 2^-8 on that element); vs float64 the
FP8 error itself (< 0.08). A wrong row, group or scale gives O(1) everywhere.
"""

import copy

import pytest
import torch
import torch.nn as nn

from moeforge.fp8 import Fp8Config, apply_fp8, unavailable_reason
from moeforge.fp8 import reference as R

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
DEV = "cuda"
GEMM_TOL = 2e-3


@pytest.fixture(autouse=True)
def _triton():
    reason = unavailable_reason("triton")
    if reason is not None:
        pytest.skip(reason)


def rel(c, ref):
    return ((c.double() - ref.double()).norm() / ref.double().norm()).item()


def _randn(*shape, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    return (torch.randn(*shape, generator=g, device=DEV) * scale).to(dtype)


def _counts(G, mean, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = (torch.rand(G, generator=g) * 2 * mean).long()
    c[1] = 0  # an expert without tokens
    return c.tolist()


@pytest.mark.parametrize("G,mean,N,K", [(5, 100, 136, 200), (8, 1024, 2048, 7168), (32, 512, 1024, 512)])
def test_grouped_gemms_vs_reference(G, mean, N, K):
    from moeforge.fp8.grouped import (GroupedLayout, gemm_grouped_ref, gemm_grouped_triton, gemm_wgrad_grouped_ref,
                             gemm_wgrad_grouped_triton)

    L = GroupedLayout.build(_counts(G, mean), DEV)
    x, dy = _randn(L.m, K, seed=1), _randn(L.m, N, seed=2)
    qs = [R.weight_quant(_randn(N, K, seed=3 + i)) for i in range(G)]
    wq, ws = torch.stack([q for q, _ in qs]), torch.stack([s for _, s in qs])
    xq, xs = R.act_quant(L.pad(x))
    dq, ds = R.act_quant(L.pad(dy))
    for out_dtype in (torch.float32, torch.bfloat16):
        tol = GEMM_TOL + (2.0**-8 if out_dtype == torch.bfloat16 else 0)
        for case, args in (("fprop", (xq, xs, wq, ws, L)),
                           ("dgrad", (dq, ds, wq.transpose(1, 2), ws.transpose(1, 2), L))):
            c = gemm_grouped_triton(*args, 128, out_dtype)
            assert c.dtype == out_dtype and rel(c, gemm_grouped_ref(*args)) < tol, case
            assert c[L.src < 0].eq(0).all(), case
    args = (*R.act_quant_t(L.pad(dy)), *R.act_quant_t(L.pad(x)), L)
    assert rel(gemm_wgrad_grouped_triton(*args), gemm_wgrad_grouped_ref(*args)) < GEMM_TOL


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("pow2", [False, True])
def test_permute_quant_bitwise(transposed, pow2):
    from moeforge.fp8 import fused
    from moeforge.fp8.grouped import GroupedLayout

    L = GroupedLayout.build(_counts(16, 300), DEV)
    x = _randn(L.m, 7168, dtype=torch.bfloat16, scale=3)
    q, s = fused.permute_quant(x, L.src, 128, pow2, transposed)
    qr, sr = fused.permute_quant_ref(x, L.src, 128, pow2, transposed)
    assert torch.equal(s, sr.contiguous())
    assert torch.equal(q.view(torch.uint8), qr.contiguous().view(torch.uint8))


def _codes_off(q, qr):
    d = (q.view(torch.uint8).int() - qr.contiguous().view(torch.uint8).int()).abs()
    return (d > 0).float().mean().item(), int(d.max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_and_rmsnorm_quant(dtype):
    from moeforge.fp8 import fused

    h1, h3 = _randn(4096, 2048, dtype=dtype, seed=1, scale=3), _randn(4096, 2048, dtype=dtype, seed=2)
    q, s = fused.swiglu_quant(h1, h3)
    qr, sr = fused.swiglu_quant_ref(h1, h3)
    frac, step = _codes_off(q, qr)
    assert rel(s, sr) < 1e-2 and frac < 1e-2 and step <= 1, (rel(s, sr), frac, step)
    x, w = _randn(4096, 7168, dtype=dtype, seed=3, scale=2), _randn(7168, seed=4).abs() + 0.5
    y, q, s = fused.rmsnorm_quant(x, w, 1e-6)
    yr, qr, sr = fused.rmsnorm_quant_ref(x, w, 1e-6)
    frac, step = _codes_off(q, qr)
    assert y.dtype == dtype and rel(y, yr) < 1e-2 and rel(s, sr) < 1e-2 and frac < 1e-2 and step <= 1


class _Layer(nn.Module):
    def __init__(self, experts):
        super().__init__()
        self.experts = experts


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_experts_triton_vs_emulate_and_loop(dtype):
    """32 SwiGLU experts of the `small` model's size: grouped Triton vs grouped emulate vs Fp8Linear loop."""
    from moeforge.fp8.grouped import apply_grouped_experts
    from moeforge.model.moe import MLP, run_experts

    D, I, G = 1024, 512, 32
    torch.manual_seed(0)
    base = nn.ModuleDict({str(i): MLP(D, I, device=DEV, dtype=dtype) for i in range(G)})
    for p in base.parameters():
        nn.init.normal_(p, std=D ** -0.5)
    counts = _counts(G, 600)
    xs, dy = _randn(sum(counts), D, dtype=dtype, seed=7), _randn(sum(counts), D, dtype=dtype, seed=8)
    res = {}
    for name, backend, grouped in (("emulate", "emulate", True), ("triton", "triton", True),
                                   ("loop", "triton", False)):
        # the loop's SwiGLU (autograd) keeps h1, h3 in high precision: compare the saving it shares
        cfg = Fp8Config(enabled=True, backend=backend, grouped_experts=grouped, cache_fp8_activations=False)
        e = apply_fp8(copy.deepcopy(base), cfg)
        apply_grouped_experts(_Layer(e), cfg)
        x = xs.clone().requires_grad_()
        y = run_experts(e, x, counts)
        y.backward(dy)
        res[name] = [y.detach(), x.grad] + [e[str(i)].w2.weight.grad for i in (0, 2)] + [e["1"].w1.weight.grad]
    assert res["triton"][-1] is None and res["loop"][-1] is None
    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3
    for other in ("emulate", "loop"):
        for name, a, b in zip(("y", "dx", "dw2[0]", "dw2[2]"), res["triton"][:4], res[other][:4]):
            assert a.dtype == dtype and rel(a, b) < tol, (other, name, rel(a, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_experts_cached_triton_vs_emulate(dtype):
    """With the FP8 activation caches (xs, h1, h3 as FP8 tiles, SwiGLU recomputed, xs's tiles converted by
    kernels.act_requant_t): grouped Triton vs grouped emulate. h1 and h3 are rounded to E4M3 for the cache,
    so a GEMM that differs by the MMA's accumulation (~1e-4) flips some of those roundings: 2e-2 / 3e-2
    allowed (not yet measured on a GPU); a wrong row, group, tile or scale gives O(1). Also vs float64."""
    from moeforge.fp8.grouped import apply_grouped_experts
    from moeforge.model.moe import MLP, run_experts

    D, I, G = 1024, 512, 32
    torch.manual_seed(0)
    base = nn.ModuleDict({str(i): MLP(D, I, device=DEV, dtype=dtype) for i in range(G)})
    for p in base.parameters():
        nn.init.normal_(p, std=D ** -0.5)
    counts = _counts(G, 600)
    xs, dy = _randn(sum(counts), D, dtype=dtype, seed=7), _randn(sum(counts), D, dtype=dtype, seed=8)
    res = {}
    for backend in ("emulate", "triton"):
        cfg = Fp8Config(enabled=True, backend=backend)
        assert cfg.cache_fp8_activations and cfg.cache_fp8_weights
        e = apply_fp8(copy.deepcopy(base), cfg)
        apply_grouped_experts(_Layer(e), cfg)
        for _ in range(2):  # the second micro-batch reads the weight cache
            x = xs.clone().requires_grad_()
            e.zero_grad()
            y = run_experts(e, x, counts)
            y.backward(dy)
        res[backend] = [y.detach(), x.grad, e["0"].w1.weight.grad, e["2"].w2.weight.grad, e["1"].w1.weight.grad]
    assert res["triton"][-1] is None and res["emulate"][-1] is None
    tol = 3e-2 if dtype == torch.bfloat16 else 2e-2
    for name, a, b in zip(("y", "dx", "dw1[0]", "dw2[2]"), res["triton"][:4], res["emulate"][:4]):
        assert a.dtype == dtype and rel(a, b) < tol, (name, rel(a, b))
    # and still the FP8 recipe vs float64 autograd of the same experts
    x64 = xs.double().requires_grad_()
    outs, start = [], 0
    for i, n in enumerate(counts):
        m = base[str(i)]
        w1, w2, w3 = (getattr(m, k).weight.detach().double() for k in ("w1", "w2", "w3"))
        xi = x64[start:start + n]
        start += n
        outs.append((torch.nn.functional.silu(xi @ w1.t()) * (xi @ w3.t())) @ w2.t())
    torch.cat(outs).backward(dy.double())
    assert rel(res["triton"][1], x64.grad) < 0.1, rel(res["triton"][1], x64.grad)
