"""Typed slices of the job config owned by train/: each component gets its own slice, never the tree."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .preempt import parse_signals


def _need(ok: bool, msg: str):
    if not ok:
        raise ValueError(msg)


@dataclass(frozen=True)
class BatchRamp:
    """Megatron's rampup_batch_size: the global batch starts at `start` sequences and grows by `increment`
    in equal steps of consumed samples until it reaches train.global_batch_size after `ramp_samples`
    samples (DeepSeek-V3: 3072 -> 15360 over the first 469B tokens, TR §4.2). train/batches.py BatchSchedule.
    All three are required: `train.batch_ramp={start: 4, increment: 4, ramp_samples: 480}`."""
    start: int
    increment: int
    ramp_samples: int


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 300
    global_batch_size: int = 16  # sequences per optimizer step, over all data-parallel ranks
    # sequences per forward/backward on one rank; None (auto): the largest that splits the rank's share
    # (global_batch_size / dp) into at least 2 micro-batches, with a pipeline into at least as many as the
    # schedule needs (1f1b, zb1p: pp; dualpipe, dualpipev: 2*pp) and it accepts (train/build.py batch_split)
    micro_batch_size: int | None = None
    batch_ramp: BatchRamp | None = None  # None: every step takes global_batch_size; else the ramp up to it
    seq_len: int = 128
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 20
    decay_start: float = 0.6  # fraction of the run's samples after which the cosine decay starts (constant before)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    moment_dtype: str = "float32"  # AdamW moments: float32 | bfloat16 (the report keeps them in BF16)
    # activations recomputed in backward: none | selective (RMSNorm outputs and MLA up-projections, TR §3.2.3)
    # | full (whole blocks: activation checkpointing); gradients are bitwise those of none
    recompute: str = "none"
    ema_decay: float = 0.0  # EMA of the parameters in pinned CPU memory (TR §3.2.3), e.g. 0.999; 0: off
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
        r = self.batch_ramp
        if r is not None:
            _need(0 < r.start < self.global_batch_size and r.increment > 0 and r.ramp_samples > 0,
                  f"train.batch_ramp: needs 0 < start < train.global_batch_size={self.global_batch_size}, "
                  f"increment > 0 and ramp_samples > 0, got {r}")
            _need((self.global_batch_size - r.start) % r.increment == 0,
                  f"train.batch_ramp: train.global_batch_size - start = {self.global_batch_size - r.start} must be a "
                  f"multiple of increment={r.increment}")
        _need(self.lr > 0, f"train.lr must be > 0, got {self.lr}")
        _need(0 <= self.min_lr_ratio <= 1, f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        _need(0 <= self.decay_start <= 1, f"train.decay_start must be in [0, 1], got {self.decay_start}")
        _need(self.warmup_steps >= 0, f"train.warmup_steps must be >= 0, got {self.warmup_steps}")
        _need(self.moment_dtype in ("float32", "bfloat16"),
              f"train.moment_dtype={self.moment_dtype!r} not in float32|bfloat16")
        _need(self.recompute in ("none", "selective", "full"),
              f"train.recompute={self.recompute!r} not in none|selective|full")
        _need(0 <= self.ema_decay < 1, f"train.ema_decay must be in [0, 1) (0: off), got {self.ema_decay}")
        _need(self.device in ("auto", "cpu", "cuda"), f"train.device={self.device!r} not in auto|cpu|cuda")
        _need(self.sample_tokens >= 0, f"train.sample_tokens must be >= 0, got {self.sample_tokens}")
        _need(self.spike_zscore >= 0, f"train.spike_zscore must be >= 0 (0: off), got {self.spike_zscore}")
        _need(self.spike_window >= 2, f"train.spike_window must be >= 2, got {self.spike_window}")
        _need(self.max_skips_in_row >= 1, f"train.max_skips_in_row must be >= 1, got {self.max_skips_in_row}")
        _need(self.debug_nan_step >= 0, f"train.debug_nan_step must be >= 0, got {self.debug_nan_step}")


def split_shares(split: str) -> list[float]:
    """'99,1,0' -> [99.0, 1.0, 0.0] (megatron's split string; commas, spaces or slashes); [] if malformed."""
    parts = re.split(r"[,/ ]+", split.strip())
    return [float(x) for x in parts] if all(re.fullmatch(r"\d+(\.\d*)?", x) for x in parts) else []


@dataclass(frozen=True)
class DataConfig:
    """What training reads (train/data.py): megatron-core indexed datasets, sampled by GPTDataset."""
    dir: str = "data/stdlib"  # the default corpus: `input` prepared with `tokenizer` into dir/<tokenizer>.*
    input: str | None = None  # what the default corpus is made of (a folder, .jsonl, .parquet); None: the stdlib
    tokenizer: str = "stdlib-bpe-4096"  # bytes | a shipped name (conf/tokenizer/) | a tokenizer.json or folder
    fim_rate: float = 0.0  # share of the default corpus' documents prepared in Fill-in-the-Middle form (TR §4.1)
    blend: list[Any] | None = None  # [[weight, PREFIX], ...]: train on these indexed datasets instead of dir
    split: str = "99,1,0"  # train,valid,test shares of each dataset's documents (megatron's split string)
    cache: str | None = None  # the document/sample/shuffle index cache; None: a cache/ folder beside the first dataset

    def __post_init__(self):
        _need(0 <= self.fim_rate <= 1, f"data.fim_rate must be in [0, 1], got {self.fim_rate}")
        shares = split_shares(self.split)
        _need(len(shares) in (2, 3) and shares[0] > 0 and shares[1] > 0,
              f"data.split={self.split!r}: 'train,valid[,test]' shares, train and valid > 0 (e.g. '99,1,0')")
        if self.blend is not None:
            _need(len(self.blend) > 0 and all(isinstance(b, (list, tuple)) and len(b) == 2 and
                                              isinstance(b[0], (int, float)) and b[0] > 0 and isinstance(b[1], str)
                                              for b in self.blend),
                  f"data.blend={self.blend!r}: a list of [weight > 0, PREFIX] pairs, "
                  f"e.g. [[0.3, data/a], [0.7, data/b]]")


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
