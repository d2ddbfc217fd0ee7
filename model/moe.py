"""DeepSeekMoE (TR §2.1.2): shared experts + fine-grained routed experts with a sigmoid gate,
group-limited (node-limited) top-k, auxiliary-loss-free balancing bias and a sequence-wise balance loss.

The routed experts live in a ModuleDict keyed by their *global* expert index, so a state_dict key
names the same expert whatever the expert-parallel layout. How tokens reach the experts is the
dispatcher's business (`LocalDispatcher` here; comm/ supplies the all-to-all one): the model never
imports torch.distributed. Both dispatchers run the experts through `run_experts`, a loop unless a
grouped runner was installed on the ModuleDict (fp8/grouped.py does; the model never imports fp8/).
"""
from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .args import ModelArgs
from .combine import weighted_sum_rows
from .host import even_split, routing_counts
from .recompute import host_read, is_recomputing, maybe_region
from .routing import route


class MLP(nn.Module):
    """SwiGLU feed-forward: w2(silu(w1 x) * w3 x). Used for the dense layers, shared and routed experts."""

    def __init__(self, dim: int, inter_dim: int, device=None, dtype=None):
        super().__init__()
        kw = dict(bias=False, device=device, dtype=dtype)
        self.w1 = nn.Linear(dim, inter_dim, **kw)
        self.w2 = nn.Linear(inter_dim, dim, **kw)
        self.w3 = nn.Linear(dim, inter_dim, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def _to_float(x: torch.Tensor) -> torch.Tensor:
    return x.float()


class Gate(nn.Module):
    """Router: a linear to fp32 logits, then model.routing.route (sigmoid, group-limited top-k, bias)."""

    recompute = "none"  # model/recompute.py: "selective" recomputes the FP32 copy of the input in backward

    def __init__(self, args: ModelArgs, device=None, dtype=None):
        super().__init__()
        self.args = args
        self.weight = nn.Parameter(torch.empty(args.n_routed_experts, args.dim, device=device, dtype=dtype))
        # b_i of the aux-loss-free strategy: a buffer (saved, never touched by the optimizer), kept fp32.
        self.register_buffer("bias", torch.zeros(args.n_routed_experts, device=device, dtype=torch.float32))

    def forward(self, x_ND: torch.Tensor):
        """Returns (weights [N, K] fp32, indices [N, K], scores [N, E] fp32 raw affinities)."""
        x32 = maybe_region(self.recompute == "selective", _to_float, x_ND)  # the normed tokens, FP32
        return route(F.linear(x32, self.weight.float()), self.bias, self.args)


def sequence_balance_loss(scores_BTE: torch.Tensor, indices_BTK: torch.Tensor, alpha: float) -> torch.Tensor:
    """TR eq. 17-20: alpha * sum_i f_i P_i per sequence, averaged over the batch.

    f_i = E/(K T) * #tokens of the sequence routed to i (no gradient); P_i = mean_t of the
    affinities normalised over experts, s'_{i,t} = s_{i,t} / sum_j s_{j,t}.
    """
    B, T, E = scores_BTE.shape
    K = indices_BTK.size(-1)
    counts = torch.zeros(B, E, device=scores_BTE.device, dtype=scores_BTE.dtype)
    counts.scatter_add_(1, indices_BTK.reshape(B, T * K), torch.ones(B, T * K, device=counts.device, dtype=counts.dtype))
    f = counts * (E / (K * T))
    p = (scores_BTE / scores_BTE.sum(dim=-1, keepdim=True)).mean(dim=1)
    return alpha * (f * p).sum(dim=-1).mean()


class AuxLossAutoScaler(torch.autograd.Function):
    """Identity on `output`; backward also sends `scale` as the gradient of `aux_loss`.

    This lets an auxiliary loss train the router without being returned through every pipeline
    stage. `scale` must equal the factor the main loss is multiplied by before backward
    (1 / number of micro-batches), so that aux and main loss are weighted alike.
    """

    @staticmethod
    def forward(ctx, output, aux_loss, scale: float):
        ctx.save_for_backward(aux_loss)
        ctx.scale = scale
        return output

    @staticmethod
    def backward(ctx, grad_output):
        (aux_loss,) = ctx.saved_tensors
        return grad_output, torch.full_like(aux_loss, ctx.scale), None


class Dispatcher(Protocol):
    def __call__(self, x_ND: torch.Tensor, indices_NK: torch.Tensor, weights_NK: torch.Tensor,
                 experts: nn.ModuleDict) -> torch.Tensor: ...


def run_experts(experts: nn.ModuleDict, xs_MD: torch.Tensor, counts: list[int], first: int = 0) -> torch.Tensor:
    """Expert `first + i` (its global id, the ModuleDict key) on its counts[i] consecutive rows of xs_MD,
    the token copies sorted by expert -> ys_MD in the same order. Both dispatchers call this.

    A loop over the experts, unless `experts.run_grouped` is set: a callable (mlps, xs_MD, counts) -> ys_MD
    that runs them all at once (fp8.grouped.apply_grouped_experts installs one GroupedExperts per MoE
    layer: one grouped FP8 GEMM per projection). The model never imports it. With no rows at all, xs_MD
    itself comes back (still linked to autograd, which the all-to-all backward relies on).
    """
    mlps = [experts[str(first + i)] for i in range(len(counts))]
    grouped = getattr(experts, "run_grouped", None)
    if grouped is not None and xs_MD.size(0) > 0:
        return grouped(mlps, xs_MD, counts)
    outs = [mlp(chunk) for mlp, chunk in zip(mlps, xs_MD.split(counts)) if chunk.size(0) > 0]
    return torch.cat(outs) if outs else xs_MD


def expert_counts(indices: torch.Tensor, n_experts: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """[E] how many of `indices` pick each expert. scatter_add_ of ones has a static shape; bincount's
    shape depends on the values (it reads the host for its max on CUDA and cannot run on fake tensors)."""
    flat = indices.reshape(-1)
    return torch.zeros(n_experts, dtype=dtype, device=flat.device).scatter_add_(
        0, flat, torch.ones(flat.shape, dtype=dtype, device=flat.device))


class LocalDispatcher:
    """Every expert lives here: sort token copies by expert, run_experts, weighted scatter-add back.
    One host read per call: the rows per expert (routing_counts; the dry run's stand-in is N·K pairs
    spread evenly over the E experts)."""

    def __call__(self, x_ND, indices_NK, weights_NK, experts):
        N, K = indices_NK.shape
        E = len(experts)
        flat = indices_NK.flatten()
        order = flat.argsort(stable=True)  # token copies grouped by expert
        token_of = order // K
        # a checkpointed block's recompute replays the forward's counts (model/recompute.py): no second read
        counts = host_read(lambda: routing_counts(expert_counts(flat, E), lambda: even_split(N * K, E)))
        xs = x_ND[token_of]  # [N·K, D] sorted by expert
        ys = run_experts(experts, xs, counts)
        return weighted_sum_rows(ys, weights_NK.flatten()[order], token_of, x_ND)


class MoE(nn.Module):
    def __init__(self, args: ModelArgs, device=None, dtype=None, dispatcher: Dispatcher | None = None):
        super().__init__()
        self.n_routed_experts = args.n_routed_experts
        self.aux_alpha = args.seq_aux_loss_alpha
        self.gate = Gate(args, device, dtype)
        self.experts = nn.ModuleDict(
            {str(i): MLP(args.dim, args.moe_inter_dim, device, dtype) for i in range(args.n_routed_experts)}
        )
        self.shared_experts = (
            MLP(args.dim, args.n_shared_experts * args.moe_inter_dim, device, dtype) if args.n_shared_experts else None
        )
        self.dispatcher: Dispatcher = dispatcher or LocalDispatcher()
        # Tokens routed to each expert since the trainer last read it (summed over micro-batches);
        # the aux-loss-free bias update and the load metrics consume it once per optimizer step.
        self.register_buffer("tokens_per_expert", torch.zeros(args.n_routed_experts, device=device), persistent=False)
        self.aux_loss_scale = 1.0  # set by the trainer: 1 / micro-batches per step
        self.last_aux_loss: torch.Tensor | None = None

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        x_ND, weights, indices, aux = self.route_tokens(x_BTD)
        y_ND = self.dispatcher(x_ND, indices, weights, self.experts)
        return self.finish(y_ND, self.shared(x_ND), aux, x_BTD.shape)

    # The steps of forward, also called one by one by dualpipe.stage.block_forward, which runs the
    # dispatcher's all-to-alls asynchronously between them (the shared expert under the combine).
    def route_tokens(self, x_BTD: torch.Tensor):
        """-> (x_ND, weights [N, K], indices [N, K], aux loss or None); counts the routed tokens."""
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(B * T, D)
        weights, indices, scores = self.gate(x_ND)
        again = is_recomputing()  # backward re-running a checkpointed block: counted in its forward already
        if not again:
            with torch.no_grad():
                self.tokens_per_expert += expert_counts(indices, self.n_routed_experts, self.tokens_per_expert.dtype)
        aux = None
        if self.training and self.aux_alpha > 0 and torch.is_grad_enabled():
            aux = sequence_balance_loss(scores.view(B, T, -1), indices.view(B, T, -1), self.aux_alpha)
            if not again:
                self.last_aux_loss = aux.detach()
        return x_ND, weights, indices, aux

    def shared(self, x_ND: torch.Tensor) -> torch.Tensor | None:
        return self.shared_experts(x_ND) if self.shared_experts is not None else None

    def finish(self, y_ND: torch.Tensor, shared_ND: torch.Tensor | None, aux: torch.Tensor | None,
               shape_BTD: torch.Size) -> torch.Tensor:
        """The routed experts' output (back in token order) + the shared expert's, as [B, T, D]; its
        backward also trains the router on the aux loss."""
        if shared_ND is not None:
            y_ND = y_ND + shared_ND
        y = y_ND.view(shape_BTD)
        if aux is not None:
            y = AuxLossAutoScaler.apply(y, aux, self.aux_loss_scale)
        return y


@torch.no_grad()
def update_balance_bias_(bias: torch.Tensor, load: torch.Tensor, gamma: float) -> None:
    """Aux-loss-free balancing (TR §2.1.2): b_i += gamma * sign(mean load - load_i).

    `load` must be the token count per expert summed over every micro-batch and every data-parallel
    rank of the optimizer step, so that all ranks apply the same update.
    """
    bias += gamma * torch.sign(load.float().mean() - load.float())
