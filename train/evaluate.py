"""Validation loss and the greedy sample, through whichever step engine the layout uses (train/engine.py).

Both are collective: with EP every forward needs every rank's all-to-all, with a pipeline every stage.
"""
from __future__ import annotations

import torch

from moeforge.parallel.mesh import Meshes

from .data import SampleStream
from .engine import StepEngine
from .reduce import sum_over_dp_pp_
from .tokenizer import Tokenizer


@torch.no_grad()
def evaluate(engine: StepEngine, data: SampleStream, n_batches: int, global_batch: int, micro_batch_size: int,
             device: torch.device, meshes: Meshes | None) -> float:
    """Mean main LM loss over the first n_batches global batches of validation samples (each rank its dp
    share), in micro-batches."""
    engine.model.eval()
    total, count = torch.zeros(1, dtype=torch.float64, device=device), 0
    for i in range(n_batches):
        micro_batches = list(data.rows(i * global_batch, global_batch).to(device).split(micro_batch_size))
        for loss in engine.eval_losses(micro_batches):
            total += loss.double()
        count += len(micro_batches)
    engine.model.train()
    total = float(sum_over_dp_pp_(total, meshes))  # the one host read
    return total / (count * (meshes.dims.dp if meshes is not None else 1))


@torch.no_grad()
def greedy_sample(engine: StepEngine, tokenizer: Tokenizer, prompt: str, n_tokens: int) -> str:
    """prompt + up to n_tokens argmax tokens (stops at end-of-document); the model's context window slides."""
    engine.model.eval()
    ids = tokenizer.encode(prompt)
    for _ in range(n_tokens):
        nxt = engine.greedy_next(ids)
        if nxt == tokenizer.eod:
            break
        ids.append(nxt)
    engine.model.train()
    return tokenizer.decode(ids)
