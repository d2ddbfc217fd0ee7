"""Model numerics against references written from the report's formulas (float64 where it matters)."""
import math

import pytest
import torch
import torch.nn.functional as F

from moeforge.model.args import ModelArgs, load_preset, preset_names
from moeforge.model.mla import MLA, apply_rope, yarn_freqs
from moeforge.model.moe import MoE, Gate, sequence_balance_loss, update_balance_bias_
from moeforge.model.transformer import Transformer, param_counts


def tiny(**kw) -> ModelArgs:
    return load_preset("tiny", **kw)


def test_presets_load():
    assert set(preset_names()) >= {"tiny", "small", "16b", "671b"}
    for name in preset_names():
        assert load_preset(name).name == name


def test_671b_parameter_counts():
    """TR: 671B total, 37B activated per token; MTP adds ~14B in the released weights (11.6B own + copies
    of embedding and head). The activated figure is the report's rounding: exact arithmetic gives 36.63B
    (embedding lookup excluded) — 1.01% below 37B — or 37.55B with the embedding (1.5% above)."""
    with torch.device("meta"):
        m = Transformer(load_preset("671b"))
    c = param_counts(m)
    assert abs(c["total"] / 671e9 - 1) < 0.01, c
    assert abs(c["activated"] / 37e9 - 1) < 0.0105, c
    # MTP module's own parameters plus its (released, duplicated) embedding and head = the report's 14B
    assert abs((c["mtp"] + 2 * c["embedding"]) / 14e9 - 1) < 0.05, c
    # Hand-written formula for one MoE layer's activated params: attention + 9 experts + gate + 2 norms.
    a = load_preset("671b")
    attn = (a.dim * a.q_lora_rank + a.q_lora_rank + a.q_lora_rank * a.n_heads * a.qk_head_dim
            + a.dim * (a.kv_lora_rank + a.qk_rope_head_dim) + a.kv_lora_rank
            + a.kv_lora_rank * a.n_heads * (a.qk_nope_head_dim + a.v_head_dim) + a.n_heads * a.v_head_dim * a.dim)
    expert = 3 * a.dim * a.moe_inter_dim
    dense = 3 * a.dim * a.inter_dim
    expected = (a.n_layers * (attn + 2 * a.dim) + a.n_dense_layers * dense
                + a.n_moe_layers * ((a.n_activated_experts + a.n_shared_experts) * expert + a.n_routed_experts * a.dim)
                + a.dim + a.vocab_size * a.dim)
    assert c["activated"] == expected


def naive_mla(attn: MLA, x, angles):
    """Per-head attention from the formulas (TR eq. 1-11), float64, explicit loops over heads."""
    B, T, _ = x.shape
    a = attn
    cq = a.q_norm(a.wq_a(x))
    out_heads = []
    ckv_full = a.wkv_a(x)
    ckv, kpe_raw = ckv_full[..., :a.kv_lora_rank], ckv_full[..., a.kv_lora_rank:]
    k_rope = apply_rope(kpe_raw.unsqueeze(2), angles[:T])[:, :, 0]  # shared by every head
    ckv = a.kv_norm(ckv)
    Wq = a.wq_b.weight.view(a.n_heads, a.qk_head_dim, -1)
    Wkv = a.wkv_b.weight.view(a.n_heads, a.qk_nope_head_dim + a.v_head_dim, -1)
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    for h in range(a.n_heads):
        q = cq @ Wq[h].T
        q_nope, q_pe = q[..., :a.qk_nope_head_dim], q[..., a.qk_nope_head_dim:]
        q_pe = apply_rope(q_pe.unsqueeze(2), angles[:T])[:, :, 0]
        k_nope = ckv @ Wkv[h, :a.qk_nope_head_dim].T
        v = ckv @ Wkv[h, a.qk_nope_head_dim:].T
        s = (q_nope @ k_nope.transpose(1, 2) + q_pe @ k_rope.transpose(1, 2)) * a.softmax_scale
        s = s.masked_fill(~mask, float("-inf"))
        out_heads.append(s.softmax(-1) @ v)
    return a.wo(torch.cat(out_heads, dim=-1))


