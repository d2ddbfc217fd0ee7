"""The DeepSeek-V3 transformer: embedding, blocks (MLA + dense FFN or MoE), final norm, output head,
and D multi-token-prediction modules (TR §2.2) that share the embedding and the head.

Build on the meta device, apply parallelism/FP8 by functions, then `to_empty(device=...)` and
`init_weights()` (torchtitan's order). Blocks sit in a ModuleDict keyed by their global layer id so
that a pipeline stage keeps the same state_dict keys as the whole model.
"""
from __future__ import annotations

import zlib

import torch
from torch import nn

from .args import ModelArgs
from .mla import MLA, RMSNorm, yarn_freqs
from .moe import MLP, MoE
from .recompute import region, scope

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class Block(nn.Module):
    recompute = "none"  # model/recompute.py: selective (norms, MLA up-projections) | full (the whole block)

    def __init__(self, layer_id: int, args: ModelArgs, device=None, dtype=None):
        super().__init__()
        self.layer_id = layer_id
        self.attn_norm = RMSNorm(args.dim, args.norm_eps, device, dtype)
        self.attn = MLA(args, device, dtype)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps, device, dtype)
        self.ffn = MoE(args, device, dtype) if args.is_moe_layer(layer_id) else MLP(args.dim, args.inter_dim, device, dtype)

    def forward(self, x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
        if self.recompute == "full":  # activation checkpointing: only x is kept, the rest recomputed
            return region(self._forward, x, angles, register_outputs=False)
        with scope(self.recompute == "selective"):
            return self._forward(x, angles)

    def _forward(self, x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
        h = self.attention(x, angles)
        return h + self.ffn(self.ffn_norm(h))

    def attention(self, x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
        """The first residual half (dualpipe.stage runs the MoE half in its own pieces)."""
        return x + self.attn(self.attn_norm(x), angles)


class MTPModule(nn.Module):
    """Depth-k MTP: h'_i = Block(W [RMSNorm(h^{k-1}_i); RMSNorm(Emb(t_{i+k}))]); logits from the shared head."""

    recompute = "none"  # model/recompute.py: selective recomputes [hnorm(h); enorm(e)] in backward

    def __init__(self, layer_id: int, args: ModelArgs, device=None, dtype=None):
        super().__init__()
        self.hnorm = RMSNorm(args.dim, args.norm_eps, device, dtype)
        self.enorm = RMSNorm(args.dim, args.norm_eps, device, dtype)
        self.eh_proj = nn.Linear(2 * args.dim, args.dim, bias=False, device=device, dtype=dtype)
        self.block = Block(layer_id, args, device, dtype)
        self.norm = RMSNorm(args.dim, args.norm_eps, device, dtype)

    def forward(self, h_prev: torch.Tensor, emb_next: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
        return self.block(self.project(h_prev, emb_next), angles)

    def project(self, h_prev: torch.Tensor, emb_next: torch.Tensor) -> torch.Tensor:
        """The block's input: W [RMSNorm(h^{k-1}_i); RMSNorm(Emb(t_{i+k}))]."""
        if self.recompute != "selective":
            return self.eh_proj(self._normed(h_prev, emb_next))
        with scope():  # the concatenated norms (what eh_proj saves) are recomputed from h and the embedding
            return self.eh_proj(region(self._normed, h_prev, emb_next))

    def _normed(self, h_prev: torch.Tensor, emb_next: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.hnorm(h_prev), self.enorm(emb_next)], dim=-1)


class Transformer(nn.Module):
    recompute = "none"

    def __init__(self, args: ModelArgs, device: torch.device | str | None = None):
        super().__init__()
        self.args = args
        dtype = DTYPES[args.dtype]
        self.embed = nn.Embedding(args.vocab_size, args.dim, device=device, dtype=dtype)
        self.layers = nn.ModuleDict({str(i): Block(i, args, device, dtype) for i in range(args.n_layers)})
        self.norm = RMSNorm(args.dim, args.norm_eps, device, dtype)
        self.head = nn.Linear(args.dim, args.vocab_size, bias=False, device=device, dtype=dtype)
        self.mtp = nn.ModuleDict(
            {str(k): MTPModule(args.n_layers + k, args, device, dtype) for k in range(args.n_mtp_modules)}
        )
        self.register_buffer("angles", yarn_freqs(args, device=device), persistent=False)

    def forward(self, tokens_BT: torch.Tensor, mtp_tokens: list[torch.Tensor] | None = None):
        """tokens_BT: inputs t_1..t_T. mtp_tokens[k-1]: t_{1+k}..t_{T+k}, the tokens MTP module k embeds.

        Returns (logits [B, T, V], [mtp logits [B, T, V] for k = 1..D]).
        """
        with scope(self.recompute == "selective"):  # the final norms' outputs, saved by the head
            h = self.embed(tokens_BT)
            for layer in self.layers.values():
                h = layer(h, self.angles)
            logits = self.head(self.norm(h))
            mtp_logits = []
            for k, module in enumerate(self.mtp.values()):
                if mtp_tokens is None:
                    break
                h = module(h, self.embed(mtp_tokens[k]), self.angles)
                mtp_logits.append(self.head(module.norm(h)))
            return logits, mtp_logits

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Normal(0, init_std) for every matrix (DeepSeek-V3 uses 0.006), ones for the norms.

        Each parameter draws from its own generator seeded by (seed, its name), so a pipeline stage or
        an expert-parallel shard holds exactly the values the whole single-process model would. The
        generator is a CPU one whatever the device (the draw is copied over), so a GPU run starts from
        the CPU run's weights: bench/gpu_check.sh compares their losses.
        """
        std = self.args.init_std
        for name, p in self.named_parameters():
            if p.ndim >= 2:
                g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
                p.copy_(torch.empty(p.shape, dtype=p.dtype).normal_(0.0, std, generator=g))
            else:  # RMSNorm weights are the only 1-D parameters (no Linear has a bias)
                p.fill_(1.0)
        for m in self.moe_layers():
            m.gate.bias.zero_()
            m.tokens_per_expert.zero_()
        self.angles.copy_(yarn_freqs(self.args, device=self.angles.device))

    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]


def is_expert_param(name: str) -> bool:
    """The one rule for routed-expert parameters (MoE keeps them in `experts`; `shared_experts` are dense):
    sharded by expert parallelism, their grads reduced and their optimizer state sharded over expert-data
    parallelism, their checkpoint keys written by one edp rank. Works on full model names
    (`layers.3.ffn.experts.5.w1`) and on names relative to an MoE (`experts.5.w1`)."""
    return ".experts." in name or name.startswith("experts.")


def param_counts(model: Transformer) -> dict[str, int]:
    """Parameter counts from the module itself (works on meta).

    total: main model (no MTP), embedding and head included — DeepSeek-V3's "671B".
    activated: parameters that compute for one token: per MoE layer only K of the E routed experts,
      the output head included, the input embedding excluded (a table lookup, not a matmul) — the
      report's "37B" (which is rounded: this count is 36.63B, with the embedding it is 37.55B).
    mtp: the MTP modules' own parameters (they share embedding and head with the main model).
    """
    a = model.args
    main = mtp = routed_main = embed = 0
    for name, p in model.named_parameters():
        n = p.numel()
        if name.startswith("mtp."):
            mtp += n
            continue
        main += n
        if is_expert_param(name):
            routed_main += n
        if name.startswith("embed."):
            embed += n
    inactive = routed_main * (a.n_routed_experts - a.n_activated_experts) // a.n_routed_experts
    return {"total": main, "activated": main - inactive - embed, "mtp": mtp, "embedding": embed}
