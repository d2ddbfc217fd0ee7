"""What a run reports, and where it goes.

Per step, rank 0 writes one JSON object to run_dir/metrics.jsonl (always), to wandb when
`logging.backend=wandb` (offline mode needs no network; the API key is read by wandb from
WANDB_API_KEY and never passes through here) and to TensorBoard when `logging.tensorboard=true`.
The trainer's record (loss, MTP/aux loss, LR, grad norm, step-time split, MoE load) is made global
over ranks before it gets here; `RunMonitor.log` (train/monitor.py) adds:
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
    """Time of the phases of one step. On CPU: wall time between marks. On CUDA: a CUDA event per mark
    on the compute stream and device time between them, read once, in record(): no host sync per phase
    (the work a phase queued lands in that phase's device time)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.start = self.last = time.perf_counter()
        self.times: dict[str, float] = {}
        self.events: list[tuple[str, torch.cuda.Event]] = []
        if device.type == "cuda":
            self.events.append(("start", self._event()))

    @staticmethod
    def _event():
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    def mark(self, phase: str) -> None:
        if self.device.type == "cuda":
            self.events.append((phase, self._event()))
            return
        now = time.perf_counter()
        self.times[f"time_{phase}_s"] = self.times.get(f"time_{phase}_s", 0.0) + now - self.last
        self.last = now

    def record(self) -> dict:
        if self.events:
            self.events[-1][1].synchronize()  # the step's work done: every event has its time
            for (_, a), (phase, b) in zip(self.events, self.events[1:]):
                key = f"time_{phase}_s"
                self.times[key] = self.times.get(key, 0.0) + a.elapsed_time(b) / 1e3
            self.last = time.perf_counter()
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
