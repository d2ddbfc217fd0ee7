"""Parameter and FLOP counts from ModelArgs alone, in one place (no module is built).

`parts(args)` lists every parameter tensor group of the Transformer the way model/transformer.py
builds it: which top-level module owns it (the FQN prefix the pipeline split uses: "embed",
"layers.<i>", "norm", "head", "mtp.<k>"), how many parameters it stores, how many of them one token
multiplies by in the forward pass, and whether it runs as an FP8 GEMM under fp8=blockwise. Everything
else here, and `moeforge plan`, sums that list. tests/unit/test_flops.py checks the sums against
`model.transformer.param_counts` on the meta-device model (tiny, small, 16b; 671b marked slow).

Training FLOPs per token (forward + backward; the usual 6N rule made explicit):
    matmul   6 · Σ matmul params a token goes through: 2 in the forward, 2 for the input gradient,
             2 for the weight gradient. Attention linears, dense FFN, gate (E·dim), K routed experts,
             shared experts, output head; the embedding is a lookup (0). Routed experts count K of E.
    attention core, per layer: causal softmax(q kᵀ) v over seq_len T. Query t sees t keys (1-based),
             so a token averages (T+1)/2 keys; per key 2·H·qk_head_dim (scores) + 2·H·v_head_dim
             (values) forward FLOPs, and backward is twice the forward: 3·H·(qk+v)·(T+1) per token.
    MTP      module k: eh_proj (2·dim·dim), one MoE block (attention core included) and its own call
             of the shared head (dim·V): a separate term, `include_mtp`.
Not counted (they are not matmuls, or not the model's): norms, SwiGLU, softmax, RoPE, the router's
top-k, the loss, and any recomputation a runtime chooses (moeforge plan prices that separately).

DeepSeek-V3 (671b) at T=4096: 36.62B activated matmul params -> 219.7 GFLOP, attention 30.7 GFLOP,
MTP 10.2 GFLOP: 260.6 GFLOP per token with MTP (250.5 without); tests/unit/test_flops.py holds these.
The report's 180K H800 GPU-hours per trillion tokens (TR Table 1: 2664K for 14.8T) is then 402 TFLOP/s
per GPU: 41% of the dense BF16 peak (989 TFLOP/s), 20% of the FP8 peak.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

from .args import ModelArgs


class Part(NamedTuple):
    fqn: str  # the top-level module that owns it: embed | layers.<i> | norm | head | mtp.<k>
    name: str  # attn | norm | dense_mlp | gate | routed | shared | embed | head | eh_proj
    params: int  # parameters stored (0 for the MTP modules' calls of the shared head)
    matmul: int  # parameters one token multiplies by in the forward (routed: K of the E experts)
    fp8: bool  # an nn.Linear that fp8=blockwise turns into an FP8 GEMM (not the head, gate, embedding)

    @property
    def is_expert(self) -> bool:
        return self.name == "routed"  # sharded over ep; model.transformer.is_expert_param


def _attention(args: ModelArgs) -> tuple[int, int]:
    """(Linear params, norm params) of one MLA (model/mla.py)."""
    a, H = args, args.n_heads
    if a.q_lora_rank == 0:
        q, q_norm = a.dim * H * a.qk_head_dim, 0
    else:
        q, q_norm = a.dim * a.q_lora_rank + a.q_lora_rank * H * a.qk_head_dim, a.q_lora_rank
    kv = a.dim * (a.kv_lora_rank + a.qk_rope_head_dim) + a.kv_lora_rank * H * (a.qk_nope_head_dim + a.v_head_dim)
    return q + kv + H * a.v_head_dim * a.dim, q_norm + a.kv_lora_rank


def _block(args: ModelArgs, layer_id: int, fqn: str) -> list[Part]:
    """model.transformer.Block(layer_id): attn_norm, MLA, ffn_norm, dense MLP or MoE."""
    a = args
    attn, attn_norms = _attention(a)
    out = [Part(fqn, "attn", attn, attn, True), Part(fqn, "norm", 2 * a.dim + attn_norms, 0, False)]
    if not a.is_moe_layer(layer_id):
        mlp = 3 * a.dim * a.inter_dim
        return out + [Part(fqn, "dense_mlp", mlp, mlp, True)]
    expert = 3 * a.dim * a.moe_inter_dim
    shared = 3 * a.dim * a.n_shared_experts * a.moe_inter_dim
    return out + [
        Part(fqn, "gate", a.n_routed_experts * a.dim, a.n_routed_experts * a.dim, False),
        Part(fqn, "routed", a.n_routed_experts * expert, a.n_activated_experts * expert, True),
        Part(fqn, "shared", shared, shared, True),
    ]


@functools.lru_cache(maxsize=16)
def parts(args: ModelArgs) -> tuple[Part, ...]:
    """Every parameter group of Transformer(args), in model order, plus the MTP modules' head calls."""
    a = args
    out = [Part("embed", "embed", a.vocab_size * a.dim, 0, False)]
    for i in range(a.n_layers):
        out += _block(a, i, f"layers.{i}")
    head = a.dim * a.vocab_size
    out += [Part("norm", "norm", a.dim, 0, False), Part("head", "head", head, head, False)]
    for k in range(a.n_mtp_modules):
        fqn = f"mtp.{k}"
        out += [Part(fqn, "norm", 3 * a.dim, 0, False),  # hnorm, enorm, norm
                Part(fqn, "eh_proj", 2 * a.dim * a.dim, 2 * a.dim * a.dim, True)]
        out += _block(a, a.n_layers + k, fqn)
        out.append(Part(fqn, "head", 0, a.dim * a.vocab_size, False))  # the shared head, called again
    return tuple(out)


