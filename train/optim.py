"""Learning-rate schedule and optimizer construction."""
from __future__ import annotations

import math
from functools import lru_cache

import torch

from .batches import BatchSchedule
from .config import TrainConfig


@lru_cache(maxsize=8)
def run_samples(cfg: TrainConfig) -> int:
    """Samples the whole run consumes (train.steps steps, with train.batch_ramp's smaller first batches)."""
    return BatchSchedule.of(cfg).consumed_after(cfg.steps)


def lr_at(step: int, consumed: int, cfg: TrainConfig) -> float:
    """Warmup (linear over the first warmup_steps steps) -> constant -> cosine decay to lr*min_lr_ratio, as
    DeepSeek-V3 trains (TR §4.2), where the constant and decay phases are set in tokens.

    `step` counts optimizer steps from 0, `consumed` the samples before it. Past the warmup the schedule
    runs on samples, counted in full batches (u = consumed / global_batch_size): the cosine runs from
    decay_start of the run's samples to its end. Without train.batch_ramp u is the step, so this is the
    step schedule; with it the decay follows the tokens seen, not the ramp's extra, smaller steps.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    u, total = consumed / cfg.global_batch_size, run_samples(cfg) / cfg.global_batch_size
    decay_from = max(int(cfg.decay_start * total), cfg.warmup_steps)
    if u < decay_from or total <= decay_from:
        return cfg.lr
    t = min((u - decay_from) / (total - decay_from), 1.0)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * t))


def no_weight_decay(name: str, p: torch.Tensor) -> bool:
    """Norm weights (1-D), the embedding, and the router are not decayed."""
    return p.ndim < 2 or name.startswith("embed.") or name.endswith("gate.weight")
