"""Blockwise E4M3 quantization (fp8/reference.py) against a float64 reference and torchao's quantizers.

Bounds used below. E4M3 has 3 mantissa bits, so round-to-nearest moves a normal scaled value v = x / s
by at most half a spacing, 2^(e-4) <= 2^-4 |v|; below the smallest normal (2^-6) the spacing is 2^-9,
so the error is at most 2^-10 in scaled units. Dequantized: |q s - x| <= max(2^-4 |x|, 2^-10 s), up to
the two fp32 roundings of x / s and q * s (a factor 1 + 2^-22 covers them).
"""

import math

import pytest
import torch

from moeforge.fp8 import reference as R


pytestmark = pytest.mark.usefixtures("one_thread")


SHAPES_BLOCKS = [
    ((77, 200), (1, 128)),
    ((3, 5, 256), (1, 128)),
    ((200, 130), (128, 1)),
    ((256, 384), (128, 1)),
    ((200, 130), (128, 128)),
    ((384, 256), (128, 128)),
]


def _x(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.logspace(-3, 3, shape[-1])  # channels over 6 decades
    x.view(-1)[:7] = 0.0
    return x


def _scales_full(s, shape, block):
    """Broadcast each block's scale to its elements (float64), partial edge blocks included."""
    br, bc = block
    s2 = s.reshape(-1, s.shape[-1]).double()
    full = s2.repeat_interleave(bc, dim=-1)[:, : shape[-1]]
    if br != 1:
        full = full.repeat_interleave(br, dim=0)[: shape[0]]
    return full.reshape(shape)


def _amax64(x, block):
    """Per-block amax in float64 by an independent loop over blocks (slow but obviously right)."""
    br, bc = block
    x2 = x.reshape(-1, x.shape[-1]).double()
    R_, C = x2.shape
    out = torch.zeros(math.ceil(R_ / br), math.ceil(C / bc), dtype=torch.float64)
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            out[i, j] = x2[i * br : (i + 1) * br, j * bc : (j + 1) * bc].abs().max()
    return out


@pytest.mark.parametrize("shape,block", SHAPES_BLOCKS)
@pytest.mark.parametrize("pow2", [False, True])
def test_scales_match_float64_amax(shape, block, pow2):
    x = _x(shape)
    q, s = R.quantize(x, block, pow2)
    assert q.shape == x.shape and q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32
    amax = _amax64(x, block)
    assert s.reshape(amax.shape).shape == amax.shape
    s = s.reshape(amax.shape).double()
    exact = torch.clamp((amax / 448.0).float().double(), min=2.0**-126)  # fp64 quotient, rounded to fp32 once
    if not pow2:
        assert torch.equal(s, exact)
    else:
        # frexp: v = m 2^e with m in [0.5, 1); the next power of two up is 2^e, or v itself when m == 0.5
        up = [2.0 ** (math.frexp(v)[1] - (math.frexp(v)[0] == 0.5)) for v in exact.flatten().tolist()]
        assert torch.equal(s, torch.tensor(up, dtype=torch.float64).reshape(s.shape))
        assert (s >= exact).all() and (s / 2 < exact).all()


@pytest.mark.parametrize("shape,block", SHAPES_BLOCKS)
@pytest.mark.parametrize("pow2", [False, True])
def test_dequantize_error_bound(shape, block, pow2):
    x = _x(shape, seed=1)
    q, s = R.quantize(x, block, pow2)
    xd = R.dequantize(q, s, block, torch.float64)
    sf = _scales_full(s, shape, block)
    bound = torch.maximum(2.0**-4 * x.double().abs(), 2.0**-10 * sf) * (1 + 2.0**-22)
    err = (xd - x.double()).abs()
    assert (err <= bound).all(), f"worst excess {(err - bound).max().item()}"
    # Saturation: each block's largest element lands on ±448 (non-pow2) or within [224, 448] (pow2: amax / s is in (224, 448] before rounding).
    qa = q.float().abs().reshape(-1, q.shape[-1])
    qmax = _amax64(qa.reshape(q.shape), block)
    if pow2:
        assert ((qmax >= 224) & (qmax <= 448)).all()
    else:
        assert (qmax == 448).all()


E4M3_POS = torch.arange(127, dtype=torch.uint8).view(torch.float8_e4m3fn).double()  # 0 .. 448, ascending


def _round_e4m3_f64(v):
    """Round-to-nearest-even onto E4M3 in float64, saturating at 448; returns (values, near_tie mask)."""
    a = v.abs().clamp(max=448.0)
    hi = torch.bucketize(a, E4M3_POS).clamp(1, 126)
    lo_v, hi_v = E4M3_POS[hi - 1], E4M3_POS[hi]
    d_lo, d_hi = a - lo_v, hi_v - a
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (hi % 2 == 0))
    r = torch.where(pick_hi, hi_v, lo_v)
    mid = (lo_v + hi_v) / 2
    near_tie = (a - mid).abs() <= 2.0**-21 * a
    return torch.copysign(r, v), near_tie


