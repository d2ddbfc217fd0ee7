"""Which transformer blocks and top-level modules each pipeline stage holds: the pure half of model/split.py
(its docstring has the placement and the balance rule). No torch: `moeforge plan` prices a split without it."""
from __future__ import annotations

from .args import ModelArgs


def stage_blocks(args: ModelArgs, n_stages: int, embed_cost: float = 1.0, head_cost: float = 1.0,
                 mtp_cost: float = 1.0) -> list[int]:
    """Number of transformer blocks on each stage (the balance rule of the module docstring)."""
    if n_stages < 1:
        raise ValueError(f"need n_stages >= 1, got {n_stages=}")
    if n_stages > 2 and args.n_layers < n_stages - 2:
        raise ValueError(f"{n_stages=} stages need n_layers >= n_stages - 2 = {n_stages - 2} so that no middle "
                         f"stage is empty, got n_layers={args.n_layers}")
    load = [0.0] * n_stages
    load[0] += embed_cost
    load[-1] += head_cost + mtp_cost * args.n_mtp_modules
    counts = [0] * n_stages
    for _ in range(args.n_layers):
        s = min(range(n_stages), key=lambda i: (load[i], i))
        counts[s] += 1
        load[s] += 1.0
    return counts


def stage_layers(args: ModelArgs, n_stages: int, **costs) -> list[list[str]]:
    """FQNs of the top-level parts each stage holds, in model order: embed, layers.<id>, norm, head, mtp.<k>."""
    counts = stage_blocks(args, n_stages, **costs)
    out, layer = [], 0
    for s, c in enumerate(counts):
        last = s == n_stages - 1
        fqns = ["embed"] if s == 0 or (last and args.n_mtp_modules) else []
        fqns += [f"layers.{i}" for i in range(layer, layer + c)]
        layer += c
        if last:
            fqns += ["norm", "head"] + [f"mtp.{k}" for k in range(args.n_mtp_modules)]
        out.append(fqns)
    return out
