"""model/flops.py: the analytic counts equal the module's, and the 671b FLOP figure.

The counts are derived from ModelArgs in one place (flops.parts); these tests hold them to the
meta-device Transformer: totals (model.transformer.param_counts) and per top-level module (what the
pipeline split and `moeforge plan` sum per stage). The 671b module check builds 44k modules (~20-30 s
on 2 cores) and is marked slow. FLOPs: the forward matmul FLOPs of a real tiny forward pass, counted
by torch's FlopCounterMode, equal 2 x the matmul parameters per token.
"""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from moeforge.model.args import load_preset
from moeforge.model.flops import (attention_flops_per_token, count_params, matmul_params, parts,
                         train_flops_per_token)
from moeforge.model.transformer import Transformer, is_expert_param, param_counts


def _meta(name):
    with torch.device("meta"):
        return Transformer(load_preset(name))


def _by_module(model):
    """{top-level fqn: (params, routed-expert params)} from the module itself."""
    out = {}
    for name, p in model.named_parameters():
        top = ".".join(name.split(".")[:2]) if name.startswith(("layers.", "mtp.")) else name.split(".")[0]
        n, e = out.get(top, (0, 0))
        out[top] = (n + p.numel(), e + (p.numel() if is_expert_param(name) else 0))
    return out


def _by_fqn(args):
    out = {}
    for p in parts(args):
        n, e = out.get(p.fqn, (0, 0))
        out[p.fqn] = (n + p.params, e + (p.params if p.is_expert else 0))
    return out


@pytest.mark.parametrize("name", ["tiny", "small", "16b"])
def test_counts_equal_the_module(name):
    model = _meta(name)
    assert count_params(load_preset(name)) == param_counts(model)
    assert _by_fqn(load_preset(name)) == _by_module(model)


@pytest.mark.slow
def test_671b_counts_equal_the_module():
    model = _meta("671b")
    assert count_params(load_preset("671b")) == param_counts(model)
    assert _by_fqn(load_preset("671b")) == _by_module(model)


def test_matmul_params_are_the_activated_params_less_the_norms():
    for name in ("tiny", "16b", "671b"):
        a = load_preset(name)
        norms = sum(p.params for p in parts(a) if p.name == "norm" and not p.fqn.startswith("mtp."))
        assert matmul_params(a)["main"] == count_params(a)["activated"] - norms


def test_forward_matmul_flops_of_a_real_pass():
    """FlopCounterMode on the tiny model (LocalDispatcher: each token runs exactly its K experts)."""
    a = load_preset("tiny")
    torch.manual_seed(0)
    model = Transformer(a)
    model.init_weights(0)
    B, T = 2, 16
    toks = torch.randint(0, a.vocab_size, (B, T + 1))
    with FlopCounterMode(display=False) as fc:
        model(toks[:, :T], [toks[:, 1:]])
    counts = fc.get_flop_counts()["Global"]
    linear = sum(v for op, v in counts.items() if str(op) in ("aten.mm", "aten.addmm"))  # Linear layers + gate
    m = matmul_params(a)
    assert linear == 2 * (m["main"] + m["mtp"]) * B * T, (counts, m)
    # CPU SDPA runs as bmm over the full T x T square (the causal mask is applied, not skipped): 2 FLOPs per
    # multiply-add, H x (qk + v) per query-key pair; flops.py counts the (T+1)/2 keys a causal query sees.
    n_attn = a.n_layers + a.n_mtp_modules
    full = 2 * a.n_heads * (a.qk_head_dim + a.v_head_dim) * T * T * B * n_attn
    assert counts[torch.ops.aten.bmm] == full
    assert attention_flops_per_token(a, T) * B * T * n_attn == full * (T + 1) / (2 * T)


def test_671b_flops_per_token():
    """DeepSeek-V3 at 4K: 6 x 36.62B matmul + causal attention + MTP = 260.6 GFLOP per token."""
    a = load_preset("671b")
    T = 4096
    m = matmul_params(a)
    assert abs(m["main"] / 36.62e9 - 1) < 1e-3, m  # the report's "37B activated" less embedding and norms
    attn = 3 * a.n_heads * (a.qk_head_dim + a.v_head_dim) * (T + 1)  # fwd (T+1)/2 keys x 2 x 2 x H x 320, x 3
    assert attention_flops_per_token(a, T) * 3 == attn
    mtp = 6 * m["mtp"] + attn  # eh_proj + one MoE block + the head call, and the block's attention
    assert train_flops_per_token(a, T) == pytest.approx(6 * m["main"] + a.n_layers * attn + mtp)
    total = train_flops_per_token(a, T)
    assert total == pytest.approx(260.65e9, rel=1e-3), total
    assert train_flops_per_token(a, T, include_mtp=False) == pytest.approx(250.46e9, rel=1e-3)
    # The report's 180K H800 GPU-hours per 1T tokens (TR Table 1) is 402 TFLOP/s per GPU on this count:
    # 41% of the dense BF16 peak (989.4), 20% of the FP8 peak (1978.9).
    per_gpu = total * 1e12 / (180e3 * 3600)
    assert per_gpu == pytest.approx(402e12, rel=2e-3)
    assert per_gpu / 989.4e12 == pytest.approx(0.407, abs=1e-3)