@pytest.mark.parametrize("shape,block", SHAPES_BLOCKS[:1] + SHAPES_BLOCKS[2:3] + SHAPES_BLOCKS[4:5])
def test_codes_are_float64_nearest(shape, block):
    x = _x(shape, seed=2)
    q, s = R.quantize(x, block)
    v = x.double() / _scales_full(s, shape, block)
    ref, near_tie = _round_e4m3_f64(v)
    same = q.double() == ref
    assert same[~near_tie].all(), f"{(~same & ~near_tie).sum().item()} codes differ from float64 rounding"
    assert same.float().mean() > 0.999


def test_nan_and_inf_poison_their_block_only():
    x = torch.randn(4, 384)
    x[1, 5] = float("nan")
    x[2, 300] = float("inf")
    q, s = R.act_quant(x)
    assert torch.isnan(s[1, 0]) and torch.isinf(s[2, 2])
    assert torch.isfinite(s[[0, 3]]).all() and torch.isfinite(s[1, 1:]).all() and torch.isfinite(s[2, :2]).all()
    xd = R.dequantize(q, s)
    assert torch.isnan(xd[1, :128]).all() and torch.isnan(xd[2, 256:]).all()  # the whole tile, not a clamped 448
    assert torch.isfinite(xd[[0, 3]]).all() and torch.isfinite(xd[1, 128:]).all() and torch.isfinite(xd[2, :256]).all()
    for pow2 in (False, True):
        _, sw = R.weight_quant(x[:, :256].t().contiguous(), 128, pow2)
        assert torch.isnan(sw[0, 0]) and torch.isfinite(sw[1]).all()


def test_zero_block_and_huge_values():
    x = torch.zeros(2, 256)
    x[1, 128:] = 3.0e38  # near fp32 max: s = amax / 448 stays finite, no overflow in x / s
    q, s = R.act_quant(x)
    assert torch.equal(s[0], torch.full((2,), 2.0**-126)) and (q[0].float() == 0).all()
    assert torch.isfinite(s).all() and (q[1, 128:].float() == 448).all()
    assert torch.allclose(R.dequantize(q, s)[1, 128:], x[1, 128:], rtol=2**-4)


def test_ceil_pow2_exact():
    v = torch.tensor([1.0, 1.0000001, 1.5, 2.0, 3.0, 0.75, 2.0**-126, 1e-40, float("inf"), float("nan")])
    p = R.ceil_pow2(v)
    assert p[:8].tolist() == [1.0, 2.0, 2.0, 2.0, 4.0, 1.0, 2.0**-126, 2.0**-126]
    assert torch.isinf(p[8]) and torch.isnan(p[9])


def test_act_quant_t_is_transposed_128x1():
    x = _x((300, 200), seed=3)
    q, s = R.quantize(x, (128, 1))
    q_t, s_t = R.act_quant_t(x)
    assert q_t.shape == (200, 300) and s_t.shape == (200, 3)
    assert torch.equal(q_t.contiguous().view(torch.uint8), q.t().contiguous().view(torch.uint8))
    assert torch.equal(s_t, s.t())
    # and it is the 1 x 128 tiling of x.T
    q2, s2 = R.act_quant(x.t().contiguous())
    assert torch.equal(q2.view(torch.uint8), q_t.contiguous().view(torch.uint8)) and torch.equal(s2, s_t)


