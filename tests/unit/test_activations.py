"""train/activations.py: the bytes a module keeps for backward, measured (the planner's activation figures)."""
import torch

from moeforge.model.args import ModelArgs
from moeforge.train.activations import LiveBytes, saved_bytes_per_token


def test_live_bytes_counts_what_autograd_keeps():
    lin = torch.nn.Linear(64, 128)  # made outside: parameters are not activations
    with LiveBytes() as live:
        x = torch.randn(10, 64)
        h = lin(x)  # addmm keeps x (its weight is a parameter)
        y = torch.nn.functional.gelu(h)  # gelu keeps h
        z = y.view(10, 2, 64).sum()  # a view makes no storage; sum keeps nothing
        del x, h
        assert live.live(exclude=(y, z)) == 10 * 64 * 4 + 10 * 128 * 4
        y.mul_(2)  # in place: same storage, not counted twice
        assert live.live(exclude=(y, z)) == 10 * 64 * 4 + 10 * 128 * 4
        del y, z
        assert live.live() == 0  # the graph is gone with its outputs


def test_live_bytes_keeps_a_storage_alive_through_a_saved_view():
    leaf = torch.randn(8, 32, requires_grad=True)  # a leaf is kept by its AccumulateGrad node: made outside
    with LiveBytes() as live:
        a = leaf * 2  # made here
        out = torch.sin(a.view(4, 64)).sum()  # sin keeps the view of a
        del a
        assert live.live(exclude=(out,)) == 8 * 32 * 4


def test_saved_bytes_of_the_tiny_model_per_token_do_not_grow_with_the_sequence():
    args = ModelArgs()  # tiny: 4 layers, 1 dense, MTP 1
    short = saved_bytes_per_token(args, seq_len=64)
    long = saved_bytes_per_token(args, seq_len=128)
    assert set(short) == {"dense", "moe", "mtp", "head"}
    assert all(v > 0 for v in short.values())
    # attention keeps its output and a log-sum-exp per row, never [T, T] scores: per token the same bytes
    for k in ("dense", "moe", "mtp"):
        assert abs(long[k] - short[k]) / short[k] < 0.02, (k, short[k], long[k])
    # the dense block keeps at least its SwiGLU's three [T, inter_dim] tensors and the attention output
    a = args
    assert short["dense"] > 4 * (3 * a.inter_dim + a.n_heads * a.v_head_dim)
    assert short["head"] >= 4 * a.vocab_size  # the logits (and their fp32 log-softmax) are kept


def test_the_gpu_rms_norm_stand_in_has_torch_values_and_gradients():
    from moeforge.train.activations import _FusedRmsNorm

    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: _FusedRmsNorm.apply(a, (16,), b, 1e-6), (x, w))
    torch.testing.assert_close(_FusedRmsNorm.apply(x, (16,), w, 1e-6),
                               torch.nn.functional.rms_norm(x, (16,), w, 1e-6))
    with LiveBytes() as live:
        h = x * 1  # an activation: kept as the norm's input, plus one rstd per row, nothing else
        y = _FusedRmsNorm.apply(h, (16,), w, 1e-6)
        del h
        assert live.live(exclude=(y,)) == x.numel() * 8 + 15 * 8