@pytest.mark.parametrize("max_seq_len", [64, 8192])  # 8192 > original_seq_len exercises YaRN + mscale
def test_mla_matches_naive_per_head_attention(max_seq_len):
    args = tiny(max_seq_len=max_seq_len, original_seq_len=32 if max_seq_len == 64 else 4096)
    torch.manual_seed(0)
    attn = MLA(args).double()
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.2)
    angles = yarn_freqs(args).double()
    x = torch.randn(2, 17, args.dim, dtype=torch.float64)
    torch.testing.assert_close(attn(x, angles), naive_mla(attn, x, angles), rtol=1e-10, atol=1e-10)


def test_rope_rotation_is_relative():
    """q(m)·k(n) after RoPE depends only on m-n."""
    args = tiny(max_seq_len=64)
    ang = yarn_freqs(args).double()
    q = torch.randn(1, 1, 1, args.qk_rope_head_dim, dtype=torch.float64)
    k = torch.randn(1, 1, 1, args.qk_rope_head_dim, dtype=torch.float64)
    def dot(m, n):
        return (apply_rope(q, ang[m:m + 1]) * apply_rope(k, ang[n:n + 1])).sum()
    assert torch.allclose(dot(5, 2), dot(13, 10)) and not torch.allclose(dot(5, 2), dot(5, 3))


def _gate(seed=0, **kw):
    args = tiny(**kw)
    torch.manual_seed(seed)
    g = Gate(args)
    torch.nn.init.normal_(g.weight, std=0.5)
    return g, args


