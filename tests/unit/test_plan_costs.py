"""launcher/plan_costs.py: the time terms `moeforge plan` counts from the real modules, each held to a hand
computation on the tiny model (dim 128, 4 heads, q/kv lora 64, qk 32 + 16, v 32, 8 experts of 64, top-2,
FP32), and the pricing of each term against published-figure tables given here. No timing of this machine."""
import dataclasses

import pytest

from moeforge.fp8.config import Fp8Config
from moeforge.launcher import plan as P
from moeforge.launcher import plan_costs as C
from moeforge.model.args import load_preset

T = 256  # tokens of the micro-batch (one sequence)


@pytest.fixture(scope="module")
def tiny():
    return load_preset("tiny")


def _linear_flops(a, moe: bool) -> int:
    """2·T·Σ in·out of a block's Linears (the GEMMs one token goes through), by hand."""
    H = a.n_heads
    attn = a.dim * a.q_lora_rank + a.q_lora_rank * H * (a.qk_nope_head_dim + a.qk_rope_head_dim) + \
        a.dim * (a.kv_lora_rank + a.qk_rope_head_dim) + a.kv_lora_rank * H * (a.qk_nope_head_dim + a.v_head_dim) + \
        H * a.v_head_dim * a.dim
    ffn = 3 * a.dim * (a.moe_inter_dim * (a.n_activated_experts + a.n_shared_experts) if moe else a.inter_dim)
    gate = a.dim * a.n_routed_experts if moe else 0
    return 2 * T * (attn + ffn + gate)


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_gemm_flops_of_a_block_forward_dgrad_wgrad(tiny, kind):
    """F = the Linears' 2·T·in·out; B (input grads only, parameters frozen) and W (the rest) each repeat it."""
    c = C.count_unit(tiny, kind, seq_len=T)
    want = _linear_flops(tiny, kind == "moe")
    assert c.gemm_flops("F") == want
    assert c.gemm_flops("B") == want
    assert c.gemm_flops("W") == want
    assert all(k == "bf16" for (_, k, *_), _ in c.gemms.items())  # fp8 off: every GEMM on cuBLAS