def count_params(args: ModelArgs) -> dict[str, int]:
    """The keys and meaning of model.transformer.param_counts (total, activated, mtp, embedding), from args."""
    a = args
    main = [p for p in parts(a) if not p.fqn.startswith("mtp.")]
    total = sum(p.params for p in main)
    routed = sum(p.params for p in main if p.is_expert)
    inactive = routed * (a.n_routed_experts - a.n_activated_experts) // a.n_routed_experts
    embedding = a.vocab_size * a.dim
    mtp = sum(p.params for p in parts(a) if p.fqn.startswith("mtp."))
    return {"total": total, "activated": total - inactive - embedding, "mtp": mtp, "embedding": embedding}


def matmul_params(args: ModelArgs) -> dict[str, int]:
    """Matmul parameters one token goes through in the forward, by kind (main model: attn, dense_mlp,
    gate, routed, shared, head), their sum `main`, and `mtp` (all D modules, their head calls included)."""
    out = {k: 0 for k in ("attn", "dense_mlp", "gate", "routed", "shared", "head")}
    mtp = 0
    for p in parts(args):
        if p.fqn.startswith("mtp."):
            mtp += p.matmul
        elif p.matmul:
            out[p.name] += p.matmul
    out["main"] = sum(out.values())
    out["mtp"] = mtp
    return out


def attention_flops_per_token(args: ModelArgs, seq_len: int) -> float:
    """Forward FLOPs of one layer's causal attention core per token: H·(qk+v)·(T+1) (see the docstring)."""
    return args.n_heads * (args.qk_head_dim + args.v_head_dim) * (seq_len + 1)


def train_flops_per_token(args: ModelArgs, seq_len: int, include_mtp: bool = True) -> float:
    """Forward + backward FLOPs per trained token: 6·matmul params + 3·attention core forward, per layer."""
    m = matmul_params(args)
    n_mtp = args.n_mtp_modules if include_mtp else 0
    matmul = m["main"] + (m["mtp"] if include_mtp else 0)
    return 6.0 * matmul + 3.0 * attention_flops_per_token(args, seq_len) * (args.n_layers + n_mtp)
