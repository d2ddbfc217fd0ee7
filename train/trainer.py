"""Trainer: one rank's training state and its optimizer step.

It holds the data samplers, the step engine (the model on this rank and how its micro-batches run:
train/engine.py), the ZeRO-1 optimizer, the MoE balance bookkeeping (train/balance.py), the spike rule
(train/health.py) and the checkpoint glue (train/checkpointing.py). One step:

    micro-batches -> engine.forward_backward (compute) -> grad reduction over dp/edp, loss sums over dp/pp,
    global grad-norm clip (comm) -> spike check -> AdamW + bias update, or a skip (optim) -> record
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from moeforge.comm.counters import ByteCounters
from moeforge.parallel.env import RuntimeEnv
from moeforge.parallel.grad_sync import clip_grad_norm_
from moeforge.parallel.mesh import Meshes

from .balance import MoeBalance
from .batches import BatchSchedule
from .build import build_optimizer, micro_batches, resolve_device, validate_schedule
from .checkpointing import Checkpointing
from .data import Corpus, SampleStream, build_datasets, ensure_data
from .ema import ParamEMA
from .engine import build_engine
from .evaluate import evaluate
from .health import SpikeGuard, model_moe_labels, moe_layer_labels
from .metrics import StepTimer
from .optim import lr_at, run_samples
from .reduce import sum_over_dp_pp_
from .tokenizer import load_tokenizer


class Trainer:
    """One rank's state: model (its experts, its stages), optimizer (its ZeRO-1 shard), data position, step."""

    def __init__(self, cfg, env: RuntimeEnv | None = None, meshes: Meshes | None = None, data=None):
        """data: (train, validation) streams to use instead of the corpus (the dry run's seam): objects with
        rows(first_sample, global_batch) -> this rank's [global_batch / dp, seq_len + 1 + D] token rows."""
        self.cfg, self.env, self.meshes = cfg, env or RuntimeEnv(), meshes
        t = cfg.train
        self.rank, self.is_main = self.env.rank, self.env.rank == 0
        dims = meshes.dims if meshes is not None else None
        self.pp, self.dp_size = (dims.pp, dims.dp) if dims else (1, 1)
        self.dp_rank = meshes.coords.dp if meshes is not None else 0
        self.device = resolve_device(t.device, self.env.local_rank)
        self.micro_batch_size, self.n_micro = validate_schedule(cfg, self.pp, self.dp_size)
        self.batches = BatchSchedule.of(t)  # the global batch of each step (train.batch_ramp)
        # corpus statistics, on rank 0 (which reports): unigram entropy, bytes per token (nats/byte losses)
        self.meta: dict = {}
        self.tokenizer = None
        if data is not None:
            self.train_data, self.val_data = data
        else:  # train/data.py: rank 0 prepares the default corpus on first use, then all build the samples
            self.tokenizer = load_tokenizer(cfg.data.tokenizer)
            if self.is_main:
                ensure_data(cfg.data, t.seed, self.print)
            self.barrier()
            corpus = Corpus.open(cfg.data, self.tokenizer)
            window = t.seq_len + 1 + cfg.model.n_mtp_modules
            train, valid = build_datasets(corpus, cfg.data, window, t.seed, run_samples(t),
                                          t.eval_batches * t.global_batch_size, self.print)
            self.train_data = SampleStream(train, window, self.dp_rank, self.dp_size, "train")
            self.val_data = SampleStream(valid, window, self.dp_rank, self.dp_size, "valid")
            if self.is_main:
                self.meta = {"unigram_entropy_nats": corpus.unigram_entropy(),
                             "bytes_per_token": corpus.bytes_per_token()}
        self.comm_counters = ByteCounters()
        self.engine = build_engine(cfg, self.device, meshes, self.comm_counters, self.n_micro)
        self.model = self.engine.model
        self.named_params = self.engine.named_params
        self.optimizer = build_optimizer(self.named_params, t, meshes)
        all_labels = model_moe_labels(cfg.model)  # every MoE layer of the model
        self.balance = MoeBalance(self.engine.moe_layers, moe_layer_labels(self.model), all_labels,
                                  cfg.model.bias_update_speed if t.bias_update_speed is None else t.bias_update_speed,
                                  cfg.model.n_routed_experts, meshes, self.engine.reduce_tied_loads)
        self.guard = SpikeGuard.from_config(t)  # loss-spike/NaN rule; its state belongs in checkpoints
        self.step, self.tokens_seen = 0, 0
        self.consumed_samples = 0  # the data position: train samples [0, consumed_samples) are read
        self.last_record: dict = {}  # the last step's record and validation loss (kept in checkpoints)
        self.last_val_loss: float | None = None
        # train.ema_decay > 0: an FP32 EMA of this rank's parameters in host memory (train/ema.py, TR §3.2.3)
        self.ema = ParamEMA(self.model.named_parameters(), t.ema_decay, self.device) if t.ema_decay > 0 else None
        self.checkpoints = Checkpointing(self)

    def print(self, *a) -> None:
        if self.is_main:
            print(*a, flush=True)

    def barrier(self) -> None:
        if self.meshes is not None:
            dist.barrier()

    def train_step(self) -> dict:
        """One optimizer step over n_micro micro-batches per rank; returns the step's (global) record."""
        t = self.cfg.train
        timer = StepTimer(self.device)
        self.comm_counters.reset()
        self.optimizer.counters.reset()  # ZeRO-1's dp bytes (reduce-scatter, all-gather)
        self.balance.start_step()
        global_batch = self.batches.at(self.consumed_samples)
        n_micro = micro_batches(global_batch, self.dp_size, self.micro_batch_size)
        rows = self.train_data.rows(self.consumed_samples, global_batch).to(self.device)
        sums = self.engine.forward_backward(list(rows.split(self.micro_batch_size)),
                                            poison=t.debug_nan_step == self.step + 1)
        timer.mark("compute")  # forward + backward (EP all-to-alls included: they run inside the MoE layers)
        self.optimizer.reduce_gradients()  # ZeRO-1: reduce-scatter, each rank gets its slice of the sums
        losses = sum_over_dp_pp_(torch.stack([sums.lm, sums.mtp, sums.aux]), self.meshes)
        norm = clip_grad_norm_(self.named_params, t.grad_clip, self.meshes, norm_params=self.engine.norm_params,
                               zero=self.optimizer)
        timer.mark("comm")  # grad/loss/norm reductions: nothing overlaps them yet, so all of it is exposed
        # the step's one host read of its scalars: the spike rule decides on them before the optimizer step
        lm_sum, mtp_sum, aux_sum, grad_norm = torch.cat([losses, norm.double().view(1)]).tolist()
        n = n_micro * self.dp_size
        lr = lr_at(self.step, self.consumed_samples, t)
        skip = self.guard.check(lm_sum / n, grad_norm)  # global loss and norm: every rank decides alike
        if skip is None:
            if self.ema is not None:
                self.ema.wait_copy()  # the last EMA copy must have read the parameters this step overwrites
            self.optimizer.step(lr)
            if self.ema is not None:
                self.ema.start()  # copy the new parameters out and fold them into the EMA in the background
            self.balance.update_bias()
        self.optimizer.zero_grad()  # a skipped step drops its grads (and its loads, zeroed next step)
        timer.mark("optim")
        self.step += 1
        self.consumed_samples += global_batch
        n_tokens = global_batch * t.seq_len
        self.tokens_seen += n_tokens
        record = {
            "step": self.step, "loss": lm_sum / n, "mtp_loss": mtp_sum / n, "aux_loss": aux_sum / n, "lr": lr,
            "grad_norm": grad_norm, **timer.record(), "tokens_seen": self.tokens_seen, "skipped": skip is not None,
        }
        record["tokens_per_s"] = n_tokens / record["step_time_s"]
        record["global_batch_size"], record["consumed_samples"] = global_batch, self.consumed_samples
        if self.meta.get("bytes_per_token"):
            record["loss_per_byte"] = record["loss"] / self.meta["bytes_per_token"]
        # the time blocked in pipeline receives (bubble + exposed P2P) is not compute; 0 without a pipeline
        record["time_bubble_s"] = wait_s = self.engine.wait_s()
        record["time_compute_s"] -= wait_s
        if skip is not None:
            record["skip_reason"] = skip
        else:
            record.update(self.balance.stats(n_tokens * self.cfg.model.n_activated_experts))
        if self.meshes is not None and self.meshes.dims.ep > 1:
            record.update(self.comm_counters.as_dict())
        if self.meshes is not None and self.dp_size > 1:
            record.update(self.optimizer.counters.as_dict())
        return record

    def evaluate(self) -> float:
        """Mean LM loss over train.eval_batches global validation batches (collective)."""
        return evaluate(self.engine, self.val_data, self.cfg.train.eval_batches, self.cfg.train.global_batch_size,
                        self.micro_batch_size, self.device, self.meshes)

    # ---- checkpoints (collective): train/checkpointing.py ----

    def save(self, root: Path, block: bool = True) -> Path:
        return self.checkpoints.save(root, block)

    def load(self, path: Path) -> None:
        self.checkpoints.load(path)

    def resume(self, root: Path | None = None) -> int:
        return self.checkpoints.resume(root)

    def after_step(self, root: Path, record: dict) -> None:
        """Keep the record for the next checkpoint's manifest; interval save or preemption exit."""
        self.last_record = record
        if "val_loss" in record:
            self.last_val_loss = record["val_loss"]
        self.checkpoints.after_step(root)