@pytest.mark.parametrize("block", [(1, 128), (128, 1), (128, 128)])
def test_strided_input_same_as_contiguous(block):
    x = _x((200, 300), seed=9).t()  # (300, 200) transposed view
    q1, s1 = R.quantize(x, block)
    q2, s2 = R.quantize(x.contiguous(), block)
    assert torch.equal(q1.contiguous().view(torch.uint8), q2.view(torch.uint8)) and torch.equal(s1, s2)
    assert torch.equal(R.dequantize(q1, s1, block), R.dequantize(q2, s2, block))


def test_bf16_input_matches_fp32_of_same_values():
    x = _x((64, 256), seed=4).bfloat16()
    q1, s1 = R.act_quant(x)
    q2, s2 = R.act_quant(x.float())
    assert torch.equal(q1.view(torch.uint8), q2.view(torch.uint8)) and torch.equal(s1, s2)


def test_rejects_bad_shapes():
    with pytest.raises(ValueError, match="2-D"):
        R.quantize(torch.randn(2, 3, 128), (128, 128))
    with pytest.raises(ValueError, match="2-D"):
        R.act_quant_t(torch.randn(2, 3, 128))


def test_dispatch_payload_roundtrip():
    x = _x((50, 300), seed=5)
    payload, scales = R.quantize_for_dispatch(x)
    assert payload.dtype == torch.uint8 and payload.shape == x.shape and scales.shape == (50, 3)
    assert torch.equal(R.ceil_pow2(scales), scales)  # power-of-2 scales
    xd = R.dequantize_from_dispatch(payload, scales, out_dtype=torch.float32)
    q, s = R.act_quant(x, 128, power_of_2_scales=True)
    assert torch.equal(xd, R.dequantize(q, s))
    with pytest.raises(TypeError, match="uint8"):
        R.dequantize_from_dispatch(payload.float(), scales)


# torchao's pure-torch blockwise quantizers (torchao.prototype.blockwise_fp8_training.kernels) are an
# independent oracle. They scale by 448 / amax (computed in float64) and return 1 / that, where we divide
# by amax / 448: scales agree to 2 fp32 ulps and codes to one E4M3 step where x / s sits on a rounding tie.
def _torchao():
    import torchao.prototype.blockwise_fp8_training.kernels as mod  # dev dependencies (it imports triton)

    return mod


def _close_codes(q_ours, q_ao):
    a, b = q_ours.float(), q_ao.float()
    same = a == b
    assert same.float().mean() > 0.999, f"only {same.float().mean().item():.5f} of the codes are equal"
    # where they differ it is by one E4M3 step: at most 2^-3 relative to the smaller magnitude
    diff = ~same
    assert ((a[diff] - b[diff]).abs() <= 2.0**-3 * torch.minimum(a[diff].abs(), b[diff].abs()) + 2.0**-9).all()


def test_matches_torchao_act_1x128():
    ao = _torchao()
    x = _x((256, 512), seed=6)
    q_ao, s_ao = ao.torch_blockwise_scale_act_quant_lhs(x, 128)
    q, s = R.act_quant(x)
    torch.testing.assert_close(s, s_ao.contiguous(), rtol=2.0**-22, atol=0)
    _close_codes(q, q_ao)


def test_matches_torchao_act_128x1():
    ao = _torchao()
    x = _x((256, 384), seed=7)
    q_ao, s_ao = ao.torch_blockwise_scale_act_quant_rhs(x, 128)  # s: (M/128, K)
    q, s = R.quantize(x, (128, 1))
    torch.testing.assert_close(s, s_ao, rtol=2.0**-22, atol=0)
    _close_codes(q, q_ao.contiguous())


def test_matches_torchao_weight_128x128():
    ao = _torchao()
    w = _x((384, 256), seed=8)
    q_ao, s_ao = ao.torch_blockwise_scale_weight_quant(w, 128)
    q, s = R.weight_quant(w)
    torch.testing.assert_close(s, s_ao, rtol=2.0**-22, atol=0)
    _close_codes(q, q_ao)
