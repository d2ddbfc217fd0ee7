"""When and what a trainer checkpoints: interval saves in the background, the final save, a save on a
preemption signal, and resuming. The format and the logical keys are train/checkpoint.py's, the signal
handling train/preempt.py's. Every method is collective: every rank calls it at the same step.
"""
from __future__ import annotations

import datetime
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from . import checkpoint as ckpt
from .health import require_finite_state
from .optim import lr_at
from .preempt import EXIT_PREEMPTED, PreemptionWatcher, parse_signals

if TYPE_CHECKING:
    from .trainer import Trainer


class Checkpointing:
    def __init__(self, trainer: "Trainer"):
        self.tr = trainer
        self.cfg = trainer.cfg.checkpoint
        self.meshes = trainer.meshes
        self._group: dist.ProcessGroup | None = None
        self._writer: ckpt.Checkpointer | None = None
        self._saved_step: int | None = None  # the step on disk already (saved or resumed from)
        self._preempt: PreemptionWatcher | None = None

    def group(self) -> dist.ProcessGroup | None:
        """Checkpoint I/O gets its own gloo group over every rank: the save thread's collectives then
        never interleave with training's. Created on first use, which every rank reaches together."""
        if self.meshes is not None and self._group is None:
            self._group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=self.meshes.timeout_s))
        return self._group

    def writer(self, root: Path) -> ckpt.Checkpointer:
        if self._writer is None or self._writer.root != Path(root):
            if self._writer is not None:
                self._writer.wait()
            self._writer = ckpt.Checkpointer(root, self.cfg.keep, self.group(), self.cfg.async_save, log=self.tr.print)
        return self._writer

    def state(self) -> dict[str, torch.Tensor]:
        """This rank's share of the job state under logical keys (model, optimizer pieces, step, RNG)."""
        tr, m = self.tr, self.meshes
        state = ckpt.model_state(tr.model, (m.coords.dp, m.dims.dp) if m else (0, 1),
                                 (m.coords.edp, m.dims.edp) if m else (0, 1))
        state.update(ckpt.optimizer_state(tr.optimizer))
        state["train.step"] = torch.tensor(tr.step, dtype=torch.int64)
        state["train.tokens_seen"] = torch.tensor(tr.tokens_seen, dtype=torch.int64)
        state["train.consumed_samples"] = torch.tensor(tr.consumed_samples, dtype=torch.int64)
        state.update(ckpt.rng_state(tr.rank))
        if tr.ema is not None:  # after the update in flight; the same ranks as model.<fqn> (train/ema.py)
            state.update(ckpt.ema_state(tr.ema.state_dict(), state))
        return state

    def manifest(self) -> dict:
        """The job-level fields of the manifest (the same on every rank; rank 0 writes them)."""
        tr, d = self.tr, self.meshes.dims if self.meshes else None
        return {
            "tokens_seen": tr.tokens_seen,
            "layout": {"world_size": d.world_size if d else 1, "pp": d.pp if d else 1, "dp": d.dp if d else 1,
                       "ep": d.ep if d else 1, "edp": d.edp if d else 1},
            "contents": ["model", "optimizer", "train", "rng"] + (["ema"] if tr.ema is not None else []),
            # the data position of every dp rank: train samples [0, consumed_samples) are read (train/batches.py)
            "data": {"sampler": "GPTDataset", "seed": tr.cfg.train.seed, "consumed_samples": tr.consumed_samples,
                     "next_global_batch": tr.batches.at(tr.consumed_samples)},
            "lr_schedule": {"next_lr": lr_at(tr.step, tr.consumed_samples, tr.cfg.train), "of": "train.* in config"},
            "metrics": {"last": tr.last_record, "val_loss": tr.last_val_loss},
            "extra_state": {"spike_guard": tr.guard.state_dict()},
            "config": tr.cfg.to_dict(),
            "code": ckpt.code_version(),
        }

    def save(self, root: Path, block: bool = True) -> Path:
        """Checkpoint this step under root. block=False (and checkpoint.async_save) returns once this
        rank's share is copied to CPU; the write, checksums and manifest finish in the background."""
        tr, root = self.tr, Path(root)
        writer = self.writer(root)
        path = ckpt.step_dir(root, tr.step)
        if self._saved_step == tr.step and (path / ckpt.MANIFEST).is_file():
            writer.wait()  # this step is saved already (or was resumed from): nothing changed since
            return path
        # never from a non-finite state: raises on every rank instead (train/health.py)
        require_finite_state(tr.model, tr.optimizer, tr.step, None if self.meshes is None else dist.group.WORLD)
        writer.save(tr.step, self.state(), self.manifest(), block=block)
        self._saved_step = tr.step
        if block and tr.step >= tr.cfg.train.steps:
            self.stop_watching()  # the final checkpoint is written: a signal now has nothing left to save
        return path

    def load(self, path: Path) -> None:
        """Model, optimizer, step, tokens seen, MoE biases, spike-guard state and (same world size) RNG from
        the whole checkpoint at path, whichever (pp, dp, ep) layout saved it."""
        tr, t0, path = self.tr, time.perf_counter(), Path(path)
        world = self.meshes.dims.world_size if self.meshes else 1
        ema = None
        if tr.ema is not None:
            tr.ema.wait()  # no update in flight while the parameters and the EMA are overwritten
            ema = tr.ema.state_dict()
        out = ckpt.load_trainer_state(path, tr.model, tr.optimizer, tr.rank, world, self.group(), log=tr.print,
                                      ema=ema)
        if tr.ema is not None and not out["ema"]:
            tr.ema.reset()
            tr.print(f"checkpoint: {path} holds no EMA (saved with train.ema_decay=0): the EMA "
                     f"(decay {tr.ema.decay:g}) starts from its parameters")
        tr.step, tr.tokens_seen = out["step"], out["tokens_seen"]
        tr.consumed_samples = out["consumed_samples"]
        if tr.consumed_samples is None:  # saved before the data position was a key: the step's, by the config
            tr.consumed_samples = tr.batches.consumed_after(tr.step)
            tr.print(f"checkpoint: {path} has no train.consumed_samples; {tr.consumed_samples:,} from step {tr.step}")
        manifest = out["manifest"]
        metrics = manifest.get("metrics") or {}
        tr.last_record, tr.last_val_loss = dict(metrics.get("last") or {}), metrics.get("val_loss")
        extra = manifest.get("extra_state") or {}
        if "spike_guard" in extra:
            tr.guard.load_state_dict(extra["spike_guard"])
        self._saved_step = tr.step
        saved_model = (manifest.get("config") or {}).get("model") or {}
        diff = sorted(k for k, v in asdict(tr.cfg.model).items() if k in saved_model and saved_model[k] != v)
        if diff:
            tr.print(f"checkpoint: model config differs from the saved one in {diff}")
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        tr.print(f"moeforge: resumed from {path} at step {tr.step} ({tr.tokens_seen:,} tokens, "
                 f"{tr.consumed_samples:,} samples seen; saved with "
                 f"layout {manifest.get('layout')}) in {time.perf_counter() - t0:.1f}s"
                 + (f" (torchrun restart {restart})" if restart != "0" else ""))

    def resume(self, root: Path | None = None) -> int:
        """At the start of a run: arm the preemption signals, then load per checkpoint.resume: auto = the
        newest whole checkpoint under root (each newer partial or corrupt one is reported and skipped),
        never, or a PATH. Returns the step training continues from."""
        c, tr = self.cfg, self.tr
        root = Path(root or c.dir or Path(tr.cfg.run_dir) / "checkpoints")
        self.watch_preemption()
        if c.resume == "never":
            return tr.step
        if c.resume == "auto":
            path = ckpt.latest_whole(root, log=tr.print, group=self.group())
            if path is None:
                return tr.step
        else:
            path = Path(c.resume)
            why = ckpt.check_whole(path, self.group())
            if why is not None:
                raise ValueError(f"checkpoint.resume={c.resume}: not a whole checkpoint ({why})")
        self.load(path)
        return tr.step

    def watch_preemption(self) -> None:
        self.stop_watching()
        signals = parse_signals(self.cfg.preempt_signals)
        self._preempt = PreemptionWatcher(signals, self.cfg.preempt_grace_s).install() if signals else None

    def stop_watching(self) -> None:
        if self._preempt is not None:
            self._preempt.uninstall()
        self._preempt = None

    def after_step(self, root: Path) -> None:
        """Save every checkpoint.interval steps (in the background); when any rank got a preemption
        signal, save this step on every rank and exit(EXIT_PREEMPTED)."""
        tr, w = self.tr, self._preempt
        if w is not None:
            group, device = None, "cpu"
            if self.meshes is not None:
                group, device = dist.group.WORLD, (tr.device if dist.get_backend() == "nccl" else "cpu")
            if w.agreed(group, device) and tr.step < tr.cfg.train.steps:  # at the last step: finish normally
                path = self.save(root, block=True)
                took, grace = w.elapsed(), w.grace_s
                why = w.received.name if w.received is not None else "a signal on another rank"
                tr.print(f"moeforge: preempted ({why}): step {tr.step} saved to {path}, {took:.1f}s after the "
                         f"signal (checkpoint.preempt_grace_s={grace:g}); exiting with {EXIT_PREEMPTED}")
                if took > grace:
                    tr.print("moeforge: WARNING: the preemption save took longer than the grace period")
                self.stop_watching()
                raise SystemExit(EXIT_PREEMPTED)
        n = self.cfg.interval
        if n and tr.step % n == 0 and tr.step < tr.cfg.train.steps:
            self.save(root, block=False)
