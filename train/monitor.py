"""What a run reports to the console and the sinks, step by step (the fields: train/metrics.py's docstring).

RunMonitor.log completes the trainer's record (already global over ranks) with TFLOP/s, MFU, memory,
GPU telemetry and, when due, the [layer, expert] load matrix and its heatmap; then writes it to the
sinks and updates the progress bar or status line. close() prints the summary table.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from moeforge.model.flops import train_flops_per_token

from .metrics import MetricsLogger, device_peak_tflops, memory_record
from .report import plot_expert_load
from .telemetry import GpuTelemetry

if TYPE_CHECKING:
    from .trainer import Trainer


class RunMonitor:
    """Everything a run reports: sinks, FLOPs/MFU, memory, GPU telemetry, heatmaps, console."""

    def __init__(self, run_dir: str | Path, cfg, trainer: "Trainer"):
        self.cfg, self.trainer, self.run_dir = cfg, trainer, Path(run_dir)
        self.is_main = trainer.is_main
        self.say = trainer.print
        self.sinks = MetricsLogger(run_dir, cfg.logging, cfg.to_dict(), enabled=self.is_main)
        self.sinks.labels = self.labels = trainer.balance.all_labels
        self.world = trainer.env.world_size
        self.flops_per_step, self.peak = self._flops_and_peak()
        self.telemetry = GpuTelemetry(cfg.logging.telemetry_interval, trainer.device, rank=trainer.rank,
                                      log=lambda msg: print(msg, flush=True))
        self._tele_file = None
        if self.telemetry.active and not self.is_main:  # rank 0's samples go into metrics.jsonl
            (self.run_dir / "telemetry").mkdir(parents=True, exist_ok=True)
            self._tele_file = open(self.run_dir / "telemetry" / f"rank_{trainer.rank:05d}.jsonl", "a", buffering=1)
        self.bar = None
        if self.is_main and cfg.logging.progress:
            self.bar = tqdm(total=cfg.train.steps, initial=trainer.step, desc="train", unit="step",
                            dynamic_ncols=True)
        self.val_loss = None
        self.seen: list[dict] = []  # per-step scalars kept for the summary table

    def _flops_and_peak(self) -> tuple[float, float | None]:
        cfg, t = self.cfg, self.cfg.train
        per_token = train_flops_per_token(cfg.model, t.seq_len, include_mtp=cfg.model.n_mtp_modules > 0)
        flops = per_token * t.global_batch_size * t.seq_len
        peak, why = cfg.logging.peak_tflops, "logging.peak_tflops"
        device = self.trainer.device
        if peak is None and device.type == "cuda":
            name = torch.cuda.get_device_name(device)
            peak = device_peak_tflops(name, cfg.fp8.enabled)
            why = f"{name}, {'FP8' if cfg.fp8.enabled else 'BF16'} dense"
            if peak is None:
                why = f"{name} is not in train/metrics.PEAK_TFLOPS; set logging.peak_tflops"
        elif peak is None:
            why = "CPU run; set logging.peak_tflops to compare against a peak"
        self.say(f"moeforge: {per_token / 1e9:.3f} GFLOP/token (fwd+bwd), {flops / 1e12:.3f} TFLOP/step; MFU "
                 + (f"against {peak:g} TFLOP/s per GPU ({why})" if peak else f"null ({why})"))
        return flops, peak

    def _load_due(self, step: int) -> tuple[bool, bool]:
        """(write the load matrix, draw the heatmap) at this step."""
        c, every = self.cfg, self.cfg.logging.expert_load_interval
        heat = step == c.train.steps or bool(c.checkpoint.interval and step % c.checkpoint.interval == 0)
        return heat or bool(every and step % every == 0), heat

    def log(self, record: dict) -> None:
        """Complete the trainer's record, write it to the sinks, update the console. Every rank calls it."""
        step = record["step"]
        dt = record.get("step_time_s")
        if dt:
            # flops_per_step is at train.global_batch_size; a step of train.batch_ramp does its share of them
            scale = record.get("global_batch_size", self.cfg.train.global_batch_size) / self.cfg.train.global_batch_size
            tflops = self.flops_per_step * scale / dt / self.world / 1e12
            record["tflops_per_gpu"] = tflops
            record["mfu"] = tflops / self.peak if self.peak else None
        record.update(memory_record(self.trainer.device))
        tele = self.telemetry.sample(step)
        if self._tele_file is not None and tele:
            self._tele_file.write(json.dumps({"step": step, **tele}) + "\n")
        load = self.trainer.balance.load
        write_load, heat = self._load_due(step)
        if self.is_main:
            record.update(tele)
            if write_load and load is not None:
                record["moe_layers"] = self.labels
                record["moe_load"] = load.long().tolist()
            if heat and load is not None:
                path = plot_expert_load(load, self.labels, self.run_dir / "expert_load" / f"step_{step:08d}.png",
                                        f"routed tokens per expert / layer mean, step {step}")
                self.sinks.log_image("moe/expert_load", path, step)
        self.sinks.log(record)
        if not self.is_main:
            return
        if record.get("val_loss") is not None:
            self.val_loss = record["val_loss"]
        self.seen.append({k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
                         | {"skipped": bool(record.get("skipped"))})
        if record.get("skipped"):
            self._write(f"moeforge: step {step} skipped ({record.get('skip_reason')}); weights unchanged")
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(self.status(record, short=True))
        elif self.cfg.logging.log_interval and step % self.cfg.logging.log_interval == 0:
            self._write(f"step {step}/{self.cfg.train.steps} | " + self.status(record))

    def status(self, r: dict, short: bool = False) -> str:
        parts = [f"loss {_fmt(r.get('loss'), '.3f')}", f"val {_fmt(self.val_loss, '.3f')}",
                 f"lr {_fmt(r.get('lr'), '.2e')}", f"{_fmt(r.get('tokens_per_s'), ',.0f')} tok/s"]
        if r.get("mfu") is not None:
            parts.append(f"MFU {100 * r['mfu']:.1f}%")
        elif r.get("tflops_per_gpu") is not None:
            parts.append(f"{r['tflops_per_gpu']:.3g} TFLOP/s/GPU")
        skipped = sum(s["skipped"] for s in self.seen)
        if skipped or not short:
            parts.append(f"skipped {skipped}")
        if not short:
            parts.append(f"load max/mean {_fmt(r.get('expert_load_max_over_mean'), '.2f')}")
            if r.get("mem_gpu_peak_gib") is not None:
                parts.append(f"GPU mem {r['mem_gpu_peak_gib']:.1f} GiB")
        return " | ".join(parts)

    def _write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def summary(self) -> dict:
        """Means over the steps after the first (the first pays for warm-up), peaks over all."""
        rows = self.seen[1:] or self.seen
        taken = [r for r in rows if not r["skipped"]]

        def mean(key, among=rows):
            xs = [r[key] for r in among if r.get(key) is not None and math.isfinite(r[key])]
            return sum(xs) / len(xs) if xs else None

        def peak(key):
            xs = [r[key] for r in self.seen if r.get(key) is not None]
            return max(xs) if xs else None

        last = self.seen[-1] if self.seen else {}
        return {
            "skipped_steps": sum(r["skipped"] for r in self.seen),
            "tokens_per_s": mean("tokens_per_s"), "tflops_per_gpu": mean("tflops_per_gpu"), "mfu": mean("mfu"),
            "step_time_s": mean("step_time_s"), "time_compute_s": mean("time_compute_s"),
            "time_comm_s": mean("time_comm_s"), "time_bubble_s": mean("time_bubble_s"),
            "time_optim_s": mean("time_optim_s"),
            "mem_gpu_peak_gib": peak("mem_gpu_peak_gib"), "mem_host_rss_gib": peak("mem_host_rss_gib"),
            "expert_load_max_over_mean": last.get("expert_load_max_over_mean"),
            "moe_bias_abs_max": last.get("moe_bias_abs_max"),
            "moe_tokens_dropped": sum(r.get("moe_tokens_dropped", 0) for r in taken),
        }

    def close(self, summary: dict) -> dict:
        """Close every sink; print the summary table on rank 0; returns the summary's numbers."""
        if self.bar is not None:
            self.bar.close()
        self.sinks.close()
        self.telemetry.close()
        if self._tele_file is not None:
            self._tele_file.close()
        if not self.is_main:
            return {}
        s = self.summary()
        mfu = f"{100 * s['mfu']:.2f}%" if s["mfu"] is not None else "n/a (no peak: " + (
            "CPU run)" if self.trainer.device.type != "cuda" else "set logging.peak_tflops)")
        rows = [
            ("steps", f"{summary.get('steps')} ({s['skipped_steps']} skipped)"),
            ("train loss (last)", _fmt(summary.get("final_loss"), ".4f")),
            ("validation loss", _fmt(summary.get("val_loss"), ".4f")),
            ("tokens/s (mean)", _fmt(s["tokens_per_s"], ",.0f")),
            ("model TFLOP/s per GPU", _fmt(s["tflops_per_gpu"], ".4g")),
            ("MFU", mfu),
            ("step time (mean)", f"{_fmt(s['step_time_s'], '.4f')} s = compute {_fmt(s['time_compute_s'], '.4f')} "
                                 f"+ exposed comm {_fmt(s['time_comm_s'], '.4f')} + bubble "
                                 f"{_fmt(s['time_bubble_s'], '.4f')} + optimizer {_fmt(s['time_optim_s'], '.4f')}"),
            ("memory (peak, rank 0)", ("" if s["mem_gpu_peak_gib"] is None else
                                       f"GPU {s['mem_gpu_peak_gib']:.2f} GiB, ")
             + f"host RSS {_fmt(s['mem_host_rss_gib'], '.2f')} GiB"),
            ("expert load max/mean", f"{_fmt(s['expert_load_max_over_mean'], '.3f')} (worst layer, last step), "
                                     f"|bias| max {_fmt(s['moe_bias_abs_max'], '.4f')}, "
                                     f"tokens dropped {s['moe_tokens_dropped']}"),
        ]
        width = max(len(k) for k, _ in rows)
        print("moeforge: summary\n" + "\n".join(f"  {k:<{width}}  {v}" for k, v in rows), flush=True)
        return s


def _fmt(x, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)
