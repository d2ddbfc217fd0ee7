"""ModelArgs: every number that shapes a DeepSeek-V3 model, in one frozen dataclass.

Field names follow DeepSeek-V3's `inference/model.py` and the technical report (TR, arXiv 2412.19437).
The presets live as YAML in `conf/model/` (the single source of their values); `load_preset(name)`
reads one into a ModelArgs for code that runs without hydra (tests, `moeforge plan`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from importlib import resources


@dataclass(frozen=True)
class ModelArgs:
    name: str = "tiny"
    vocab_size: int = 257
    dim: int = 128
    inter_dim: int = 384  # dense FFN hidden size (first n_dense_layers layers)
    n_layers: int = 4  # main-model transformer blocks (MTP blocks are extra)
    n_dense_layers: int = 1
    n_heads: int = 4
    max_seq_len: int = 256
    # mla (TR §2.1.1)
    q_lora_rank: int = 64  # 0: no query compression (V2-Lite/16b)
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    # moe (TR §2.1.2)
    moe_inter_dim: int = 64
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    n_activated_experts: int = 2
    n_expert_groups: int = 4
    n_limited_groups: int = 2
    route_scale: float = 2.5
    score_func: str = "sigmoid"  # "sigmoid" (V3) | "softmax" (V2)
    bias_update_speed: float = 0.001  # gamma of the aux-loss-free balancing
    seq_aux_loss_alpha: float = 1e-4  # alpha of the sequence-wise balance loss
    # mtp (TR §2.2)
    n_mtp_modules: int = 1
    mtp_loss_weight: float = 0.3  # lambda
    # rope / yarn (TR §4.3)
    rope_theta: float = 10000.0
    original_seq_len: int = 4096
    rope_factor: float = 40.0
    beta_fast: int = 32
    beta_slow: int = 1
    mscale: float = 1.0
    # numerics
    norm_eps: float = 1e-6
    init_std: float = 0.006
    dtype: str = "float32"  # parameter/compute dtype: float32 | bfloat16

    def __post_init__(self):
        def need(ok: bool, msg: str):
            if not ok:
                raise ValueError(f"model: {msg}")

        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, int) and not isinstance(v, bool) and f.name not in ("q_lora_rank", "n_mtp_modules", "n_shared_experts", "n_dense_layers"):
                need(v > 0, f"model.{f.name} must be > 0, got {v}")
        need(self.q_lora_rank >= 0, f"model.q_lora_rank must be >= 0, got {self.q_lora_rank}")
        need(self.n_mtp_modules >= 0, f"model.n_mtp_modules must be >= 0, got {self.n_mtp_modules}")
        need(0 <= self.n_dense_layers <= self.n_layers,
             f"model.n_dense_layers={self.n_dense_layers} must be in [0, n_layers={self.n_layers}]")
        need(self.qk_rope_head_dim % 2 == 0, f"model.qk_rope_head_dim={self.qk_rope_head_dim} must be even")
        need(self.n_routed_experts % self.n_expert_groups == 0,
             f"model.n_routed_experts={self.n_routed_experts} must be divisible by n_expert_groups={self.n_expert_groups}")
        need(1 <= self.n_limited_groups <= self.n_expert_groups,
             f"model.n_limited_groups={self.n_limited_groups} must be in [1, n_expert_groups={self.n_expert_groups}]")
        per_group = self.n_routed_experts // self.n_expert_groups
        need(self.n_activated_experts <= self.n_limited_groups * per_group,
             f"model.n_activated_experts={self.n_activated_experts} > n_limited_groups*experts_per_group="
             f"{self.n_limited_groups * per_group}")
        need(self.score_func in ("sigmoid", "softmax"), f"model.score_func={self.score_func!r} not in sigmoid|softmax")
        need(self.dtype in ("float32", "bfloat16"), f"model.dtype={self.dtype!r} not in float32|bfloat16")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def n_moe_layers(self) -> int:
        return self.n_layers - self.n_dense_layers

    def is_moe_layer(self, layer_id: int) -> bool:
        """Layer ids count main blocks 0..n_layers-1, then MTP blocks n_layers..; all MTP blocks are MoE."""
        return layer_id >= self.n_dense_layers

    @property
    def softmax_scale(self) -> float:
        scale = self.qk_head_dim ** -0.5
        if self.max_seq_len > self.original_seq_len:  # YaRN attention temperature (mscale^2)
            m = 0.1 * self.mscale * math.log(self.rope_factor) + 1.0
            scale = scale * m * m
        return scale


def preset_names() -> list[str]:
    root = resources.files("moeforge.conf") / "model"
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def load_preset(name: str, **overrides) -> ModelArgs:
    """Read conf/model/<name>.yaml into a ModelArgs (no hydra needed)."""
    import yaml  # PyYAML comes with hydra-core/omegaconf

    path = resources.files("moeforge.conf") / "model" / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"model={name!r}: no preset; choose one of {preset_names()}")
    values = yaml.safe_load(path.read_text())
    values.update(overrides)
    return ModelArgs(**values)
