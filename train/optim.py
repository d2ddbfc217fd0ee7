"""Learning-rate schedule and optimizer construction."""
from __future__ import annotations

import math

import torch

from .config import TrainConfig


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Warmup (linear) -> constant -> cosine decay to lr*min_lr_ratio, as DeepSeek-V3 trains (TR §4.2).

    `step` counts optimizer steps from 0; the cosine runs from decay_start*steps to steps.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay_from = max(int(cfg.decay_start * cfg.steps), cfg.warmup_steps)
    if step < decay_from or cfg.steps <= decay_from:
        return cfg.lr
    t = min((step - decay_from) / (cfg.steps - decay_from), 1.0)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * t))


def no_weight_decay(name: str, p: torch.Tensor) -> bool:
    """Norm weights (1-D), the embedding, and the router are not decayed."""
    return p.ndim < 2 or name.startswith("embed.") or name.endswith("gate.weight")
