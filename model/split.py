"""Pipeline split (pure): which modules of the Transformer each pipeline stage holds, and the stage module.

    stage_layers(args, n_stages)            -> [[fqn, ...] per stage]   e.g. ["embed", "layers.0", "layers.1"]
    build_stage(model, stage_id, n_stages)  -> StageModule              prunes `model` to that stage
    build_stages(model, stage_ids, n)       -> {stage_id: StageModule}  one rank, several stages (DualPipe)

Placement. Stage 0 holds the embedding; the last stage holds the final norm, the output head and the
MTP modules. MTP module k embeds t_{i+k} with the *shared* embedding, so the last stage holds the
embedding too. Where the first and last stage live on one rank (DualPipeV: rank 0 holds stages 0 and
2pp-1; DualPipe: rank 0 holds stages 0 and pp-1), `build_stages` gives both stages the same
nn.Embedding, so its gradient accumulates in one tensor. Where they live on different ranks (1F1B,
ZB1P with pp > 1; DualPipe's twin ranks), the copies start equal (init_weights seeds every parameter
by its name) and `dualpipe.runtime.PipelineRuntime.reduce_tied_grads` sums their gradients, as
Megatron does for tied embeddings.

Balance rule. Cost units: the embedding 1, each transformer block 1, the final norm + head 1, each MTP
module 1 (it is a block plus a projection; its head call is not counted again). Stage 0 starts with
the embedding's unit, the last stage with head + MTP; the blocks are then handed out one at a time to
the stage with the fewest units (ties: the lower stage) and laid out in layer order. DeepSeek-V3
(61 layers, MTP 1, 16 stages) gives 3, 4 x 14, 2 blocks: 4 units on every stage.

The stage keeps the state_dict keys of the whole model (`layers.7.attn.wq_a.weight`, `embed.weight`),
so checkpoints stay layout-free. Prune on the meta device, before materialising (torchtitan's order:
build on meta -> fp8 swap -> apply_ep -> split -> `model.to_empty(...)` -> `model.init_weights(seed)`;
the stage modules are views of the pruned model, so materialise the model, not the stages).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .args import ModelArgs
from .loss import cross_entropy, split_window, total_loss
from .moe import MoE
from .stages import stage_layers
from .transformer import Transformer


class StageModule(nn.Module):
    """One pipeline stage of a Transformer: the same submodules (shared, not copied), the same keys.

    forward(x, rows): the first stage ignores `x` and embeds rows[:, :T]; other stages take the hidden
    state x [B, T, D]. A non-last stage returns its hidden state; the last stage returns the scalar
    training loss of the micro-batch, CE(main) + λ/D·Σ_k CE(MTP_k), built from model.loss (the same bits
    as lm_losses + total_loss on the whole model). `rows` [B, T+1+D] (token ids) is needed by the first
    and the last stage. `last_losses` holds (main, [mtp_k]) of the last call (detached).
    """

    def __init__(self, model: Transformer, stage_id: int, n_stages: int, fqns: Sequence[str]):
        super().__init__()
        if not 0 <= stage_id < n_stages:
            raise ValueError(f"need 0 <= stage_id < n_stages, got {stage_id=}, {n_stages=}")
        self.args: ModelArgs = model.args
        self.stage_id, self.n_stages = stage_id, n_stages
        self.is_first, self.is_last = stage_id == 0, stage_id == n_stages - 1
        self.__dict__["model"] = model  # not a submodule: `angles` is read from it; materialise the model
        self.embed = model.embed if "embed" in fqns else None
        self.layers = nn.ModuleDict({f[7:]: model.layers[f[7:]] for f in fqns if f.startswith("layers.")})
        self.norm = model.norm if self.is_last else None
        self.head = model.head if self.is_last else None
        self.mtp = nn.ModuleDict({f[4:]: model.mtp[f[4:]] for f in fqns if f.startswith("mtp.")})
        self.last_losses: tuple[torch.Tensor, list[torch.Tensor]] | None = None

    @property
    def angles(self) -> torch.Tensor:
        return self.model.angles

    def extra_repr(self) -> str:
        return f"stage {self.stage_id}/{self.n_stages}, layers {list(self.layers.keys())}"

    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def seq_len(self, rows: torch.Tensor) -> int:
        return rows.size(1) - 1 - self.args.n_mtp_modules

    def embed_tokens(self, rows: torch.Tensor) -> torch.Tensor:
        return self.embed(rows[:, :self.seq_len(rows)])

    def hidden(self, x: torch.Tensor | None, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The stage's blocks on x (the first stage: on the embedded rows[:, :T]); no loss."""
        h = self.embed_tokens(rows) if self.is_first else x
        for layer in self.layers.values():
            h = layer(h, self.angles)
        return h

    def forward(self, x: torch.Tensor | None, rows: torch.Tensor | None = None) -> torch.Tensor:
        h = self.hidden(x, rows)
        return self.loss(h, rows) if self.is_last else h

    def main_loss(self, h: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """CE of the main head on h [B, T, D] (model.loss.lm_losses, first term)."""
        return cross_entropy(self.head(self.norm(h)), split_window(rows, self.args.n_mtp_modules)[1])

    def mtp_input(self, k: int, h: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """MTP module k's block input (MTPModule.project of h and Emb(t_{i+k+1}))."""
        emb = self.embed(split_window(rows, self.args.n_mtp_modules)[2][k])
        return self.mtp[str(k)].project(h, emb)

    def mtp_loss(self, k: int, h: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """CE of MTP depth k+1 from its block's output h (the shared head)."""
        logits = self.head(self.mtp[str(k)].norm(h))
        return cross_entropy(logits, split_window(rows, self.args.n_mtp_modules)[3][k])

    def combine_losses(self, main: torch.Tensor, mtp: list[torch.Tensor]) -> torch.Tensor:
        """model.loss.total_loss; remembers the terms in `last_losses`."""
        self.last_losses = (main.detach(), [m.detach() for m in mtp])
        return total_loss(main, mtp, self.args.mtp_loss_weight)

    def loss(self, h: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        main = self.main_loss(h, rows)
        mtp = []
        for k, module in enumerate(self.mtp.values()):
            h = module.block(self.mtp_input(k, h, rows), self.angles)
            mtp.append(self.mtp_loss(k, h, rows))
        return self.combine_losses(main, mtp)


def build_stages(model: Transformer, stage_ids: Sequence[int], n_stages: int, **costs) -> dict[int, StageModule]:
    """Prune `model` in place to the union of `stage_ids`' parts and return one StageModule per stage.

    The stages share submodules (DualPipeV's rank 0: stage 0 and stage 2pp-1 share `embed`). Works on a
    meta-device model; the pruned model keeps its state_dict keys and its init_weights()."""
    plan = stage_layers(model.args, n_stages, **costs)
    keep = {f for s in stage_ids for f in plan[s]}
    for name in ("embed", "norm", "head"):
        if name not in keep:
            setattr(model, name, None)
    for prefix, container in (("layers.", model.layers), ("mtp.", model.mtp)):
        for key in list(container.keys()):
            if prefix + key not in keep:
                del container[key]
    return {s: StageModule(model, s, n_stages, plan[s]) for s in stage_ids}


def build_stage(model: Transformer, stage_id: int, n_stages: int, **costs) -> StageModule:
    """Prune `model` in place to stage `stage_id` of `n_stages` and return its StageModule."""
    return build_stages(model, [stage_id], n_stages, **costs)[stage_id]
