"""DeepSeek-V3 routing (TR §2.1.2) as one pure function: router logits -> expert ids and gate weights.

    scores    s = sigmoid(logits) (V3; softmax for V2), the raw affinities
    select    s + b: the aux-loss-free bias b only changes which experts are picked, never their weights
    groups    the E experts form n_expert_groups groups; a group scores the sum of its top-2 selection
              scores and only the n_limited_groups best groups stay (node-limited routing: a token
              reaches at most that many groups, so at most that many nodes when groups map to nodes)
    top-k     the n_activated_experts best experts of the kept groups
    weights   their raw scores, normalised over the K (sigmoid only), times route_scale

model.moe.Gate calls it on its linear's logits; `moeforge plan` calls it on random logits to count the
expert-parallel traffic of uniform routing.
"""
from __future__ import annotations

import torch

from .args import ModelArgs


def route(logits_NE: torch.Tensor, bias_E: torch.Tensor, args: ModelArgs):
    """Returns (weights [N, K] fp32, indices [N, K], scores [N, E]) from fp32 logits [N, E]."""
    scores = logits_NE.sigmoid() if args.score_func == "sigmoid" else logits_NE.softmax(dim=-1)
    select = scores + bias_E if args.score_func == "sigmoid" else scores
    if args.n_expert_groups > 1:
        N = select.size(0)
        grouped = select.view(N, args.n_expert_groups, -1)  # [N, G, E/G]
        group_scores = grouped.topk(min(2, grouped.size(-1)), dim=-1).values.sum(dim=-1)  # [N, G]
        keep = group_scores.topk(args.n_limited_groups, dim=-1).indices
        dropped = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, keep, False)
        select = grouped.masked_fill(dropped.unsqueeze(-1), float("-inf")).flatten(1)
    indices = select.topk(args.n_activated_experts, dim=-1).indices
    weights = scores.gather(1, indices)
    if args.score_func == "sigmoid":
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights * args.route_scale, indices, scores
