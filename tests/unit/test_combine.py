"""model/combine.py: the weighted row sum keeps one [M, D] tensor less, with the two-op form's exact gradients."""
import pytest
import torch

from moeforge.model.combine import weighted_sum_rows
from moeforge.train.activations import LiveBytes


def _reference(ys, w, index, like):
    return torch.zeros_like(like).index_add_(0, index, ys * w.unsqueeze(-1).to(ys.dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_same_bits_forward_and_backward(dtype):
    g = torch.Generator().manual_seed(0)
    N, K, D = 40, 3, 24
    like = torch.zeros(N, D, dtype=dtype)
    index = torch.randint(0, N, (N * K,), generator=g)
    ys0 = torch.randn(N * K, D, generator=g).to(dtype)
    w0 = torch.rand(N * K, generator=g)  # the gate weights stay FP32 whatever the model dtype
    grad = torch.randn(N, D, generator=g).to(dtype)
    outs = []
    for fn in (_reference, weighted_sum_rows):
        ys, w = ys0.clone().requires_grad_(), w0.clone().requires_grad_()
        out = fn(ys, w, index, like)
        out.backward(grad)
        outs.append((out, ys.grad, w.grad))
    for a, b in zip(*outs):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_keeps_one_rows_tensor_less():
    N, K, D = 64, 4, 32
    like = torch.zeros(N, D)
    index = torch.randint(0, N, (N * K,))
    leaf, w = torch.randn(N * K, D, requires_grad=True), torch.rand(N * K, requires_grad=True)
    kept = []
    for fn in (_reference, weighted_sum_rows):
        with LiveBytes() as live:
            ys = leaf * 1
            out = fn(ys, w, index, like)
            del ys
            kept.append(live.live(exclude=(out,)))
    assert kept == [2 * N * K * D * 4, N * K * D * 4]
