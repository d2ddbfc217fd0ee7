"""fp8/fused.py: the torch twins on CPU, the Triton kernels under TRITON_INTERPRET=1 (subprocess).

Strictness (FP32 inputs; the interpreter's bf16 and fp8 casts are wrong, so the kernels store their
pre-cast values, `_q_dtype=torch.float32`, and torch casts them):
  - permute_quant: scales and codes bitwise equal to the twin (gather, then fp8.reference's quantizer).
  - swiglu_quant / rmsnorm_quant: exp, sqrt and the sum order are the kernel's own, so h / y may move
    by an FP32 ulp: scales and y within 1e-6 relative, at most 0.1% of the codes one E4M3 step away.
    (On a GPU, tests/gpu/test_fp8_grouped_gpu.py checks BF16 inputs the same way.)
"""

import torch
import torch.nn.functional as F

from moeforge.fp8 import fused
from moeforge.fp8 import reference as R


def test_twins():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 200, generator=g)
    src = torch.tensor([3, -1, 9, 0, -1])
    gx = fused.gather_rows(x, src)
    assert torch.equal(gx[0], x[3]) and gx[1].eq(0).all() and torch.equal(gx[3], x[0])
    q, s = fused.permute_quant_ref(x, src, 128, True)
    qr, sr = R.act_quant(gx, 128, True)
    assert torch.equal(s, sr) and torch.equal(q.view(torch.uint8), qr.view(torch.uint8))
    qt, st = fused.permute_quant_ref(x, src, transposed=True)
    assert qt.shape == (200, 5) and st.shape == (200, 1)
    h1, h3 = torch.randn(4, 256, generator=g), torch.randn(4, 256, generator=g)
    q, s = fused.swiglu_quant_ref(h1, h3)
    assert torch.allclose(R.dequantize(q, s), F.silu(h1) * h3, rtol=0.07, atol=1e-3)
    w = torch.rand(200, generator=g) + 0.5
    y, q, s = fused.rmsnorm_quant_ref(x.bfloat16(), w, 1e-6)
    assert y.dtype == torch.bfloat16 and q.shape == (10, 200) and s.shape == (10, 2)


def _worker() -> dict:
    out = {}
    g = torch.Generator().manual_seed(0)

    def bits(q_pre, q_ref):
        return q_pre.to(torch.float8_e4m3fn).view(torch.uint8), q_ref.contiguous().view(torch.uint8)

    def same(q_pre, q_ref):
        a, b = bits(q_pre, q_ref)
        return torch.equal(a, b)

    def step_off(q_pre, q_ref):  # fraction of codes that differ, and whether all of those are one step apart
        a, b = bits(q_pre, q_ref)
        d = (a.int() - b.int()).abs()
        return (d > 0).float().mean().item(), int(d.max())

    def rel(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm()).item()

    x = torch.randn(50, 200, generator=g) * 3
    x[4, 7] = 0.0
    src = torch.tensor([3, -1, 0, 49, 7, -1, -1, 12] * 20 + [4])  # 161 rows: a partial 128-row tile
    for transposed in (False, True):
        for pow2 in (False, True):
            q, s = fused.permute_quant(x, src, 128, pow2, transposed, _q_dtype=torch.float32)
            qr, sr = fused.permute_quant_ref(x, src, 128, pow2, transposed)
            out[f"permute/t={transposed}/pow2={pow2}"] = dict(
                scales=torch.equal(s, sr), codes=same(q, qr), shape=list(q.shape) == list(qr.shape),
                contiguous=q.is_contiguous() and s.is_contiguous())
    x64 = torch.randn(40, 64, generator=g)  # 64-wide tiles, rows reversed
    q, s = fused.permute_quant(x64, torch.arange(39, -1, -1), 64, _q_dtype=torch.float32)
    qr, sr = fused.permute_quant_ref(x64, torch.arange(39, -1, -1), 64)
    out["permute/block64"] = dict(scales=torch.equal(s, sr), codes=same(q, qr))

    h1, h3 = torch.randn(70, 200, generator=g) * 3, torch.randn(70, 200, generator=g)
    h1[0, :5] = torch.tensor([0.0, -100.0, 100.0, 1e-30, -1e-30])
    q, s = fused.swiglu_quant(h1, h3, _q_dtype=torch.float32)
    qr, sr = fused.swiglu_quant_ref(h1, h3)
    frac, mx = step_off(q, qr)
    out["swiglu"] = dict(scales=rel(s, sr), codes_off=frac, max_step=mx, shape=list(q.shape) == [70, 200])
    q, s = fused.swiglu_quant(h1.view(7, 10, 200), h3.view(7, 10, 200), _q_dtype=torch.float32)
    out["swiglu/3d"] = dict(shape=list(q.shape) == [7, 10, 200] and list(s.shape) == [7, 10, 2])

    w = torch.rand(200, generator=g) + 0.5
    for pow2 in (False, True):
        y, q, s = fused.rmsnorm_quant(x, w, 1e-6, 128, pow2, _q_dtype=torch.float32)
        yr, qr, sr = fused.rmsnorm_quant_ref(x, w, 1e-6, 128, pow2)
        frac, mx = step_off(q, qr)
        out[f"rmsnorm/pow2={pow2}"] = dict(y=rel(y, yr), scales=rel(s, sr), codes_off=frac, max_step=mx)
    y, q, s = fused.rmsnorm_quant(torch.zeros(3, 256), w.new_ones(256), 1e-6, _q_dtype=torch.float32)
    out["rmsnorm/zeros"] = dict(finite=bool(torch.isfinite(y).all() and y.eq(0).all() and q.eq(0).all()))
    return out


def test_permute_quant_bitwise(interpreted):
    items = {k: v for k, v in interpreted.items() if k.startswith("permute/")}
    assert len(items) == 5
    for name, r in items.items():
        assert all(r.values()), (name, r)


def test_swiglu_quant(interpreted):
    r = interpreted["swiglu"]
    assert r["shape"] and r["scales"] < 1e-6 and r["codes_off"] < 1e-3 and r["max_step"] <= 1, r
    assert interpreted["swiglu/3d"]["shape"]


def test_rmsnorm_quant(interpreted):
    for pow2 in (False, True):
        r = interpreted[f"rmsnorm/pow2={pow2}"]
        assert r["y"] < 1e-6 and r["scales"] < 1e-6 and r["codes_off"] < 1e-3 and r["max_step"] <= 1, r
    assert interpreted["rmsnorm/zeros"]["finite"]

