"""Aux-loss-free load balancing (TR §2.1.2), the trainer's side: each step's routed-token counts of
this rank's MoE layers, made global, drive the bias update b_i += gamma * sign(mean - load_i) (model/moe.py),
and are kept as the [MoE layer, expert] matrix the metrics report.

Counts are summed over micro-batches inside each MoE layer (`tokens_per_expert`), over DualPipe's twin
stages (each ran half the micro-batches) and over dp; every dp rank then applies the same update. With a
pipeline each pp rank holds only its stages' layers: the reported matrix and the largest |bias| are
gathered over pp (train/reduce.py).
"""
from __future__ import annotations

from typing import Callable

import torch

from moeforge.model.moe import MoE, update_balance_bias_
from moeforge.parallel.grad_sync import all_reduce_sum_
from moeforge.parallel.mesh import Meshes

from .health import moe_load_stats
from .reduce import max_over_pp_


class MoeBalance:
    def __init__(self, layers: list[MoE], labels: list[str], all_labels: list[str], gamma: float, n_experts: int,
                 meshes: Meshes | None, reduce_tied_loads: Callable[[], None]):
        """layers: this rank's MoE layers, `labels` theirs (health.moe_layer_labels); all_labels: every
        MoE layer of the model; reduce_tied_loads: the engine's sum over DualPipe's twin stages."""
        self.layers, self.all_labels, self.gamma, self.meshes = layers, all_labels, gamma, meshes
        self.rows = [all_labels.index(label) for label in labels]  # this rank's layers in the whole matrix
        self.n_experts = n_experts
        self.device = layers[0].gate.bias.device if layers else torch.device("cpu")
        self.row_index = torch.tensor(self.rows, dtype=torch.int64).to(self.device)  # made once, not per step
        self.reduce_tied_loads = reduce_tied_loads
        self.load: torch.Tensor | None = None  # [MoE layer, expert] routed tokens of the last applied step

    def start_step(self) -> None:
        """Count this step's routed tokens only (evaluation and sampling route tokens too)."""
        for m in self.layers:
            m.tokens_per_expert.zero_()

    @torch.no_grad()
    def update_bias(self) -> torch.Tensor:
        """Apply the bias update from this step's global loads; keep (and return) the loads of every MoE
        layer of the model as a [layer, expert] float64 tensor on the device. Collective over dp (and pp)."""
        loads = [m.tokens_per_expert for m in self.layers]
        self.reduce_tied_loads()
        if self.meshes is not None and loads:
            all_reduce_sum_(loads, self.meshes, "dp")
        for m, load in zip(self.layers, loads):
            update_balance_bias_(m.gate.bias, load, self.gamma)
        full = torch.zeros(len(self.all_labels), self.n_experts, dtype=torch.float64, device=self.device)
        if loads:
            full.index_copy_(0, self.row_index, torch.stack(loads).double())
        for load in loads:
            load.zero_()
        self.load = max_over_pp_(full, self.meshes)
        return self.load

    def bias_abs_max(self) -> torch.Tensor:
        """The largest |b_i| over the model's MoE layers, a float64 scalar on the device (collective over pp)."""
        v = torch.zeros(1, dtype=torch.float64, device=self.device)
        if self.layers:
            v = torch.stack([m.gate.bias.abs().max() for m in self.layers]).max().double().view(1)
        return max_over_pp_(v, self.meshes)

    def stats(self, routed_copies_per_layer: int) -> dict:
        """The record's MoE fields for the last applied step (health.moe_load_stats); one host read, which
        also leaves `load` on the host for the metrics."""
        host = torch.cat([self.load.flatten(), self.bias_abs_max()]).cpu()
        self.load = host[:-1].view_as(self.load)
        return moe_load_stats(self.load, host[-1], routed_copies_per_layer)
