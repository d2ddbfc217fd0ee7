"""The training loss (TR §2.2): L = CE(main) + λ/D · Σ_k CE(MTP_k), on a window of T+1+D tokens.

    split_window(rows, D)      -> inputs, targets, mtp_inputs[k], mtp_targets[k]
    lm_losses(model, rows)     -> (main, [mtp_k])   the whole Transformer, one process
    total_loss(main, mtp, λ)   -> L

A pipeline's last stage (model.split.StageModule) computes the same terms piece by piece with
`cross_entropy` and `total_loss`, so that both paths give the same bits.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .transformer import Transformer


def split_window(batch_BW: torch.Tensor, n_mtp: int):
    """[B, T+1+D] -> inputs [B, T], targets [B, T], mtp_inputs[k] = t_{1+k..T+k}, mtp_targets[k]."""
    T = batch_BW.size(1) - 1 - n_mtp
    inputs, targets = batch_BW[:, :T], batch_BW[:, 1:T + 1]
    mtp_inputs = [batch_BW[:, k:T + k] for k in range(1, n_mtp + 1)]
    mtp_targets = [batch_BW[:, k + 1:T + k + 1] for k in range(1, n_mtp + 1)]
    return inputs, targets, mtp_inputs, mtp_targets


def cross_entropy(logits_BTV: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
    """Mean token CE, computed in fp32 whatever the model dtype."""
    V = logits_BTV.size(-1)
    return F.cross_entropy(logits_BTV.float().view(-1, V), targets_BT.reshape(-1))


def lm_losses(model: Transformer, rows: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(main LM loss, [MTP loss per depth]) for a [B, T+1+D] block of tokens."""
    inputs, targets, mtp_inputs, mtp_targets = split_window(rows, model.args.n_mtp_modules)
    logits, mtp_logits = model(inputs, mtp_inputs)
    return cross_entropy(logits, targets), [cross_entropy(lg, tg) for lg, tg in zip(mtp_logits, mtp_targets)]


def total_loss(main: torch.Tensor, mtp: list[torch.Tensor], lam: float) -> torch.Tensor:
    """main + λ/D · Σ mtp (λ: ModelArgs.mtp_loss_weight); main alone when D = 0."""
    return main + (lam / len(mtp)) * sum(mtp) if mtp else main