def test_fp8_gemms_are_the_linears_but_the_gate(tiny):
    """fp8=blockwise: the same FLOPs, FP8 GEMMs (Fprop, Dgrad, Wgrad) for every Linear but the gate (BF16)."""
    c = C.count_unit(tiny, "moe", seq_len=T, fp8=Fp8Config(enabled=True))
    gate = 2 * T * tiny.dim * tiny.n_routed_experts
    for phase in "FBW":
        fp8 = sum(2 * m * n * k * x for (p, kind, m, n, k, _), x in c.gemms.items() if p == phase and kind == "fp8")
        assert fp8 == _linear_flops(tiny, True) - gate, phase
    # the routed experts' GEMMs are marked grouped: T·K rows over the E experts, 2 rows each... per expert
    rows = {m for (p, kind, m, n, k, grouped), _ in c.gemms.items() if p == "F" and grouped}
    assert rows == {T * tiny.n_activated_experts // tiny.n_routed_experts}


def test_attention_flops_in_flashattention_convention(tiny):
    """Causal forward 2·B·H·T·T·(d_qk + d_v)/2; the backward is filed with the same forward-convention count."""
    c = C.count_unit(tiny, "dense", seq_len=T)
    fwd = 2 * tiny.n_heads * T * T * (tiny.qk_head_dim + tiny.v_head_dim) / 2
    assert c.attn["F"] == fwd and c.attn["B"] == fwd and c.attn["W"] == 0


def test_rmsnorm_is_one_fused_kernel_each_way(tiny):
    """The head unit's final norm (FP32): forward reads x and the weight, writes y and a per-row rstd."""
    c = C.count_unit(tiny, "head", seq_len=T)
    D = tiny.dim
    assert c.mem[("F", "norm")] == 4 * (T * D + D + T * D + T)
    # backward (B, frozen weight): reads the gradient, x, the weight and rstd, writes dx
    assert c.mem[("B", "norm")] == 4 * (T * D + T * D + D + T + T * D)


def test_expert_weight_terms_are_filed_apart(tiny):
    """Gradient accumulation into the E experts' weights (FP32: read the grad, read the new one, write) scales
    with the experts a rank holds: filed in mem_expert, divided by ep when priced."""
    c = C.count_unit(tiny, "moe", seq_len=T)
    E, D, I = tiny.n_routed_experts, tiny.dim, tiny.moe_inter_dim
    assert c.mem_expert[("W", "grad accumulation")] == E * 3 * D * I * 3 * 4
    ep = 4
    cats = C.mem_by_category(c, ep)
    assert cats[("W", "grad accumulation")] == pytest.approx(
        c.mem[("W", "grad accumulation")] + E * 3 * D * I * 3 * 4 / ep)


def test_recompute_terms(tiny):
    """Selective: the forward of the RMSNorms and of wq_b, wkv_b (TR §3.2.3); full: the whole block's forward."""
    c = C.count_unit(tiny, "moe", seq_len=T)
    H = tiny.n_heads
    ups = 2 * T * (tiny.q_lora_rank * H * tiny.qk_head_dim + tiny.kv_lora_rank * H * (tiny.qk_nope_head_dim
                                                                                      + tiny.v_head_dim))
    assert c.gemm_flops("R_sel") == ups
    assert c.gemm_flops("R_full") == c.gemm_flops("F") and c.attn["R_full"] == c.attn["F"]
    norms = sum(v for (p, cat), v in c.mem.items() if p == "F" and cat == "norm")
    assert c.mem[("R_sel", "norm")] == norms and c.mem[("R_sel", "permute")] == 0


def _cluster(**kw):
    base = dict(name="t", hbm_gbps=1000.0, bf16_gemm_tflops=500.0, fp8_gemm=((4096, 4096, 4096, 1000.0),),
                fp8_grouped_gemm=((4, 4096, 4096, 4096, 800.0),),
                attn_fwd=((128, 1024, 400.0), (128, 4096, 600.0), (256, 1024, 500.0), (256, 4096, 700.0)),
                attn_bwd=((128, 1024, 300.0), (128, 4096, 500.0)))
    return P.Cluster(**{**base, **kw})


def test_published_figures_lookup():
    cl = P.load_cluster({"gpu": "h800"})
    assert C.gemm_tflops(cl, "fp8", 4096, 7168, 16384) == (1520, "DeepGEMM 4096x7168x16384")
    assert C.gemm_tflops(cl, "fp8", 4096, 7168, 2048, grouped_m=8192)[0] == 1214
    assert C.gemm_tflops(cl, "bf16", 4096, 129280, 7168)[0] == cl.bf16_gemm_tflops
    # MLA's mean head dim 160 between the published 128 and 256, at 4K: 579 + 32/128 x (612 - 579)
    assert C.attention_tflops(cl, 160, 4096, backward=False) == pytest.approx(579 + 0.25 * 33)
    assert C.attention_tflops(cl, 160, 4096, backward=True) == 542  # head dim 128's: none larger published
    assert C.attention_tflops(cl, 128, 65536, backward=False) == 616  # clamped, not extrapolated
    t = _cluster()
    assert C.attention_tflops(t, 128, 2048, backward=False) == pytest.approx(500.0)  # linear in log2(T)
    over = dataclasses.replace(cl, efficiency=0.5)
    assert C.gemm_tflops(over, "fp8", 1, 1, 1)[0] == pytest.approx(0.5 * cl.fp8_tflops)


def test_price_unit_terms(tiny):
    """Each term is its count over its figure: GEMM FLOPs / TFLOP/s, attention (backward 2.5x), bytes / HBM."""
    cl = _cluster()
    c = C.count_unit(tiny, "dense", seq_len=T)
    t = C.price_unit(c, cl, tiny, T)
    assert t[("F", "gemm bf16")] == pytest.approx(c.gemm_flops("F") / 500e12)
    hd = (tiny.qk_head_dim + tiny.v_head_dim) / 2  # 40: below the table, clamped to head dim 128
    assert t[("F", "attention")] == pytest.approx(c.attn["F"] / (C.attention_tflops(cl, hd, T, False) * 1e12))
    assert t[("B", "attention")] == pytest.approx(2.5 * c.attn["B"] / (C.attention_tflops(cl, hd, T, True) * 1e12))
    assert t[("B", "memory-bound")] == pytest.approx(sum(v for (p, _), v in c.mem.items() if p == "B") / 1e12)
    slow = C.price_unit(c, dataclasses.replace(cl, hbm_gbps=500.0), tiny, T)
    assert t[("F", "memory-bound")] > 0
    assert slow[("F", "memory-bound")] == pytest.approx(2 * t[("F", "memory-bound")])


def test_plan_prices_every_term_and_recompute_adds_to_b():
    """The tiny model on 4 GPUs: the chunk's F/B/W are the sums of the printed terms; selective recompute adds
    its own term to B only; a slower HBM makes the step slower (the fitted model ignored memory-bound work)."""
    base = ["model=tiny", "parallel.ep=2", "parallel.pp=2", "cluster.nodes=1", "cluster.gpus_per_node=4",
            "train.global_batch_size=32", "fp8=blockwise"]
    cfg, cl, _ = P.load_plan_config(base)
    r = P.evaluate(cfg, cl, schedules=("1f1b",), chosen="1f1b").best
    for ph, key in (("F", "F_c"), ("B", "B_c"), ("W", "W_c")):
        assert sum(v for (p, _), v in r.terms.items() if p == ph) == pytest.approx(r.chunk[key])
    assert not any(k == "recompute" for _, k in r.terms)
    cfg2, _, _ = P.load_plan_config(base + ["train.recompute=selective"])
    r2 = P.evaluate(cfg2, cl, schedules=("1f1b",), chosen="1f1b").best
    assert r2.terms[("B", "recompute")] > 0
    assert r2.chunk["F_c"] == pytest.approx(r.chunk["F_c"]) and r2.chunk["B_c"] > r.chunk["B_c"]
    slow = P.evaluate(cfg, dataclasses.replace(cl, hbm_gbps=cl.hbm_gbps / 2), schedules=("1f1b",), chosen="1f1b")
    assert slow.best.step > r.step
    assert r.optimizer > 0 and set(r.dp_bytes) == {"grad_reduce_scatter", "weight_all_gather"}
    text = P.render(P.evaluate(cfg, cl))
    assert "memory-bound (HBM)" in text and "GEMM FP8 (DeepGEMM table)" in text and "optimizer" in text
