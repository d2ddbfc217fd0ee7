"""Multi-head Latent Attention (TR §2.1.1) with decoupled RoPE and YaRN frequencies.

Queries and keys/values go through low-rank bottlenecks (q_lora_rank, kv_lora_rank), each followed
by an RMSNorm. The RoPE part of the key (qk_rope_head_dim) is computed once from x and shared by all
heads; the RoPE part of each query head comes from the compressed query. This is the training
("naive", non-absorbed) form: the up-projections are applied, then ordinary causal attention runs.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .args import ModelArgs
from .recompute import maybe_region


# The RMSNorms after the low-rank compressions of q and kv use eps 1e-6 whatever model.norm_eps says, as
# DeepSeek's inference/model.py and Hugging Face's DeepseekV3 do (norm_eps is the blocks' and the head's).
LATENT_NORM_EPS = 1e-6


class RMSNorm(nn.Module):
    recompute = "none"  # model/recompute.py: "selective" recomputes the output (and its FP32 copy) in backward

    def __init__(self, dim: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return maybe_region(self.recompute == "selective", self._norm, x)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 whatever the parameter dtype, as DeepSeek-V3 does.
        return F.rms_norm(x.float(), (x.size(-1),), self.weight.float(), self.eps).type_as(x)

    def reset_parameters(self):
        nn.init.ones_(self.weight)


def yarn_freqs(args: ModelArgs, device=None) -> torch.Tensor:
    """Rotary angles [max_seq_len, rope_dim/2] (fp32), YaRN-corrected when max_seq_len > original_seq_len."""
    dim, base = args.qk_rope_head_dim, args.rope_theta
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim))
    if args.max_seq_len > args.original_seq_len:
        def correction_dim(num_rotations: float) -> float:
            return dim * math.log(args.original_seq_len / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

        low = max(math.floor(correction_dim(args.beta_fast)), 0)
        high = min(math.ceil(correction_dim(args.beta_slow)), dim - 1)
        ramp = (torch.arange(dim // 2, dtype=torch.float64, device=device) - low) / max(high - low, 1e-3)
        smooth = 1.0 - ramp.clamp(0, 1)
        freqs = freqs / args.rope_factor * (1 - smooth) + freqs * smooth
    t = torch.arange(args.max_seq_len, dtype=torch.float64, device=device)
    return torch.outer(t, freqs).float()


def apply_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, R] with interleaved pairs (DeepSeek's complex layout); angles [T, R/2]."""
    dtype = x.dtype
    x = x.float().unflatten(-1, (-1, 2))  # [B, T, H, R/2, 2]
    cos, sin = angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]
    x0, x1 = x[..., 0], x[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).to(dtype)


class MLA(nn.Module):
    # model/recompute.py: "selective" recomputes the up-projections (q_norm, wq_b; kv_norm, wkv_b) and the
    # rope/cat that make q, k, v from them in backward, from the compressed latents (TR §3.2.3)
    recompute = "none"

    def __init__(self, args: ModelArgs, device=None, dtype=None):
        super().__init__()
        kw = dict(bias=False, device=device, dtype=dtype)
        self.n_heads = args.n_heads
        self.q_lora_rank = args.q_lora_rank
        self.kv_lora_rank = args.kv_lora_rank
        self.qk_nope_head_dim = args.qk_nope_head_dim
        self.qk_rope_head_dim = args.qk_rope_head_dim
        self.qk_head_dim = args.qk_head_dim
        self.v_head_dim = args.v_head_dim
        self.softmax_scale = args.softmax_scale
        if self.q_lora_rank == 0:
            self.wq = nn.Linear(args.dim, self.n_heads * self.qk_head_dim, **kw)
        else:
            self.wq_a = nn.Linear(args.dim, self.q_lora_rank, **kw)
            self.q_norm = RMSNorm(self.q_lora_rank, LATENT_NORM_EPS, device, dtype)
            self.wq_b = nn.Linear(self.q_lora_rank, self.n_heads * self.qk_head_dim, **kw)
        self.wkv_a = nn.Linear(args.dim, self.kv_lora_rank + self.qk_rope_head_dim, **kw)
        self.kv_norm = RMSNorm(self.kv_lora_rank, LATENT_NORM_EPS, device, dtype)
        self.wkv_b = nn.Linear(self.kv_lora_rank, self.n_heads * (self.qk_nope_head_dim + self.v_head_dim), **kw)
        self.wo = nn.Linear(self.n_heads * self.v_head_dim, args.dim, **kw)

    def forward(self, x_BTD: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        H = self.n_heads
        up = self.recompute == "selective"
        if self.q_lora_rank == 0:
            q = self.q_rope(self.wq(x_BTD), angles[:T])
        else:
            q = maybe_region(up, self.q_up, self.wq_a(x_BTD), angles[:T])  # c_q [B, T, q_lora] kept
        k, v = maybe_region(up, self.kv_up, self.wkv_a(x_BTD), angles[:T])  # [c_kv; k_pe] kept
        # Attention core stays in high precision: softmax(q k^T * scale) v, causal.
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=self.softmax_scale
        )  # [B, H, T, v_head_dim]
        return self.wo(o.transpose(1, 2).reshape(B, T, H * self.v_head_dim))

    def q_up(self, c_q: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
        """Compressed query [B, T, q_lora] -> q [B, T, H, qk_head_dim] (up-projection, rope on its rope part)."""
        return self.q_rope(self.wq_b(self.q_norm(c_q)), angles)

    def q_rope(self, q: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
        B, T, _ = q.shape
        q = q.view(B, T, self.n_heads, self.qk_head_dim)
        q_nope, q_pe = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        return torch.cat([q_nope, apply_rope(q_pe, angles)], dim=-1)

    def kv_up(self, kv: torch.Tensor, angles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """wkv_a's output [B, T, kv_lora + R] -> k [B, T, H, qk_head_dim], v [B, T, H, v_head_dim]."""
        B, T, _ = kv.shape
        H = self.n_heads
        kv, k_pe = kv.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        k_pe = apply_rope(k_pe.unsqueeze(2), angles)  # [B, T, 1, R]: one rope key shared by all heads
        kv = self.wkv_b(self.kv_norm(kv)).view(B, T, H, self.qk_nope_head_dim + self.v_head_dim)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        k = torch.cat([k_nope, k_pe.expand(-1, -1, H, -1)], dim=-1)
        return k, v
