"""The last step of routed experts: out[index[m]] += weight[m] * ys[m], keeping only what backward needs.

Both dispatchers end with it (model/moe.py LocalDispatcher on all tokens, comm/all_to_all.py on the rows an
expert-parallel rank received). Written as `zeros.index_add_(0, index, ys * w)` autograd keeps two [M, D]
tensors per MoE layer: ys for the gate weights' gradient, and the weighted product, which index_add's backward
saves although it needs only its shape. `weighted_sum_rows` keeps ys, the weights and the index, the same
ops in the same order in backward, so the gradients are bitwise those of the two-op form (tested), at one
[M, D] tensor less: 114 KB per token per MoE layer at DeepSeek-V3's shapes (K = 8, D = 7168, BF16).
"""
from __future__ import annotations

import torch


class _WeightedSumRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ys_MD, w_M, index_M, like_ND):
        w = w_M.unsqueeze(-1).to(ys_MD.dtype)
        out = torch.zeros_like(like_ND).index_add_(0, index_M, ys_MD * w)
        ctx.save_for_backward(ys_MD, w_M, index_M)
        return out

    @staticmethod
    def backward(ctx, g_ND):
        ys, w_M, index = ctx.saved_tensors
        g_MD = g_ND.index_select(0, index)  # index_add_'s source gradient
        d_ys = d_w = None
        if ctx.needs_input_grad[0]:  # mul's: grad * other, for each operand
            d_ys = g_MD * w_M.unsqueeze(-1).to(ys.dtype)
        if ctx.needs_input_grad[1]:  # the broadcast weight [M, 1] sums its gradient over D, then casts back
            d_w = (g_MD * ys).sum(-1, keepdim=True).to(w_M.dtype).squeeze(-1)
        return d_ys, d_w, None, None


def weighted_sum_rows(ys_MD: torch.Tensor, w_M: torch.Tensor, index_M: torch.Tensor,
                      like_ND: torch.Tensor) -> torch.Tensor:
    """[N, D] (like_ND's shape, dtype, device): row index_M[m] gets w_M[m] * ys_MD[m], summed."""
    return _WeightedSumRows.apply(ys_MD, w_M, index_M, like_ND)
