"""Pictures from run_dir/metrics.jsonl (matplotlib, no display needed): `moeforge report RUN_DIR`.

loss.png         train (LM, MTP) and validation loss per step; skipped steps marked in red
throughput.png   tokens/s and model TFLOP/s per GPU (MFU on the right axis when a peak was known)
moe_balance.png  worst-layer expert load max/mean and the largest |bias| of the balancer per step
expert_load.png  heatmap layer x expert of the last load matrix in the file (tokens / layer mean)
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .metrics import read_metrics


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return ([s for s, _ in pts], [v for _, v in pts]) if pts else ([], [])


def plot_expert_load(load_LE, labels: list[str], path: str | Path, title: str = "") -> Path:
    """Heatmap of routed tokens per expert divided by the layer's mean (1 = balanced); rows = MoE layers."""
    from matplotlib.colors import TwoSlopeNorm

    plt = _plt()
    load = np.asarray(load_LE.tolist() if hasattr(load_LE, "tolist") else load_LE, dtype=float)
    rel = load / np.maximum(load.mean(axis=1, keepdims=True), 1e-9)
    L, E = rel.shape
    fig, ax = plt.subplots(figsize=(min(16, 4 + E / 12), min(12, 1.5 + L / 5)))
    im = ax.imshow(rel, aspect="auto", cmap="coolwarm", interpolation="nearest",
                   norm=TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=max(2.0, float(rel.max()))))
    every = max(1, L // 30)
    ax.set_yticks(range(0, L, every), [labels[i] if i < len(labels) else str(i) for i in range(0, L, every)])
    ax.set_xlabel("routed expert")
    ax.set_ylabel("MoE layer")
    ax.set_title(title or "routed tokens per expert / layer mean", fontsize=10)
    fig.colorbar(im, ax=ax, label="load / mean")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write the PNGs listed above (expert_load.png only if the file has a load matrix); returns their paths."""
    plt = _plt()
    run_dir = Path(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    if not records:
        raise ValueError(f"{run_dir}/metrics.jsonl has no records")
    out = []
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*_series(records, "loss"), label="train loss (LM)", lw=1)
    if any("mtp_loss" in r for r in records):
        ax.plot(*_series(records, "mtp_loss"), label="MTP loss", lw=1, alpha=0.6)
    val = _series(records, "val_loss")
    if val[0]:
        ax.plot(*val, "o-", label="validation loss")
    for i, s in enumerate(r["step"] for r in records if r.get("skipped")):
        ax.axvline(s, color="red", lw=0.8, alpha=0.5, label="skipped step" if i == 0 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(run_dir / "loss.png", dpi=110)
    plt.close(fig)
    out.append(run_dir / "loss.png")

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(*_series(records, "tokens_per_s"), lw=1, label="tokens/s")
    ax.set_xlabel("step")
    ax.set_ylabel("tokens/s")
    ax.grid(alpha=0.3)
    tf, mfu = _series(records, "tflops_per_gpu"), _series(records, "mfu")
    if mfu[0] or tf[0]:
        ax2 = ax.twinx()
        steps, ys = (mfu[0], [100 * y for y in mfu[1]]) if mfu[0] else tf
        ax2.plot(steps, ys, lw=1, color="tab:orange")
        ax2.set_ylabel("MFU (%)" if mfu[0] else "model TFLOP/s per GPU", color="tab:orange")
    fig.tight_layout()
    fig.savefig(run_dir / "throughput.png", dpi=110)
    plt.close(fig)
    out.append(run_dir / "throughput.png")

    imb = _series(records, "expert_load_max_over_mean")
    if imb[0]:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.plot(*imb, lw=1, label="load max/mean (worst layer)")
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_xlabel("step")
        ax.set_ylabel("max / mean tokens per expert")
        ax.grid(alpha=0.3)
        bias = _series(records, "moe_bias_abs_max")
        if bias[0]:
            ax2 = ax.twinx()
            ax2.plot(*bias, lw=1, color="tab:green")
            ax2.set_ylabel("max |bias|", color="tab:green")
        fig.tight_layout()
        fig.savefig(run_dir / "moe_balance.png", dpi=110)
        plt.close(fig)
        out.append(run_dir / "moe_balance.png")

    last = next((r for r in reversed(records) if r.get("moe_load")), None)
    if last is not None:
        out.append(plot_expert_load(last["moe_load"], last.get("moe_layers", []), run_dir / "expert_load.png",
                                    f"routed tokens per expert / layer mean, step {last['step']}"))
    return out
