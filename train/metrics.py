"""What a run reports, and where it goes.

Per step, rank 0 writes one JSON object to run_dir/metrics.jsonl (always), to wandb when
`logging.backend=wandb` (offline mode needs no network; the API key is read by wandb from
WANDB_API_KEY and never passes through here) and to TensorBoard when `logging.tensorboard=true`.
The trainer's record (loss, MTP/aux loss, LR, grad norm, step-time split, MoE load) is made global
over ranks before it gets here; `RunMonitor.log` adds:
  - tflops_per_gpu / mfu: model FLOPs from the architecture (model/flops.py: MLA, routed + shared
    experts, MTP; forward + backward) x tokens / step time / GPUs, over the peak of one GPU
    (`logging.peak_tflops`, else the device-name table below; on CPU MFU stays null, reason said once);
  - memory: GPU allocated / peak since the last record / reserved (torch.cuda), host RSS — rank 0's;
  - gpu/*: NVML telemetry every `logging.telemetry_interval` steps (train/telemetry.py);
  - moe_load: the [layer, expert] matrix every `logging.expert_load_interval` steps, at checkpoint
    steps and at the last step, where run_dir/expert_load/step_*.png heatmaps are drawn as well.
The console gets a progress bar (or a status line every `logging.log_interval` steps), a line for
each skipped step, and a summary table at the end.
"""
from __future__ import annotations

import json
import math
import os
import resource
import time
from pathlib import Path

import torch

from .config import LoggingConfig

# Dense (no sparsity) tensor-core peaks per GPU in TFLOP/s, from NVIDIA's data sheets: (name part, BF16, FP8).
# The first entry whose name part occurs in torch.cuda.get_device_name() wins, so variants come first.
PEAK_TFLOPS = [
    ("H100 PCIe", 756.0, 1513.0),
    ("H800 PCIe", 756.0, 1513.0),
    ("H100 NVL", 835.0, 1671.0),
    ("H200 NVL", 835.0, 1671.0),
    ("H100", 989.4, 1978.9),  # SXM5
    ("H800", 989.4, 1978.9),
    ("H200", 989.4, 1978.9),
    ("A100", 312.0, None),
]


def device_peak_tflops(device_name: str, fp8: bool) -> float | None:
    for part, bf16, f8 in PEAK_TFLOPS:
        if part in device_name:
            return f8 if fp8 else bf16
    return None


def host_rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc); elsewhere its peak (getrusage)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_record(device: torch.device) -> dict:
    out = {"mem_host_rss_gib": round(host_rss_bytes() / 2**30, 3)}
    if device.type == "cuda":
        out["mem_gpu_alloc_gib"] = round(torch.cuda.memory_allocated(device) / 2**30, 3)
        out["mem_gpu_peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
        out["mem_gpu_reserved_gib"] = round(torch.cuda.memory_reserved(device) / 2**30, 3)
        torch.cuda.reset_peak_memory_stats(device)  # the next record's peak is its own interval's
    return out


class StepTimer:
    """Wall time of the phases of one step; on CUDA each mark waits for the GPU, so the time lands in
    the phase that queued the work."""

    def __init__(self, device: torch.device):
        self.device = device
        self.start = self.last = time.perf_counter()
        self.times: dict[str, float] = {}

    def mark(self, phase: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.times[f"time_{phase}_s"] = self.times.get(f"time_{phase}_s", 0.0) + now - self.last
        self.last = now

    def record(self) -> dict:
        return {**self.times, "step_time_s": self.last - self.start}


def _scalars(record: dict, labels: list[str]) -> dict:
    """The record as flat scalars for wandb/TensorBoard: per-layer lists become key/layer_<id>."""
    out = {}
    for k, v in record.items():
        if k in ("step", "moe_load", "moe_layers", "skip_reason") or v is None:
            continue
        if isinstance(v, bool):
            out[k] = int(v)
        elif isinstance(v, (int, float)):
            out[k] = v
        elif k == "moe_load_max_over_mean":
            out.update({f"{k}/layer_{lab}": x for lab, x in zip(labels, v)})
        elif k == "gpu/xid":
            out[k] = len(v)
    return out


class MetricsLogger:
    """The sinks: metrics.jsonl always, wandb and TensorBoard when configured. Rank 0 only (enabled)."""

    def __init__(self, run_dir: str | Path, cfg: LoggingConfig, config_dict: dict, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._wandb = self._tb = None
        self.labels: list[str] = []  # MoE layer labels for the per-layer scalars
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", buffering=1)
        if cfg.backend == "wandb" and cfg.wandb_mode != "disabled":
            import wandb  # the API key comes from WANDB_API_KEY only; it is never printed or stored here

            os.environ.setdefault("WANDB_SILENT", "true")
            self._wandb = wandb.init(project=cfg.wandb_project, mode=cfg.wandb_mode, dir=str(run_dir),
                                     config=config_dict)
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ValueError(f"logging.tensorboard=true needs the tensorboard package ({e}); "
                                 "`pip install tensorboard` or set logging.tensorboard=false") from None
            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._file.write(json.dumps(clean) + "\n")
        if self._wandb is None and self._tb is None:
            return
        flat = _scalars(record, self.labels)
        if self._wandb is not None:
            self._wandb.log(flat, step=record["step"])
        if self._tb is not None:
            for k, v in flat.items():
                self._tb.add_scalar(k, v, record["step"])

    def log_image(self, key: str, path: Path, step: int) -> None:
        if self._wandb is not None:
            import wandb

            self._wandb.log({key: wandb.Image(str(path))}, step=step)

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class RunMonitor:
    """Everything `_run` reports: sinks, FLOPs/MFU, memory, GPU telemetry, heatmaps, console."""

    def __init__(self, run_dir: str | Path, cfg, trainer):
        from .health import moe_layer_labels
        from .telemetry import GpuTelemetry

        self.cfg, self.trainer, self.run_dir = cfg, trainer, Path(run_dir)
        self.is_main = trainer.is_main
        self.say = trainer.print
        self.sinks = MetricsLogger(run_dir, cfg.logging, cfg.to_dict(), enabled=self.is_main)
        self.sinks.labels = self.labels = getattr(trainer, "moe_labels", None) or moe_layer_labels(trainer.model)
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
            from tqdm import tqdm

            self.bar = tqdm(total=cfg.train.steps, initial=trainer.step, desc="train", unit="step",
                            dynamic_ncols=True)
        self.val_loss = None
        self.seen: list[dict] = []  # per-step scalars kept for the summary table

    def _flops_and_peak(self) -> tuple[float | None, float | None]:
        cfg, t = self.cfg, self.cfg.train
        try:
            from moeforge.model.flops import train_flops_per_token
        except ImportError as e:
            self.say(f"moeforge: no FLOP count (model/flops.py: {e}); TFLOP/s and MFU stay null")
            return None, None
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
        if self.flops_per_step is not None and dt:
            tflops = self.flops_per_step / dt / self.world / 1e12
            record["tflops_per_gpu"] = tflops
            record["mfu"] = tflops / self.peak if self.peak else None
        record.update(memory_record(self.trainer.device))
        tele = self.telemetry.sample(step)
        if self._tele_file is not None and tele:
            self._tele_file.write(json.dumps({"step": step, **tele}) + "\n")
        load = getattr(self.trainer, "expert_load", None)
        write_load, heat = self._load_due(step)
        if self.is_main:
            record.update(tele)
            if write_load and load is not None:
                record["moe_layers"] = self.labels
                record["moe_load"] = load.long().tolist()
            if heat and load is not None:
                from .report import plot_expert_load

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
