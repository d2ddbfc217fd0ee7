"""Tokens/s and MFU of the `small` model on one GPU: fp8=off vs fp8=blockwise (Triton), experts looped vs grouped.

    python bench/e2e_small.py [--json PATH] [--steps N] [--smoke]

What runs: train.trainer.Trainer (the real training step: forward, backward, clip, AdamW, bias update) on
the stdlib corpus in the shipped BPE, `--warmup` steps (Triton compiles, allocator), then `--steps` timed steps; the
step time is the trainer's own (it synchronizes the GPU). The job config is built from conf/model/small.yaml
and the config dataclasses without Hydra (the GPU image has no hydra-core); the equivalent command line
is `moeforge train model=small fp8=<off|blockwise> fp8.backend=triton train.seq_len=2048 ...`.
Variants, same data and seed:
    bf16          fp8=off (experts: a loop of BF16 MLPs)
    fp8 loop      fp8=blockwise fp8.backend=triton fp8.grouped_experts=false
    fp8 grouped   fp8=blockwise fp8.backend=triton fp8.grouped_experts=true
The grouped runner is set (or removed) here with fp8.grouped.apply_grouped_experts, whatever build_model did.
Reported: median step time, tokens/s, model TFLOP/s (model/flops.py, the trainer's MFU numerator), MFU
against the BF16 dense peak (comparable across variants) and, for FP8 runs, against the FP8 peak (what the
trainer's metrics.jsonl reports for fp8=blockwise), peak GPU memory, last loss. Goal: fp8 grouped >= 1.3x bf16.
--smoke: the tiny model, emulate backend, 2 + 2 steps of seq 32, on CPU: checks this script, times nothing real.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def log(msg: str) -> None:
    print(msg, flush=True)


def job_config(model: str, fp8: bool, backend: str, grouped: bool, seq: int, mbs: int, gbs: int, steps: int,
               data_dir: str, run_dir: str, device: str):
    from moeforge.fp8 import Fp8Config
    from moeforge.launcher.config import JobConfig
    from moeforge.model.args import load_preset
    from moeforge.train.config import CheckpointConfig, DataConfig, LoggingConfig, TrainConfig

    return JobConfig(
        model=load_preset(model),
        train=TrainConfig(steps=steps, global_batch_size=gbs, micro_batch_size=mbs, seq_len=seq, device=device,
                          eval_interval=10**9, sample_tokens=0, warmup_steps=2),
        data=DataConfig(dir=data_dir),
        logging=LoggingConfig(progress=False, telemetry_interval=0, expert_load_interval=0),
        fp8=Fp8Config(enabled=fp8, backend=backend, grouped_experts=grouped),
        checkpoint=CheckpointConfig(preempt_signals=""),
        run_dir=run_dir,
    )


def run_variant(name: str, cfg, warmup: int, steps: int) -> dict:
    from moeforge.fp8.grouped import apply_grouped_experts
    from moeforge.model.flops import train_flops_per_token
    from moeforge.train.trainer import Trainer
    from moeforge.train.metrics import device_peak_tflops

    cuda = cfg.train.device == "cuda"
    gc.collect()  # the previous variant's trainer
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    tr = Trainer(cfg)
    n_grouped = apply_grouped_experts(tr.model, cfg.fp8)
    times, losses = [], []
    for i in range(warmup + steps):
        rec = tr.train_step()
        losses.append(rec["loss"])
        if i >= warmup:
            times.append(rec["step_time_s"])
        elif i == 0:
            log(f"  {name}: first step {rec['step_time_s']:.2f}s (build {time.time() - t0 - rec['step_time_s']:.1f}s)")
    t = cfg.train
    dt = statistics.median(times)
    tokens = t.global_batch_size * t.seq_len
    flops_tok = train_flops_per_token(cfg.model, t.seq_len, include_mtp=cfg.model.n_mtp_modules > 0)
    row = {"variant": name, "fp8": cfg.fp8.enabled, "grouped_layers": n_grouped, "step_s": dt,
           "tokens_per_s": tokens / dt, "tflops": flops_tok * tokens / dt / 1e12, "loss_first": losses[0],
           "loss_last": losses[-1], "steps": len(times)}
    if cuda:
        name_ = torch.cuda.get_device_name()
        bf16_peak, fp8_peak = device_peak_tflops(name_, False), device_peak_tflops(name_, True)
        row["mfu_vs_bf16_peak"] = row["tflops"] / bf16_peak if bf16_peak else None
        row["mfu_vs_fp8_peak"] = row["tflops"] / fp8_peak if (fp8_peak and cfg.fp8.enabled) else None
        row["mem_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    log("  " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    del tr
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--global-batch", type=int, default=16)
    ap.add_argument("--variants", default="bf16,fp8_loop,fp8_grouped")
    ap.add_argument("--smoke", action="store_true", help="tiny model, emulate, CPU, 2 + 2 steps")
    args = ap.parse_args()
    t0 = time.time()
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        log("bench/e2e_small.py: no CUDA GPU here, skipping (--smoke runs the tiny model on CPU to check the script)")
        return
    from moeforge.fp8.gemm import unavailable_reason
    from moeforge.train.config import DataConfig
    from moeforge.train.data import ensure_data

    if args.smoke:
        model, backend, device = "tiny", "emulate", "cpu"
        args.steps, args.warmup, args.seq, args.micro_batch, args.global_batch = 2, 2, 32, 4, 4
    else:
        model, backend, device = "small", "triton", "cuda"
        if unavailable_reason("triton"):
            sys.exit(f"bench/e2e_small.py: {unavailable_reason('triton')}")
    work = tempfile.mkdtemp(prefix="moeforge_e2e_")
    data_dir = os.environ.get("MOEFORGE_BENCH_DATA", os.path.join(work, "data"))
    ensure_data(DataConfig(dir=data_dir), seed=0, log=lambda *a: None)  # the stdlib in the shipped BPE (first use)
    log(f"data ready in {time.time() - t0:.0f}s ({data_dir})")
    variants = {"bf16": (False, False), "fp8_loop": (True, False), "fp8_grouped": (True, True)}
    rows = []
    for v in args.variants.split(","):
        fp8, grouped = variants[v]
        cfg = job_config(model, fp8, backend, grouped, args.seq, args.micro_batch, args.global_batch,
                         args.warmup + args.steps, data_dir, os.path.join(work, v), device)
        try:
            rows.append(run_variant(v, cfg, args.warmup, args.steps))
        except Exception as exc:  # noqa: BLE001 - report and go on: the table shows which variant failed
            log(f"  {v} FAILED: {type(exc).__name__}: {str(exc)[:300]}")
            rows.append({"variant": v, "error": f"{type(exc).__name__}: {exc}"})
        log(f"  ({time.time() - t0:.0f}s)")

    base = next((r for r in rows if r["variant"] == "bf16" and "error" not in r), None)
    log(f"\n== summary: {model}, seq {args.seq}, {args.global_batch} x {args.seq} tokens/step, "
        f"median of {args.steps} steps after {args.warmup} ==")
    log("| variant | step s | tokens/s | x bf16 | TFLOP/s | MFU (bf16 peak) | MFU (fp8 peak) | GPU mem GiB | loss |")
    log("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            log(f"| {r['variant']} | failed: {r['error'][:80]} |||||||")
            continue
        pct = lambda k: f"{100 * r[k]:.1f}%" if r.get(k) is not None else "-"  # noqa: E731
        x = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}" if base else "-"
        mem = f"{r['mem_peak_gib']:.1f}" if "mem_peak_gib" in r else "-"
        log(f"| {r['variant']} | {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | {x} | {r['tflops']:.1f} "
            f"| {pct('mfu_vs_bf16_peak')} | {pct('mfu_vs_fp8_peak')} | {mem} | {r['loss_last']:.3f} |")
    log(f"total {time.time() - t0:.0f}s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"rows": rows, "model": model, "seq": args.seq, "global_batch": args.global_batch,
                       "device": torch.cuda.get_device_name() if cuda else "cpu"}, fh, indent=1)
    sys.exit(1 if any("error" in r for r in rows) else 0)


if __name__ == "__main__":
    main()