def test_router_limits_groups_and_normalises_weights():
    g, args = _gate(n_routed_experts=16, n_expert_groups=4, n_limited_groups=2, n_activated_experts=4)
    x = torch.randn(300, args.dim)
    w, idx, scores = g(x)
    per_group = args.n_routed_experts // args.n_expert_groups
    groups_used = torch.tensor([len(set((i // per_group).tolist())) for i in idx])
    assert groups_used.max() <= args.n_limited_groups
    assert groups_used.max() == args.n_limited_groups  # the limit binds for random inputs
    torch.testing.assert_close(w.sum(-1), torch.full((300,), args.route_scale))
    # gate values are the normalised raw sigmoid affinities of the selected experts
    raw = scores.gather(1, idx)
    torch.testing.assert_close(w, raw / raw.sum(-1, keepdim=True) * args.route_scale)
    torch.testing.assert_close(scores, torch.sigmoid(x @ g.weight.T))


def test_router_bias_changes_selection_not_gate_values():
    g, args = _gate(n_expert_groups=1, n_limited_groups=1)
    x = torch.randn(200, args.dim)
    w0, idx0, s0 = g(x)
    with torch.no_grad():
        g.bias[3] = 10.0  # expert 3 now always selected
    w1, idx1, s1 = g(x)
    assert (idx1 == 3).any(-1).all() and not (idx0 == 3).any(-1).all()
    torch.testing.assert_close(s0, s1)  # affinities unchanged by the bias
    raw = s1.gather(1, idx1)
    torch.testing.assert_close(w1, raw / raw.sum(-1, keepdim=True) * args.route_scale)


def test_group_score_is_sum_of_top2():
    g, args = _gate(n_routed_experts=8, n_expert_groups=4, n_limited_groups=1, n_activated_experts=2)
    with torch.no_grad():
        g.weight.zero_()
        # Group 0 has one very strong expert; group 1 has two good ones whose sum wins.
        g.bias.copy_(torch.tensor([0.9, -0.5, 0.6, 0.6, 0, 0, 0, 0]))
    _, idx, _ = g(torch.randn(5, args.dim))
    assert sorted(idx[0].tolist()) == [2, 3]


def test_bias_update_direction():
    bias = torch.zeros(4)
    update_balance_bias_(bias, torch.tensor([10.0, 0.0, 5.0, 5.0]), gamma=0.001)
    assert bias.tolist() == pytest.approx([-0.001, 0.001, 0.0, 0.0])


def test_sequence_balance_loss_formula():
    torch.manual_seed(0)
    B, T, E, K, alpha = 2, 5, 6, 2, 0.01
    scores = torch.rand(B, T, E, dtype=torch.float64)
    idx = scores.topk(K, dim=-1).indices
    expected = 0.0
    for b in range(B):
        f = [E / (K * T) * sum(int(i in idx[b, t].tolist()) for t in range(T)) for i in range(E)]
        p = [sum(scores[b, t, i] / scores[b, t].sum() for t in range(T)) / T for i in range(E)]
        expected += alpha * sum(fi * pi for fi, pi in zip(f, p)) / B
    assert float(sequence_balance_loss(scores, idx, alpha)) == pytest.approx(float(expected), rel=1e-12)


def test_local_dispatcher_matches_per_token_loop_and_grads():
    args = tiny()
    torch.manual_seed(0)
    moe = MoE(args).double()
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    moe.aux_alpha = 0.0  # the aux loss' own router gradient is tested separately
    x = torch.randn(2, 9, args.dim, dtype=torch.float64, requires_grad=True)
    y = moe(x)
    w, idx, _ = moe.gate(x.view(-1, args.dim))
    xs = x.view(-1, args.dim)
    ref = torch.stack([
        sum(w[t, j] * moe.experts[str(int(idx[t, j]))](xs[t]) for j in range(idx.size(1))) + moe.shared_experts(xs[t])
        for t in range(xs.size(0))
    ]).view_as(y)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    gy = torch.randn_like(y)
    params = [x, *moe.parameters()]
    names = ["x"] + [n for n, _ in moe.named_parameters()]
    for n, a, b in zip(names, torch.autograd.grad(y, params, gy, allow_unused=True),
                       torch.autograd.grad(ref, params, gy, allow_unused=True)):
        assert (a is None) == (b is None), n
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=n)
    assert moe.tokens_per_expert.sum() == 18 * args.n_activated_experts  # every token copy counted once


def test_aux_loss_reaches_router_only_through_autoscaler():
    args = tiny(seq_aux_loss_alpha=0.5)
    torch.manual_seed(0)
    moe = MoE(args)
    torch.nn.init.normal_(moe.gate.weight, std=0.3)
    x = torch.randn(2, 8, args.dim)
    moe.aux_loss_scale = 0.25
    moe(x).sum().backward()
    g_with = moe.gate.weight.grad.clone()
    moe.zero_grad()
    w, idx, scores = moe.gate(x.view(-1, args.dim))
    aux = sequence_balance_loss(scores.view(2, 8, -1), idx.view(2, 8, -1), 0.5)
    (0.25 * aux).backward()
    g_aux = moe.gate.weight.grad.clone()
    moe.zero_grad()
    moe.aux_alpha = 0.0
    moe(x).sum().backward()
    torch.testing.assert_close(g_with, moe.gate.weight.grad + g_aux, rtol=1e-5, atol=1e-7)


def test_mtp_logits_shapes_and_loss_weight():
    from moeforge.model.loss import lm_losses

    args = tiny(n_mtp_modules=2)
    model = Transformer(args)
    model.init_weights(seed=0)
    rows = torch.randint(0, 256, (3, 20 + 1 + 2))
    logits, mtp = model(rows[:, :20], [rows[:, 1:21], rows[:, 2:22]])
    assert logits.shape == (3, 20, args.vocab_size) and [m.shape for m in mtp] == [logits.shape] * 2
    main, mtp_losses = lm_losses(model, rows)
    assert len(mtp_losses) == 2
    # MTP module k at position i predicts t_{i+k+1}: its loss targets are shifted by k
    V = args.vocab_size
    torch.testing.assert_close(mtp_losses[1], F.cross_entropy(mtp[1].reshape(-1, V), rows[:, 3:23].reshape(-1)))
    assert math.isclose(float(main), float(F.cross_entropy(logits.reshape(-1, V), rows[:, 1:21].reshape(-1))), rel_tol=1e-6)


def test_init_is_layout_independent():
    """Each parameter's init depends only on (seed, name): a model with fewer layers gets the same values."""
    a = Transformer(tiny())
    b = Transformer(tiny(n_layers=2, n_mtp_modules=0))
    a.init_weights(seed=3)
    b.init_weights(seed=3)
    sa = a.state_dict()
    for k, v in b.state_dict().items():
        assert torch.equal(v, sa[k]), k


@pytest.mark.parametrize("bad, field", [
    (dict(n_routed_experts=6, n_expert_groups=4), "n_routed_experts"),
    (dict(n_limited_groups=5), "n_limited_groups"),
    (dict(qk_rope_head_dim=15), "qk_rope_head_dim"),
    (dict(dtype="float16"), "dtype"),
    (dict(dim=0), "dim"),
])
def test_bad_model_args_name_the_field(bad, field):
    with pytest.raises(ValueError, match=f"model.{field}"):
        tiny(**bad)
