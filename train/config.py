"""Typed slices of the job config owned by train/: each component gets its own slice, never the tree."""
from __future__ import annotations

from dataclasses import dataclass

from .preempt import parse_signals


def _need(ok: bool, msg: str):
    if not ok:
        raise ValueError(msg)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 300
    global_batch_size: int = 16  # sequences per optimizer step, over all data-parallel ranks
    # sequences per forward/backward on one rank; None (auto): the largest that splits the rank's share
    # (global_batch_size / dp) into at least 2 micro-batches, with a pipeline into at least as many as the
    # schedule needs (1f1b, zb1p: pp; dualpipe, dualpipev: 2*pp) and it accepts (train/build.py batch_split)
    micro_batch_size: int | None = None
    seq_len: int = 128
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 20
    decay_start: float = 0.6  # fraction of steps after which the cosine decay starts (constant before)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    moment_dtype: str = "float32"  # AdamW moments: float32 | bfloat16 (the report keeps them in BF16)
    bias_update_speed: float | None = None  # gamma; None: the model's value
    seed: int = 0
    device: str = "auto"  # auto (cuda if available) | cpu | cuda
    eval_interval: int = 100
    eval_batches: int = 4
    sample_tokens: int = 120  # greedy sample printed at the end; 0 disables
    # loss-spike / NaN rule (train/health.py): a non-finite loss or grad norm always skips the step
    spike_zscore: float = 0.0  # also skip a loss this many std above the mean of the window; 0: off (6 is sane)
    spike_window: int = 100  # accepted steps the z-score looks back on
    max_skips_in_row: int = 10  # this many consecutive skipped steps stop the run
    debug_nan_step: int = 0  # test aid: multiply the loss by NaN at this step (1-based); 0: off

    def __post_init__(self):
        for name in ("steps", "global_batch_size", "seq_len", "eval_interval", "eval_batches"):
            _need(getattr(self, name) > 0, f"train.{name} must be > 0, got {getattr(self, name)}")
        if self.micro_batch_size is not None:
            _need(self.micro_batch_size > 0, f"train.micro_batch_size must be > 0 or null (auto), "
                                             f"got {self.micro_batch_size}")
            _need(self.global_batch_size % self.micro_batch_size == 0,
                  f"train.global_batch_size={self.global_batch_size} must be a multiple of "
                  f"train.micro_batch_size={self.micro_batch_size}")
        _need(self.lr > 0, f"train.lr must be > 0, got {self.lr}")
        _need(0 <= self.min_lr_ratio <= 1, f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        _need(0 <= self.decay_start <= 1, f"train.decay_start must be in [0, 1], got {self.decay_start}")
        _need(self.warmup_steps >= 0, f"train.warmup_steps must be >= 0, got {self.warmup_steps}")
        _need(self.moment_dtype in ("float32", "bfloat16"),
              f"train.moment_dtype={self.moment_dtype!r} not in float32|bfloat16")
        _need(self.device in ("auto", "cpu", "cuda"), f"train.device={self.device!r} not in auto|cpu|cuda")
        _need(self.sample_tokens >= 0, f"train.sample_tokens must be >= 0, got {self.sample_tokens}")
        _need(self.spike_zscore >= 0, f"train.spike_zscore must be >= 0 (0: off), got {self.spike_zscore}")
        _need(self.spike_window >= 2, f"train.spike_window must be >= 2, got {self.spike_window}")
        _need(self.max_skips_in_row >= 1, f"train.max_skips_in_row must be >= 1, got {self.max_skips_in_row}")
        _need(self.debug_nan_step >= 0, f"train.debug_nan_step must be >= 0, got {self.debug_nan_step}")


@dataclass(frozen=True)
class DataConfig:
    dir: str = "data/stdlib"  # prepared token files; made from `input` on first use
    input: str | None = None  # folder of text files; None: the Python standard library
    val_fraction: float = 0.01

    def __post_init__(self):
        _need(0 < self.val_fraction < 1, f"data.val_fraction must be in (0, 1), got {self.val_fraction}")


@dataclass(frozen=True)
class LoggingConfig:
    backend: str = "console"  # console | wandb (metrics.jsonl is always written)
    progress: bool = True  # a live progress bar on rank 0
    wandb_project: str = "moeforge"
    wandb_mode: str = "offline"  # offline | online | disabled
    tensorboard: bool = False  # also write run_dir/tensorboard (needs the tensorboard package)
    log_interval: int = 0  # without the progress bar, print a status line every N steps; 0: never
    peak_tflops: float | None = None  # per-GPU peak for MFU; None: from the device name (H100/H800/H200), none on CPU
    telemetry_interval: int = 10  # NVML GPU sample every N steps (GPU runs); 0: off
    expert_load_interval: int = 100  # the [layer, expert] load matrix into metrics.jsonl every N steps; 0: only
    #                                  at checkpoints and the last step (where the heatmap PNG is drawn too)

    def __post_init__(self):
        _need(self.backend in ("console", "wandb"), f"logging.backend={self.backend!r} not in console|wandb")
        _need(self.wandb_mode in ("offline", "online", "disabled"),
              f"logging.wandb_mode={self.wandb_mode!r} not in offline|online|disabled")
        for name in ("log_interval", "telemetry_interval", "expert_load_interval"):
            _need(getattr(self, name) >= 0, f"logging.{name} must be >= 0, got {getattr(self, name)}")
        _need(self.peak_tflops is None or self.peak_tflops > 0,
              f"logging.peak_tflops must be > 0 or null, got {self.peak_tflops}")


@dataclass(frozen=True)
class CheckpointConfig:
    dir: str | None = None  # None: run_dir/checkpoints
    interval: int = 0  # save every N steps; 0: only at the end (and on preemption)
    keep: int = 2  # newest K whole checkpoints kept
    async_save: bool = True  # interval saves write in a background thread while training goes on
    resume: str = "auto"  # auto: the newest whole checkpoint under dir, if any | never | PATH of a step_* folder
    preempt_signals: str = "SIGTERM,SIGUSR1"  # each one: save after the current step, exit 75; "" disables
    preempt_grace_s: float = 25.0  # the scheduler's notice (torchrun: --shutdown-timeout 30); a slower save warns

    def __post_init__(self):
        _need(self.interval >= 0, f"checkpoint.interval must be >= 0, got {self.interval}")
        _need(self.keep >= 1, f"checkpoint.keep must be >= 1, got {self.keep}")
        _need(bool(self.resume), "checkpoint.resume must be auto, never or a checkpoint path")
        _need(self.preempt_grace_s > 0, f"checkpoint.preempt_grace_s must be > 0, got {self.preempt_grace_s}")
        parse_signals(self.preempt_signals)  # ValueError naming the bad signal
