"""Pictures from run_dir/metrics.jsonl (matplotlib, no display needed)."""
from __future__ import annotations

from pathlib import Path

from .metrics import read_metrics


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write loss.png (train/val loss vs step) and throughput.png; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    if not records:
        raise ValueError(f"{run_dir}/metrics.jsonl has no records")
    steps = [r["step"] for r in records]
    out = []
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["loss"] for r in records], label="train loss (LM)", lw=1)
    if any("mtp_loss" in r for r in records):
        ax.plot(steps, [r.get("mtp_loss") for r in records], label="MTP loss", lw=1, alpha=0.6)
    val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(run_dir / "loss.png", dpi=110)
    plt.close(fig)
    out.append(run_dir / "loss.png")

    fig, ax = plt.subplots(figsize=(7, 3))
    ax.plot(steps, [r.get("tokens_per_s", 0) for r in records], lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("tokens/s")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(run_dir / "throughput.png", dpi=110)
    plt.close(fig)
    out.append(run_dir / "throughput.png")
    return out
