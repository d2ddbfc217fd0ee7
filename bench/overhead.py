"""Framework overhead: the README's single-process `moeforge train` step against a bare torch loop.

    .venv/bin/python bench/overhead.py [--steps 20] [--warmup 3] [OVERRIDES...]

Both sides train the same model (train/build.build_model: the same init), on the same batches (the
trainer's SampleStream), split into the same micro-batches, with the same loss (model/loss.py), the same
grad clipping and AdamW hyper-parameters (lr fixed at train.lr: the bare loop has no schedule). The
moeforge side is a whole step of `moeforge train` as train/loop.py runs it: Trainer.train_step (engine,
reductions, clip, spike guard, ZeRO-1 AdamW, aux-loss-free bias update, the record) + RunMonitor.log
(metrics.jsonl, console sink) + Trainer.after_step. The bare side is forward, backward,
clip_grad_norm_, torch.optim.AdamW.step, zero_grad: nothing else.

The two alternate step by step (moeforge, bare, moeforge, ...), so a machine that slows down for a while
slows both; the ratio of the medians is printed (goal: <= 1.10). Progress bars are off on both sides.
Results: bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from moeforge.launcher.config import load_job_config
from moeforge.model.loss import lm_losses, total_loss
from moeforge.train.build import build_model
from moeforge.train.monitor import RunMonitor
from moeforge.train.optim import no_weight_decay
from moeforge.train.trainer import Trainer


def bare_optimizer(model: torch.nn.Module, t) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if no_weight_decay(name, p) else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, foreach=False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20, help="timed steps per side (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per side first (default 3)")
    p.add_argument("overrides", nargs="*", help="hydra overrides, as for `moeforge train`")
    a = p.parse_args(argv)
    if a.steps < 1 or a.warmup < 0:
        p.error(f"need --steps >= 1 and --warmup >= 0, got {a.steps}, {a.warmup}")
    run_dir = tempfile.mkdtemp(prefix="moeforge_overhead_")
    n_total = a.warmup + a.steps
    cfg = load_job_config([f"run_dir={run_dir}", "logging.progress=false", f"train.steps={n_total}",
                           "train.eval_interval=100000", "checkpoint.interval=0", *a.overrides])
    torch.manual_seed(cfg.train.seed)
    trainer = Trainer(cfg)
    monitor = RunMonitor(run_dir, cfg, trainer)
    ckpt_root = Path(run_dir) / "checkpoints"

    model = build_model(cfg, trainer.device)  # the bare loop's own copy, from the same init
    opt = bare_optimizer(model, cfg.train)
    lam, clip, mb = cfg.model.mtp_loss_weight, cfg.train.grad_clip, trainer.micro_batch_size

    def moeforge_step(step: int) -> None:
        record = trainer.train_step()
        monitor.log(record)
        trainer.after_step(ckpt_root, record)

    def bare_step(step: int) -> None:
        B = cfg.train.global_batch_size  # the trainer's samples of this step (no batch ramp here)
        chunks = trainer.train_data.rows(step * B, B).to(trainer.device).split(mb)
        for rows in chunks:
            main, mtp = lm_losses(model, rows)
            (total_loss(main, mtp, lam) / len(chunks)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip, foreach=False)
        opt.step()
        opt.zero_grad(set_to_none=True)

    times: dict[str, list[float]] = {"moeforge": [], "bare": []}
    for step in range(n_total):
        for name, fn in (("moeforge", moeforge_step), ("bare", bare_step)):
            t0 = time.perf_counter()
            fn(step)
            if step >= a.warmup:
                times[name].append(time.perf_counter() - t0)
    monitor.close({})

    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["moeforge"] / med["bare"]
    print(f"overhead: model={cfg.model.name} batch {cfg.train.global_batch_size} x {cfg.train.seq_len} tokens, "
          f"{trainer.n_micro} micro-batches of {mb}, threads={torch.get_num_threads()}, {a.steps} timed steps each")
    for k, v in times.items():
        print(f"  {k:9s} median {med[k] * 1e3:8.1f} ms  min {min(v) * 1e3:8.1f}  max {max(v) * 1e3:8.1f}")
    print(f"  ratio moeforge / bare = {ratio:.3f}x (goal <= 1.10x): {'met' if ratio <= 1.10 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
