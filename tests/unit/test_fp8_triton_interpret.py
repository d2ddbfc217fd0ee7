"""fp8/kernels.py (Triton) vs fp8/reference.py, run on CPU by the Triton interpreter (TRITON_INTERPRET=1).

The interpreter must be on before the kernels are decorated, and another test may already have imported
triton in this process, so `_worker()` runs once in a fresh process (the `interpreted` fixture,
tests/_helpers.run_interpreted) and each test below asserts on its part of the result.

What is compared, and how strictly:
  - quantizers: scales bitwise; the codes bitwise after torch casts the kernel's pre-cast values
    (`_q_dtype=torch.float32`), because the interpreter's own fp32 -> fp8 cast is wrong near powers
    of two. On a GPU the cast is real and tests/gpu/test_fp8_gpu.py compares the fp8 bytes.
  - GEMM: fed torch-quantized fp8 operands; relative Frobenius difference < 1e-6 from the emulate
    reference (both accumulate in FP32; they differ only in summation order, ~1e-7).
"""

import triton  # noqa: F401  (a dev dependency: missing, it is an install error, not a skip)

GEMM_TOL = 1e-6


def _worker() -> dict:
    import torch

    from moeforge.fp8 import kernels as Kn
    from moeforge.fp8 import reference as R

    out: dict = {}
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g) * 3

    def same_codes(q_pre, q_ref):
        return torch.equal(q_pre.to(torch.float8_e4m3fn).view(torch.uint8), q_ref.contiguous().view(torch.uint8))

    def same_scales(a, b):  # bitwise, NaN == NaN
        return torch.equal(a.contiguous().view(torch.int32), b.contiguous().view(torch.int32))

    for name, shape, block, pow2s in (
        ("act_77x200", (77, 200), (1, 128), (False, True)),
        ("act_3x5x256", (3, 5, 256), (1, 128), (False,)),
        ("col_200x130", (200, 130), (128, 1), (False, True)),
        ("weight_200x130", (200, 130), (128, 128), (False, True)),
        ("weight_256x384", (256, 384), (128, 128), (False,)),
    ):
        for pow2 in pow2s:
            x = randn(*shape)
            x.view(-1)[:3] = 0.0
            qk, sk = Kn.quantize(x, block, pow2, _q_dtype=torch.float32)
            qr, sr = R.quantize(x, block, pow2)
            out[f"quant/{name}/pow2={pow2}"] = dict(
                scales=same_scales(sk, sr), codes=same_codes(qk, qr), shape=list(qk.shape) == list(qr.shape)
            )
    x = randn(300, 200)
    qt, st = Kn.act_quant_t(x, _q_dtype=torch.float32)
    qr, sr = R.act_quant_t(x)
    out["quant/act_t_300x200"] = dict(
        scales=same_scales(st, sr), codes=same_codes(qt, qr), contiguous=qt.is_contiguous() and st.is_contiguous()
    )
    x = randn(4, 384)
    x[1, 5], x[2, 300] = float("nan"), float("inf")
    w = randn(256, 256)
    w[3, 200] = float("nan")
    qk, sk = Kn.act_quant(x, _q_dtype=torch.float32)
    _, sr = R.act_quant(x)
    _, swk = Kn.weight_quant(w, _q_dtype=torch.float32)
    _, swr = R.weight_quant(w)
    out["quant/nan_inf"] = dict(
        scales=same_scales(sk, sr) and same_scales(swk, swr),
        nan_scale=bool(torch.isnan(sk[1, 0]) and torch.isinf(sk[2, 2]) and torch.isnan(swk[0, 1])),
        # a NaN scale turns its whole tile into NaN; an inf scale gives NaN at the inf (inf/inf), 0 elsewhere
        nan_codes=bool(torch.isnan(qk[1, :128]).all() and torch.isnan(qk[2, 300]) and (qk[2, 256:300] == 0).all()),
    )

    def rel(c, ref):
        return ((c.double() - ref.double()).norm() / ref.double().norm()).item()

    cfgs = {"128": None, "64": dict(BLOCK_M=64, BLOCK_N=64, GROUP_M=2)}
    # 256^3 on the default 128 x 128 tiles; the ragged shape on 64 x 64 tiles (masks, grouped order)
    for (M, K, N), tile in (((256, 256, 256), "128"), ((77, 200, 130), "64")):
        a, b, dy = randn(M, K), randn(N, K), randn(M, N)
        aq, as_ = R.act_quant(a)
        bq, bs = R.weight_quant(b)
        gq, gs = R.act_quant(dy)
        at_q, at_s = R.act_quant_t(dy)  # Wgrad: dY.T (N, M) and A.T (K, M), tokens (M) are K here
        xt_q, xt_s = R.act_quant_t(a)
        cases = {
            "fprop": (aq, as_, bq, bs),
            "dgrad": (gq, gs, bq.t(), bs.t()),  # W.T as a transposed view
            "wgrad": (at_q, at_s, xt_q, xt_s),
            "rows": (aq, as_, *R.act_quant(b)),  # B with 1 x 128 scales
        }
        for case, args in cases.items():
            c = Kn.gemm(*args, config=cfgs[tile])
            out[f"gemm/{case}/{M}x{K}x{N}/tile{tile}"] = dict(
                rel_emulate=rel(c, R.gemm(*args)),
                rel_blockwise=rel(c, R.gemm_blockwise(*args)),
                shape=list(c.shape) == list(R.gemm(*args).shape),
                dtype=str(c.dtype),
            )
    a, b = randn(64, 256), randn(256, 256)
    a[3, 10], a[7, 200], b[130, 5] = float("nan"), float("inf"), float("nan")
    aq, as_ = R.act_quant(a)
    bq, bs = R.weight_quant(b)
    c = Kn.gemm(aq, as_, bq, bs, config=cfgs["64"])
    # The interpreter decodes the E4M3 NaN code (0x7F) as 480, so the inf row (NaN code times an inf
    # scale) comes out as +-inf here instead of NaN; on a GPU it is NaN (tests/gpu). Either way: not finite.
    bad = (~torch.isfinite(c[:, :128])).all(dim=1)
    out["gemm/nan_inf"] = dict(
        rows=bad.nonzero().flatten().tolist(),
        nan_row=bool(torch.isnan(c[3]).all()),
        finite_elsewhere=bool(torch.isfinite(c[~bad, :128]).all()),
        nan_cols=bool(torch.isnan(c[:, 128:]).all()),
    )
    empty = Kn.gemm(*R.act_quant_t(torch.zeros(0, 64)), *R.act_quant_t(torch.zeros(0, 32)))
    out["gemm/k0"] = dict(zero=bool((empty == 0).all()) and list(empty.shape) == [64, 32])
    return out


def _items(results, prefix):
    items = {k: v for k, v in results.items() if k.startswith(prefix)}
    assert items, f"no results under {prefix}"
    return items


def test_quantizers_bitwise(interpreted):
    for name, r in _items(interpreted, "quant/").items():
        assert all(r.values()), (name, r)


def test_gemm_matches_emulate(interpreted):
    items = {k: v for k, v in _items(interpreted, "gemm/").items() if "rel_emulate" in v}
    assert len(items) == 8
    for name, r in items.items():
        assert r["shape"] and r["dtype"] == "torch.float32", (name, r)
        assert r["rel_emulate"] < GEMM_TOL, (name, r)
        assert r["rel_blockwise"] < GEMM_TOL, (name, r)


def test_gemm_nan_inf_and_empty(interpreted):
    r = interpreted["gemm/nan_inf"]
    assert r["rows"] == [3, 7] and r["nan_row"] and r["finite_elsewhere"] and r["nan_cols"], r
    assert interpreted["gemm/k0"]["zero"]

