"""Validation loss and the greedy sample, through whichever step engine the layout uses (train/engine.py).

Both are collective: with EP every forward needs every rank's all-to-all, with a pipeline every stage.
"""
from __future__ import annotations

import torch

from moeforge.parallel.mesh import Meshes

from .data import EOT, TokenSampler, decode, encode
from .engine import StepEngine
from .reduce import sum_over_dp_pp


@torch.no_grad()
def evaluate(engine: StepEngine, data: TokenSampler, n_batches: int, micro_batch_size: int, device: torch.device,
             meshes: Meshes | None) -> float:
    """Mean main LM loss over n_batches global validation batches (each rank its dp slice), in micro-batches."""
    engine.model.eval()
    total, count = 0.0, 0
    for i in range(n_batches):
        micro_batches = list(data.batch(i).to(device).split(micro_batch_size))
        for loss in engine.eval_losses(micro_batches):
            total += loss
        count += len(micro_batches)
    engine.model.train()
    (total,) = sum_over_dp_pp([total], meshes)
    return total / (count * (meshes.dims.dp if meshes is not None else 1))


@torch.no_grad()
def greedy_sample(engine: StepEngine, prompt: str, n_tokens: int) -> str:
    """prompt + up to n_tokens argmax tokens (stops at end-of-text); the model's context window slides."""
    engine.model.eval()
    ids = encode(prompt)
    for _ in range(n_tokens):
        nxt = engine.greedy_next(ids)
        if nxt == EOT:
            break
        ids.append(nxt)
    engine.model.train()
    return decode(ids)
