"""What the EMA of the parameters (train.ema_decay, train/ema.py) costs a training step.

    .venv/bin/python bench/ema_bench.py [--steps 20] [--warmup 3] [--decay 0.999] [OVERRIDES...]

Two trainers of the same config (default: the tiny preset on this machine's device) train side by side,
one with train.ema_decay=0 and one with --decay; their steps alternate (off, on, off, ...) so a machine
that slows down for a while slows both. Printed: the median step time of each, their ratio (the goal
of TR §3.2.3 is "without incurring additional ... time overhead": 1.00), the EMA's background work per
step (copy wait + FP32 lerp on the worker thread), the time the training thread waited for it (only when
an update is still running at the next optimizer step) and the host memory it takes (train/ema.ema_memory).
Results: bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from moeforge.launcher.config import load_job_config
from moeforge.train.trainer import Trainer


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20, help="timed steps per side (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per side first (default 3)")
    p.add_argument("--decay", type=float, default=0.999, help="train.ema_decay of the EMA side (default 0.999)")
    p.add_argument("overrides", nargs="*", help="hydra overrides, as for `moeforge train`")
    a = p.parse_args(argv)
    if a.steps < 1 or a.warmup < 0 or not 0 < a.decay < 1:
        p.error(f"need --steps >= 1, --warmup >= 0 and 0 < --decay < 1, got {a.steps}, {a.warmup}, {a.decay}")
    n_total = a.warmup + a.steps
    trainers = {}
    for name, decay in (("off", 0.0), ("on", a.decay)):
        cfg = load_job_config([f"run_dir={tempfile.mkdtemp(prefix=f'moeforge_ema_{name}_')}", "logging.progress=false",
                               f"train.steps={n_total}", "train.eval_interval=100000", "checkpoint.interval=0",
                               *a.overrides, f"train.ema_decay={decay}"])
        torch.manual_seed(cfg.train.seed)
        trainers[name] = Trainer(cfg)
    times: dict[str, list[float]] = {"off": [], "on": []}
    ema = trainers["on"].ema
    stall0 = update0 = 0.0
    for step in range(n_total):
        if step == a.warmup:
            ema.wait()
            stall0, update0 = ema.stall_s, ema.update_s
        for name, tr in trainers.items():
            t0 = time.perf_counter()
            tr.train_step()
            if tr.device.type == "cuda":
                torch.cuda.synchronize(tr.device)  # the step's device work, not the EMA's worker
            if step >= a.warmup:
                times[name].append(time.perf_counter() - t0)
    ema.wait()
    off, on = statistics.median(times["off"]), statistics.median(times["on"])
    tr = trainers["on"]
    mem = ema.memory()
    print(f"ema bench: model={tr.cfg.model.name} device={tr.device} params on this rank {ema.n_params:,} "
          f"({len(ema.params)} tensors), decay {a.decay}, {a.steps} timed steps per side (+{a.warmup} warmup), "
          f"torch threads {torch.get_num_threads()}")
    print(f"  step time median: ema off {off * 1e3:.2f} ms, ema on {on * 1e3:.2f} ms")
    print(f"  ratio on/off: {on / off:.3f}")
    print(f"  EMA worker per step (copy wait + FP32 lerp, in the background): "
          f"{(ema.update_s - update0) / a.steps * 1e3:.2f} ms; training thread waited for it "
          f"{(ema.stall_s - stall0) / a.steps * 1e3:.3f} ms/step")
    print(f"  host memory: EMA {mem['ema_host_bytes'] / 2**20:.1f} MiB (FP32) + staging "
          f"{mem['ema_staging_bytes'] / 2**20:.1f} MiB ({'pinned' if mem['ema_pinned_bytes'] else 'pageable'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
