"""Is the run healthy? The loss-spike/NaN rule that skips a step, the MoE load statistics, and the
finite-state check that stands between a bad step and a checkpoint.

Skipping a step. The trainer computes the global loss (summed over dp) and the global grad norm
(all-reduced inside clip_grad_norm_) *before* the optimizer step and asks `SpikeGuard.check`. Every
rank holds the same two numbers, so every rank reaches the same verdict without another collective.
A skipped step runs no optimizer step and no bias update, drops its grads and routed-token counts,
and still advances the step counter and the data position (replaying the batch that blew up would
blow up again). The rule:
  - a non-finite loss or grad norm is always skipped;
  - with `train.spike_zscore = z > 0`, a loss more than z standard deviations above the mean of the
    last `train.spike_window` accepted losses is skipped (after `min(10, window)` accepted steps, so
    the steep start of training is never flagged). Only accepted losses enter the window.
  - `train.max_skips_in_row` consecutive skips stop the run: the state or the data is broken.

MoE load. `tokens_per_expert` summed over micro-batches and dp ranks gives a [layer, expert] matrix of
routed token copies. Per layer we report max/mean (1.0 is perfect balance), the largest |bias| of the
aux-loss-free balancer, and tokens dropped = tokens·K − routed copies. This implementation drops
nothing (no capacity factor, as DeepSeek-V3 trains, TR §2.1.2), so a nonzero count means the
counting or the routing is broken.
"""
from __future__ import annotations

import math
from collections import deque

import torch
import torch.distributed as dist

from moeforge.model.moe import MoE


class SpikeGuard:
    def __init__(self, window: int = 100, zscore: float = 0.0, max_in_row: int = 10):
        assert window >= 2 and zscore >= 0 and max_in_row >= 1, f"{window=}, {zscore=}, {max_in_row=}"
        self.window, self.zscore, self.max_in_row = window, zscore, max_in_row
        self.history: deque[float] = deque(maxlen=window)
        self.in_row = 0  # consecutive skipped steps
        self.skipped = 0  # skipped steps in this run

    @classmethod
    def from_config(cls, t) -> "SpikeGuard":
        return cls(t.spike_window, t.spike_zscore, t.max_skips_in_row)

    def check(self, loss: float, grad_norm: float) -> str | None:
        """None to take the step, else why it is skipped. Call once per step, on every rank alike."""
        reason = None
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            reason = f"non-finite loss={loss} or grad_norm={grad_norm}"
        elif self.zscore > 0 and len(self.history) >= min(10, self.window):
            n = len(self.history)
            mean = sum(self.history) / n
            std = math.sqrt(sum((x - mean) ** 2 for x in self.history) / (n - 1))
            z = (loss - mean) / max(std, 1e-8)
            if z > self.zscore:
                reason = f"loss spike: loss={loss:.4f} is {z:.1f} std above the mean {mean:.4f} of the last {n} steps"
        if reason is None:
            self.history.append(loss)
            self.in_row = 0
            return None
        self.skipped += 1
        self.in_row += 1
        if self.in_row >= self.max_in_row:
            raise RuntimeError(f"{self.in_row} steps in a row skipped (train.max_skips_in_row={self.max_in_row}); "
                               f"last: {reason}. Lower the LR or restart from the last checkpoint.")
        return reason

    def state_dict(self) -> dict:
        return {"history": list(self.history), "in_row": self.in_row, "skipped": self.skipped}

    def load_state_dict(self, sd: dict) -> None:
        self.history = deque(sd["history"], maxlen=self.window)
        self.in_row, self.skipped = sd["in_row"], sd["skipped"]


def moe_layer_labels(model: torch.nn.Module) -> list[str]:
    """One label per MoE layer in `model.moe_layers()` order: the block's layer id, "mtp<k>" for MTP."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, MoE):
            parts = name.split(".")  # layers.<id>.ffn | mtp.<k>.block.ffn
            out.append(f"mtp{parts[1]}" if parts[0] == "mtp" else parts[1])
    return out


def model_moe_labels(args) -> list[str]:
    """moe_layer_labels of the whole model, from its args alone (no model built: the 671b one takes ~25 s)."""
    return ([str(i) for i in range(args.n_layers) if args.is_moe_layer(i)]
            + [f"mtp{k}" for k in range(args.n_mtp_modules)])


@torch.no_grad()
def moe_load_stats(loads_LE: torch.Tensor, bias_abs_max: torch.Tensor, expected_per_layer: int) -> dict:
    """Per-step MoE health from the global routed-token counts [layers, experts] and the largest |bias|
    (host tensors: the trainer reads them from the device once per step)."""
    loads = loads_LE.double()
    ratio = loads.max(dim=1).values / loads.mean(dim=1).clamp(min=1e-9)
    dropped = int(round(expected_per_layer * loads.size(0) - float(loads.sum())))
    return {
        "expert_load_max_over_mean": float(ratio.max()) if len(ratio) else 0.0,
        "moe_load_max_over_mean": [round(float(r), 4) for r in ratio],  # one per MoE layer
        "moe_bias_abs_max": float(bias_abs_max),
        "moe_tokens_dropped": dropped,
    }


def _local_nonfinite(model: torch.nn.Module, optimizer) -> str | None:
    """Name of the first non-finite parameter, buffer or optimizer moment on this rank, else None."""
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            return name
    for name, t in optimizer.state_tensors().items():
        if t.numel() and not bool(torch.isfinite(t).all()):
            return f"optimizer {name}"
    return None


def require_finite_state(model: torch.nn.Module, optimizer, step: int, group=None) -> None:
    """Collective over `group` (None: single process): raise on every rank if any rank's model or
    optimizer state holds a NaN/inf, so that no checkpoint is ever written from a non-finite state."""
    bad = _local_nonfinite(model, optimizer)
    flag = torch.tensor([0.0 if bad is None else 1.0])
    if group is not None:
        if dist.get_backend(group) == "nccl":
            flag = flag.cuda()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    if float(flag) > 0:
        where = f"this rank: {bad}" if bad else "another rank"
        raise RuntimeError(f"refusing to checkpoint step {step}: non-finite values in the model/optimizer state "
                           f"({where}); the last whole checkpoint is the one to resume from")
