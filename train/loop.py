"""run(cfg): one rank's training job, top to bottom.

config -> process groups -> Trainer (data, model on meta -> fp8 swap -> EP -> pipeline split ->
materialize + init, optimizer) -> resume -> steps (train_step, validation, metrics, checkpoints) ->
final checkpoint, greedy sample, loss curve.

Where each part lives: train/build.py (layout, batch split, model, optimizer), train/trainer.py (the
step), train/engine.py (single process or pipeline), train/balance.py (MoE bias update),
train/evaluate.py (validation, sample), train/checkpointing.py (saves, preemption, resume),
train/monitor.py (what is reported).
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from moeforge.model.transformer import Transformer, param_counts

from . import checkpoint as ckpt
from .build import setup_distributed
from .evaluate import greedy_sample
from .monitor import RunMonitor
from .report import plot_run
from .trainer import Trainer


def run(cfg) -> dict:
    """Train per cfg (a JobConfig) on this rank; returns a summary (final losses, paths)."""
    env, meshes = setup_distributed(cfg)
    try:
        torch.manual_seed(cfg.train.seed)
        return _run(cfg, Trainer(cfg, env, meshes))
    finally:
        if meshes is not None:
            dist.destroy_process_group()


def _run(cfg, trainer: Trainer) -> dict:
    run_dir = Path(cfg.run_dir)
    trainer.resume()  # checkpoint.resume: auto (newest whole checkpoint) | never | PATH; arms preemption signals
    if trainer.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(asdict(cfg))))
        metrics_file = run_dir / "metrics.jsonl"
        if metrics_file.exists():  # a resumed run keeps its records up to the checkpoint's step
            ckpt.trim_metrics(metrics_file, trainer.step)
    _print_job(cfg, trainer)
    monitor = RunMonitor(run_dir, cfg, trainer)  # sinks, FLOPs/MFU, memory, GPU telemetry, heatmaps, console
    ckpt_root = Path(cfg.checkpoint.dir or run_dir / "checkpoints")
    val_loss = trainer.last_val_loss  # both from the checkpoint when resumed
    record = dict(trainer.last_record)
    while trainer.step < cfg.train.steps:
        record = trainer.train_step()
        if trainer.step % cfg.train.eval_interval == 0 or trainer.step == cfg.train.steps:
            val_loss = trainer.evaluate()
            record["val_loss"] = val_loss
            if "loss_per_byte" in record:
                record["val_loss_per_byte"] = val_loss / trainer.meta["bytes_per_token"]
        monitor.log(record)
        trainer.after_step(ckpt_root, record)  # checkpoint.interval saves (async); preemption: save + exit
    summary = {"steps": trainer.step, "final_loss": record.get("loss"), "val_loss": val_loss,
               "unigram_entropy": trainer.meta.get("unigram_entropy_nats"), "run_dir": str(run_dir)}
    bpt = trainer.meta.get("bytes_per_token")  # rank 0, when the data records its bytes: losses per byte too
    if bpt and summary["final_loss"] is not None and val_loss is not None:
        summary.update(bytes_per_token=bpt, final_loss_per_byte=summary["final_loss"] / bpt,
                       val_loss_per_byte=val_loss / bpt)
    summary.update(monitor.close(summary))
    path = trainer.save(ckpt_root)
    sample = None
    if cfg.train.sample_tokens:  # every rank runs it: with EP each forward needs all ranks' all-to-all
        sample = greedy_sample(trainer.engine, trainer.tokenizer, "def ", cfg.train.sample_tokens)
    if trainer.is_main:
        pngs = plot_run(run_dir)
        summary["checkpoint"], summary["loss_png"] = str(path), str(pngs[0])
        if sample is not None:
            summary["sample"] = sample
            trainer.print("---- greedy sample ----\n" + sample + "\n-----------------------")
        trainer.print(f"moeforge: final train loss {summary['final_loss']:.4f}, validation loss {val_loss:.4f} "
                      f"nats/token (corpus unigram entropy {summary['unigram_entropy']:.4f})"
                      + (f"; {summary['final_loss_per_byte']:.4f} / {summary['val_loss_per_byte']:.4f} nats/byte "
                         f"at {bpt:.3f} bytes/token" if "val_loss_per_byte" in summary else ""))
        trainer.print(f"moeforge: metrics {run_dir / 'metrics.jsonl'}, loss curve {pngs[0]}, checkpoint {path}")
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _print_job(cfg, trainer: Trainer) -> None:
    with torch.device("meta"):
        counts = param_counts(Transformer(cfg.model))
    t, m, say = cfg.train, trainer.meshes, trainer.print
    say(f"moeforge: model={cfg.model.name} params total {counts['total']:,} (activated {counts['activated']:,}, "
        f"MTP {counts['mtp']:,}) device={trainer.device} "
        f"fp8={'blockwise/' + cfg.fp8.backend if cfg.fp8.enabled else 'off'}")
    say(f"moeforge: {t.steps} steps x {t.global_batch_size} seqs x {t.seq_len} tokens, "
        f"pp={trainer.pp}{' schedule=' + cfg.schedule.name if trainer.pp > 1 else ''} dp={trainer.dp_size} "
        f"ep={m.dims.ep if m else 1}, {trainer.n_micro} micro-batches of {trainer.micro_batch_size}/step/rank"
        + (f"; batch ramp {t.batch_ramp.start} + {t.batch_ramp.increment} per "
           f"{t.batch_ramp.ramp_samples // ((t.global_batch_size - t.batch_ramp.start) // t.batch_ramp.increment):,} "
           f"samples" if t.batch_ramp else ""))
    if trainer.meta:
        bpt = trainer.meta["bytes_per_token"]
        say(f"moeforge: unigram entropy of the corpus {trainer.meta['unigram_entropy_nats']:.3f} nats/token"
            + (f", {bpt:.3f} bytes/token" if bpt else " (bytes per token unknown: no `bytes` in PREFIX.json)"))
