"""The step engine: one rank's forward and backward over its micro-batches, whatever the layout.

    engine = build_engine(cfg, device, meshes, counters, n_micro)
    sums = engine.forward_backward(micro_batches)  # grads accumulated into .grad; this rank's loss sums
    engine.eval_losses(micro_batches)              # main LM loss of each micro-batch whose loss is here
    engine.greedy_next(ids)                        # the next token of a greedy sample (every rank calls)

LocalEngine runs the whole model (its experts with EP) in this process: each micro-batch's loss
L = CE(main) + λ/D·Σ CE(MTP_k) (model/loss.py), divided by the number of micro-batches, backward.
PipelineEngine hands the micro-batches to dualpipe's PipelineRuntime, whose last stage computes the same
loss piece by piece (model/split.py), and sums the gradients of parameters that several pp ranks hold.
The trainer (train/trainer.py) sees only this interface.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.distributed as dist
from torch import nn

from moeforge.comm.counters import ByteCounters
from moeforge.dualpipe.runtime import PipelineRuntime
from moeforge.dualpipe.schedule import stage_placement
from moeforge.model.loss import lm_losses, total_loss
from moeforge.model.moe import MoE
from moeforge.model.transformer import Transformer
from moeforge.parallel.mesh import Meshes

from .build import build_model

NamedParams = list[tuple[str, nn.Parameter]]


@dataclass(frozen=True)
class LossSums:
    """One step's losses on this rank, summed over the micro-batches whose loss it computed: float64
    scalars on the device (read on the host once per step, after the reductions: train/trainer.py)."""
    lm: torch.Tensor
    mtp: torch.Tensor  # per micro-batch the mean over the MTP depths
    aux: torch.Tensor  # sequence-wise balance loss of this rank's MoE layers


class StepEngine(Protocol):
    model: Transformer  # this rank's part of the model (its stages, its experts)
    named_params: NamedParams  # this rank's trainable parameters, each once
    norm_params: NamedParams | None  # the ones it counts in the global grad norm (None: all of named_params)
    moe_layers: list[MoE]

    def forward_backward(self, micro_batches: list[torch.Tensor], poison: bool = False) -> LossSums:
        """Forward + backward of every micro-batch ([B, T+1+D] token rows); poison: a NaN loss (a test aid)."""

    def eval_losses(self, micro_batches: list[torch.Tensor]) -> list[torch.Tensor]:
        """Main LM loss of each micro-batch whose loss is on this rank, as device scalars."""

    def greedy_next(self, ids: list[int]) -> int: ...

    def wait_s(self) -> float:
        """The last step's time blocked in pipeline receives (bubble + exposed P2P; 0 without a pipeline).
        On CUDA reading it waits for the step's last receive: read it after the step's host read."""

    def reduce_tied_loads(self) -> None:
        """Sum MoE token counts over the ranks that hold the same layers (DualPipe's twin stages)."""


class LocalEngine:
    def __init__(self, model: Transformer, device: torch.device):
        self.model, self.device = model, device
        self.named_params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.norm_params = None
        self.moe_layers = model.moe_layers()
        self.lam = model.args.mtp_loss_weight

    def forward_backward(self, micro_batches: list[torch.Tensor], poison: bool = False) -> LossSums:
        n = len(micro_batches)
        for m in self.moe_layers:
            m.aux_loss_scale = 1.0 / n  # the aux loss's gradient is averaged like the LM loss's
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # lm, mtp mean, aux: no host read
        for rows in micro_batches:
            main, mtp = lm_losses(self.model, rows)
            if poison:
                main = main * float("nan")
            (total_loss(main, mtp, self.lam) / n).backward()
            aux = [m.last_aux_loss for m in self.moe_layers if m.last_aux_loss is not None]
            sums += torch.stack([main.detach().double(),
                                 torch.stack(mtp).detach().double().mean() if mtp else sums.new_zeros(()),
                                 torch.stack(aux).double().sum() if aux else sums.new_zeros(())])
        return LossSums(*sums.unbind())

    def eval_losses(self, micro_batches: list[torch.Tensor]) -> list[torch.Tensor]:
        return [lm_losses(self.model, rows)[0].detach() for rows in micro_batches]

    def greedy_next(self, ids: list[int]) -> int:
        logits, _ = self.model(torch.tensor([ids[-self.model.args.max_seq_len:]], device=self.device))
        return int(logits[0, -1].argmax())

    def reduce_tied_loads(self) -> None:
        pass

    def wait_s(self) -> float:
        return 0.0


class PipelineEngine:
    def __init__(self, model: Transformer, make_runtime: Callable[[int], PipelineRuntime], n_micro: int,
                 pp_group: dist.ProcessGroup, device: torch.device):
        """make_runtime(n): the runtime whose schedule runs n micro-batches; one is built per count a step
        brings (train.batch_ramp changes it) and kept."""
        self.model, self.pp_group, self.device = model, pp_group, device
        self.make_runtime, self.rt = make_runtime, (rt := make_runtime(n_micro))
        self.runtimes = {n_micro: rt}
        self.named_params = [(n, p) for n, p in rt.named_parameters() if p.requires_grad]
        self.norm_params = rt.owned_named_parameters()
        self.moe_layers = model.moe_layers()
        # the rank that holds the last stage picks each greedy token and broadcasts it
        self.sampler = dist.get_global_rank(pp_group, rt.rank_of_stage(rt.n_stages - 1, 0))

    def forward_backward(self, micro_batches: list[torch.Tensor], poison: bool = False) -> LossSums:
        if poison:
            raise ValueError("train.debug_nan_step is not supported with parallel.pp > 1")
        if len(micro_batches) not in self.runtimes:
            self.runtimes[len(micro_batches)] = self.make_runtime(len(micro_batches))
        self.rt = self.runtimes[len(micro_batches)]
        self.rt.step(micro_batches)  # every micro-batch's forward and backward, in the schedule's order
        s = self.rt.stats
        sums = LossSums(s["lm_loss"].double(), s["mtp_loss"].double(), s["aux_loss"].double())
        self.rt.reduce_tied_grads()  # embedding copies / DualPipe's twin stages
        return sums

    def wait_s(self) -> float:
        return self.rt.wait_s

    def eval_losses(self, micro_batches: list[torch.Tensor]) -> list[torch.Tensor]:
        losses = self.rt.forward_only(micro_batches, lambda stage, h, rows: stage.main_loss(h, rows))
        return [x.detach() for x in losses if x is not None]

    def greedy_next(self, ids: list[int]) -> int:
        """One forward of the whole pipe (collective over pp)."""
        args = self.model.args
        pad = [0] * (1 + args.n_mtp_modules)  # rows carry T+1+D tokens; only the first T are read here
        rows = torch.tensor([ids[-args.max_seq_len:] + pad], device=self.device)
        (tok,) = self.rt.forward_only([rows], lambda stage, h, rows: stage.head(stage.norm(h))[0, -1].argmax())
        tok = torch.zeros(1, dtype=torch.int64, device=self.device) if tok is None else tok.reshape(1).to(torch.int64)
        dist.broadcast(tok, src=self.sampler, group=self.pp_group)
        return int(tok)

    def reduce_tied_loads(self) -> None:
        self.rt.reduce_tied_loads()


def build_engine(cfg, device: torch.device, meshes: Meshes | None, counters: ByteCounters,
                 n_micro: int) -> StepEngine:
    """The model built for this rank (train/build.py) inside the engine for its layout."""
    pp = meshes.dims.pp if meshes is not None else 1
    if pp == 1:
        return LocalEngine(build_model(cfg, device, meshes, counters), device)
    sc = cfg.schedule
    model = build_model(cfg, device, meshes, counters, stage_ids=stage_placement(sc.name, pp)[meshes.coords.pp])
    return PipelineEngine(model, lambda n: PipelineRuntime.for_schedule(
        sc.name, model.stages, meshes.pp, n, overlap=sc.overlap, split_middle_pair=sc.split_middle_pair,
        fb_weight_split=sc.fb_weight_split, timeout_s=cfg.parallel.timeout_s), n_micro, meshes.pp, device)
