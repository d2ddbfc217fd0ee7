"""run(cfg): one rank's training job, top to bottom.

config -> data -> model on meta -> fp8 swap -> materialize + init -> optimizer -> steps
(micro-batches with gradient accumulation, clip, AdamW, aux-loss-free bias update, metrics,
validation, checkpoints) -> loss curve, greedy sample, final checkpoint.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from moeforge.model.moe import update_balance_bias_
from moeforge.model.transformer import Transformer, param_counts

from . import checkpoint as ckpt
from .data import EOT, TokenSampler, decode, encode, load_meta, prepare, split_window
from .health import SpikeGuard, moe_load_stats, require_finite_state
from .metrics import RunMonitor
from .optim import lr_at, no_weight_decay

log = logging.getLogger("moeforge.train")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device=cuda but torch sees no CUDA device")
    return torch.device(name)


def ensure_data(cfg, log_fn=print) -> dict:
    """Prepare the corpus on first use (the default needs no download)."""
    meta_path = Path(cfg.data.dir) / "meta.json"
    if not meta_path.is_file():
        log_fn(f"data: {cfg.data.dir} not prepared yet; tokenizing {cfg.data.input or 'the Python standard library'}")
        prepare(cfg.data.input, cfg.data.dir, cfg.data.val_fraction, log=log_fn)
    meta = load_meta(cfg.data.dir)
    if meta["vocab_size"] > cfg.model.vocab_size:
        raise ValueError(f"model.vocab_size={cfg.model.vocab_size} < tokenizer vocab {meta['vocab_size']} of {cfg.data.dir}")
    return meta


def build_model(cfg, device: torch.device, meshes=None, counters=None, stage_ids=None) -> Transformer:
    """Meta build -> FP8 module swap -> expert parallelism -> pipeline split -> materialize -> init
    (torchtitan's order). With stage_ids (pp > 1) the model is pruned to those pipeline stages and
    returned with a `.stages` dict {stage id: StageModule}; init_weights seeds each parameter by its
    name, so every layout starts from the single-process model's values."""
    with torch.device("meta"):
        model = Transformer(cfg.model)
    if cfg.fp8.enabled:
        from moeforge.fp8 import apply_fp8

        apply_fp8(model, cfg.fp8)
    if meshes is not None and meshes.dims.ep > 1:
        from moeforge.parallel.apply_ep import apply_ep

        apply_ep(model, meshes.ep, meshes.coords.ep, meshes.dims.ep, meshes.dims.ranks_per_node,
                 two_hop=cfg.parallel.two_hop, fp8=cfg.parallel.fp8_dispatch, counters=counters,
                 timeout_s=meshes.timeout_s, device=device)
    stages = None
    if stage_ids is not None:
        from moeforge.dualpipe.schedule import num_stages
        from moeforge.model.split import build_stages

        stages = build_stages(model, stage_ids, num_stages(cfg.schedule.name, cfg.parallel.pp))
    model.to_empty(device=device)
    model.init_weights(seed=cfg.train.seed)
    model.stages = stages
    return model


def micro_batches_per_rank(cfg, dp: int) -> int:
    """train.global_batch_size / (dp * train.micro_batch_size), or a ValueError naming the fields."""
    t = cfg.train
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ValueError(f"train.global_batch_size={t.global_batch_size} must be a multiple of "
                         f"train.micro_batch_size*dp = {t.micro_batch_size}*{dp}")
    return t.global_batch_size // dp // t.micro_batch_size


def validate_schedule(cfg, pp: int, dp: int) -> None:
    """The global batch must split into micro-batches over dp, and (parallel.pp > 1) the schedule must exist
    for (pp, micro-batches per rank); raises naming the fields."""
    n_micro = micro_batches_per_rank(cfg, dp)
    if pp == 1:
        return
    from moeforge.dualpipe.schedule import num_stages, validate

    try:
        validate(cfg.schedule.name, pp, n_micro)
    except ValueError as e:
        raise ValueError(f"schedule={cfg.schedule.name} with parallel.pp={pp}: {n_micro} micro-batches per rank "
                         f"(train.global_batch_size / dp / train.micro_batch_size = {cfg.train.global_batch_size}"
                         f"/{dp}/{cfg.train.micro_batch_size}): {e}") from None
    n_stages = num_stages(cfg.schedule.name, pp)
    if n_stages > 2 and cfg.model.n_layers < n_stages - 2:
        raise ValueError(f"schedule={cfg.schedule.name} with parallel.pp={pp} has {n_stages} stages: needs "
                         f"model.n_layers >= {n_stages - 2} (no empty middle stage), got {cfg.model.n_layers}")


def lm_losses(model: Transformer, rows: torch.Tensor):
    """(main LM loss, [MTP loss per depth]) for a [B, T+1+D] block of tokens."""
    inputs, targets, mtp_inputs, mtp_targets = split_window(rows, model.args.n_mtp_modules)
    logits, mtp_logits = model(inputs, mtp_inputs)
    V = logits.size(-1)
    main = F.cross_entropy(logits.float().view(-1, V), targets.reshape(-1))
    mtp = [F.cross_entropy(lg.float().view(-1, V), tg.reshape(-1)) for lg, tg in zip(mtp_logits, mtp_targets)]
    return main, mtp


@torch.no_grad()
def greedy_sample(model: Transformer, prompt: str, n_tokens: int, device) -> str:
    model.eval()
    ids = encode(prompt)
    for _ in range(n_tokens):
        ctx = torch.tensor([ids[-model.args.max_seq_len:]], device=device)
        logits, _ = model(ctx)
        nxt = int(logits[0, -1].argmax())
        if nxt == EOT:
            break
        ids.append(nxt)
    model.train()
    return decode(ids)


@torch.no_grad()
def greedy_sample_pipeline(trainer: "Trainer", prompt: str, n_tokens: int) -> str:
    """greedy_sample through the pipeline: each token is one forward of the whole pipe; the rank holding
    the last stage picks the token and broadcasts it over the pp group (collective: every rank calls)."""
    import torch.distributed as dist

    rt, args = trainer.rt, trainer.cfg.model
    pp = trainer.meshes.pp
    src = dist.get_global_rank(pp, rt.rank_of_stage(rt.n_stages - 1, 0))
    trainer.model.eval()
    ids = encode(prompt)
    pad = [0] * (1 + args.n_mtp_modules)  # rows carry T+1+D tokens; only the first T are read here

    def pick(stage, h, rows):
        return stage.head(stage.norm(h))[0, -1].argmax().reshape(1)

    for _ in range(n_tokens):
        rows = torch.tensor([ids[-args.max_seq_len:] + pad], device=trainer.device)
        (tok,) = rt.forward_only([rows], pick)
        tok = torch.zeros(1, dtype=torch.int64, device=trainer.device) if tok is None else tok.to(torch.int64)
        dist.broadcast(tok, src=src, group=pp)
        nxt = int(tok)
        if nxt == EOT:
            break
        ids.append(nxt)
    trainer.model.train()
    return decode(ids)


class Trainer:
    """One rank's state: model (its experts), optimizer (its ZeRO-1 shard), data position, step."""

    def __init__(self, cfg, env=None, meshes=None):
        from moeforge.launcher.env import RuntimeEnv

        self.cfg = cfg
        self.env = env or RuntimeEnv()
        self.meshes = meshes
        self.rank = self.env.rank
        self.dp_rank = meshes.coords.dp if meshes else 0
        self.dp_size = meshes.dims.dp if meshes else 1
        self.device = resolve_device(cfg.train.device)
        if self.device.type == "cuda":
            self.device = torch.device("cuda", self.env.local_rank)
        self.is_main = self.rank == 0
        t = cfg.train
        self.n_micro = micro_batches_per_rank(cfg, self.dp_size)
        self.pp = meshes.dims.pp if meshes else 1
        self.meta = ensure_data(cfg, self.print) if self.is_main else None
        self.barrier()
        self.meta = self.meta or load_meta(cfg.data.dir)
        window = t.seq_len + 1 + cfg.model.n_mtp_modules
        self.train_data = TokenSampler(cfg.data.dir, "train", window, t.global_batch_size, t.seed,
                                       self.dp_rank, self.dp_size)
        self.val_data = TokenSampler(cfg.data.dir, "val", window, t.global_batch_size, t.seed,
                                     self.dp_rank, self.dp_size)
        from moeforge.comm.counters import ByteCounters

        self.comm_counters = ByteCounters()
        self.rt = None  # the pipeline runtime when parallel.pp > 1
        if self.pp > 1:
            from moeforge.dualpipe.runtime import PipelineRuntime
            from moeforge.dualpipe.schedule import stage_placement

            sc = cfg.schedule
            self.model = build_model(cfg, self.device, meshes, self.comm_counters,
                                     stage_ids=stage_placement(sc.name, self.pp)[meshes.coords.pp])
            self.rt = PipelineRuntime.for_schedule(sc.name, self.model.stages, meshes.pp, self.n_micro,
                                                   overlap=sc.overlap, split_middle_pair=sc.split_middle_pair,
                                                   fb_weight_split=sc.fb_weight_split,
                                                   timeout_s=cfg.parallel.timeout_s)
            self.named_params = [(n, p) for n, p in self.rt.named_parameters() if p.requires_grad]
        else:
            self.model = build_model(cfg, self.device, meshes, self.comm_counters)
            self.named_params = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.moe_layers = self.model.moe_layers()  # the MoE layers of this rank's stages
        from .health import moe_layer_labels

        with torch.device("meta"):
            self.moe_labels = moe_layer_labels(Transformer(cfg.model))  # every MoE layer of the model
        for m in self.moe_layers:
            m.aux_loss_scale = 1.0 / self.n_micro
        self.gamma = cfg.model.bias_update_speed if t.bias_update_speed is None else t.bias_update_speed
        self.optimizer = self.build_optimizer()
        self.step = 0
        self.tokens_seen = 0
        self.guard = SpikeGuard.from_config(t)  # loss-spike/NaN rule; its state belongs in checkpoints
        self.expert_load: torch.Tensor | None = None  # [MoE layer, expert] routed tokens of the last applied step

    def print(self, *a):
        if self.is_main:
            print(*a, flush=True)

    def barrier(self):
        if self.meshes is not None:
            import torch.distributed as dist

            dist.barrier()

    def build_optimizer(self):
        from moeforge.parallel.zero import ShardedAdamW

        t = self.cfg.train
        groups = {}
        if self.meshes is not None:
            groups = dict(dense_group=self.meshes.dp, expert_group=self.meshes.edp)
        return ShardedAdamW(self.named_params, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps,
                            weight_decay=t.weight_decay, no_decay=no_weight_decay,
                            moment_dtype=getattr(torch, t.moment_dtype), **groups)

    def _sum_over_dp(self, values: list[float]) -> list[float]:
        """Sum per-rank loss sums over dp and pp (with a pipeline only the ranks holding a last stage,
        or the stages holding MoE layers, contribute): the whole step's sum on every rank."""
        if self.meshes is None or (self.dp_size == 1 and self.pp == 1):
            return values
        from moeforge.parallel.grad_sync import all_reduce_sum_

        t = torch.tensor(values, dtype=torch.float64)
        all_reduce_sum_([t], self.meshes, "dp")
        if self.pp > 1:
            all_reduce_sum_([t], self.meshes, "pp")
        return t.tolist()

    def train_step(self) -> dict:
        """One optimizer step: n_micro micro-batches per rank, dp-reduce, clip, skip check, AdamW, bias update."""
        from moeforge.parallel.grad_sync import clip_grad_norm_, reduce_gradients

        from .metrics import StepTimer

        t = self.cfg.train
        timer = StepTimer(self.device)
        self.comm_counters.reset()
        for m in self.moe_layers:  # this step's routed tokens only (evaluate() and sampling route tokens too)
            m.tokens_per_expert.zero_()
        rows = self.train_data.batch(self.step).to(self.device)
        lm_sum, mtp_sum, aux_sum = 0.0, 0.0, 0.0
        lam = self.cfg.model.mtp_loss_weight
        pipe_wait = None
        if self.rt is not None:  # the schedule runs every micro-batch's forward and backward (dualpipe/runtime.py)
            if t.debug_nan_step == self.step + 1:
                raise ValueError("train.debug_nan_step is not supported with parallel.pp > 1")
            self.rt.step(list(rows.split(t.micro_batch_size)))
            pipe_wait = self.rt.wait_s
            lm_sum, mtp_sum = sum(self.rt.stats["lm_loss"]), sum(self.rt.stats["mtp_loss"])
            aux_sum = self.rt.stats["aux_loss"]
            self.rt.reduce_tied_grads()  # embedding copies / DualPipe's twin stages
        for chunk in (() if self.rt is not None else rows.split(t.micro_batch_size)):
            main, mtp = lm_losses(self.model, chunk)
            if t.debug_nan_step == self.step + 1:  # test aid (train.debug_nan_step): a NaN loss at that step
                main = main * float("nan")
            loss = main + (lam / len(mtp)) * sum(mtp) if mtp else main
            (loss / self.n_micro).backward()
            lm_sum += main.item()
            mtp_sum += sum(x.item() for x in mtp) / max(len(mtp), 1)
            aux_sum += sum(m.last_aux_loss.item() for m in self.moe_layers if m.last_aux_loss is not None)
        timer.mark("compute")  # forward + backward (EP all-to-alls included: they run inside the MoE layers)
        if self.meshes is not None:
            reduce_gradients(self.named_params, self.meshes)
        lm_sum, mtp_sum, aux_sum = self._sum_over_dp([lm_sum, mtp_sum, aux_sum])
        grad_norm = float(clip_grad_norm_(self.named_params, t.grad_clip, self.meshes,
                                          norm_params=None if self.rt is None else self.rt.owned_named_parameters()))
        timer.mark("comm")  # grad/loss/norm reductions: nothing overlaps them yet, so all of it is exposed
        n = self.n_micro * self.dp_size
        lr = lr_at(self.step, t)
        skip = self.guard.check(lm_sum / n, grad_norm)  # global loss and norm: every rank decides alike
        if skip is None:
            self.optimizer.step(lr)
            self.expert_load = self.update_bias()
        self.optimizer.zero_grad()  # a skipped step drops its grads (and its loads, zeroed next step)
        timer.mark("optim")
        self.step += 1
        n_tokens = t.global_batch_size * t.seq_len
        self.tokens_seen += n_tokens
        record = {
            "step": self.step, "loss": lm_sum / n, "mtp_loss": mtp_sum / n, "aux_loss": aux_sum / n, "lr": lr,
            "grad_norm": grad_norm, **timer.record(), "tokens_seen": self.tokens_seen, "skipped": skip is not None,
        }
        record["tokens_per_s"] = n_tokens / record["step_time_s"]
        # no pipeline, no bubble; with one: the time blocked in pipeline receives (bubble + exposed P2P)
        record["time_bubble_s"] = 0.0 if pipe_wait is None else pipe_wait
        if pipe_wait is not None:  # the phases add up to the step time: the wait is not compute
            record["time_compute_s"] -= pipe_wait
        if skip is not None:
            record["skip_reason"] = skip
        else:
            record.update(moe_load_stats(self.expert_load, self.moe_bias_abs_max(),
                                         n_tokens * self.cfg.model.n_activated_experts))
        if self.meshes is not None and self.meshes.dims.ep > 1:
            record.update(self.comm_counters.as_dict())
        return record

    @torch.no_grad()
    def update_bias(self) -> torch.Tensor:
        """b_i += gamma*sign(mean - load_i) from this step's global loads (all micro-batches, all dp ranks);
        returns those loads as a [MoE layer, expert] CPU tensor."""
        loads = [m.tokens_per_expert for m in self.moe_layers]
        if self.rt is not None:
            self.rt.reduce_tied_loads()  # DualPipe: each twin stage ran half of the micro-batches
        if self.meshes is not None and loads:
            from moeforge.parallel.grad_sync import all_reduce_sum_

            all_reduce_sum_(loads, self.meshes, "dp")
        out = torch.stack(loads).cpu() if loads else torch.zeros(0, self.cfg.model.n_routed_experts)
        for m, load in zip(self.moe_layers, loads):
            update_balance_bias_(m.gate.bias, load, self.gamma)
            load.zero_()
        if self.rt is not None:
            out = self._gather_over_pp(out)
        return out

    def _gather_over_pp(self, local_LE: torch.Tensor) -> torch.Tensor:
        """[all MoE layers of the model, experts] from each pp rank's rows (its stages' layers; DualPipe's
        twins hold the same, equal rows): a MAX all-reduce over pp of non-negative counts."""
        import torch.distributed as dist

        from .health import moe_layer_labels

        full = torch.zeros(len(self.moe_labels), local_LE.size(1), dtype=torch.float64)
        for label, row in zip(moe_layer_labels(self.model), local_LE):
            full[self.moe_labels.index(label)] = row.double()
        dist.all_reduce(full, op=dist.ReduceOp.MAX, group=self.meshes.pp)
        return full.to(local_LE.dtype)

    def moe_bias_abs_max(self) -> list[torch.Tensor]:
        """The largest |b_i| of the MoE layers on this rank, or over the whole pipeline (collective) with pp."""
        v = torch.tensor([max((float(m.gate.bias.abs().max()) for m in self.moe_layers), default=0.0)],
                         dtype=torch.float64)
        if self.rt is not None:
            import torch.distributed as dist

            dist.all_reduce(v, op=dist.ReduceOp.MAX, group=self.meshes.pp)
        return [v]

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean LM loss over eval_batches global validation batches (each rank its dp slice), in micro-batches."""
        self.model.eval()
        total = 0.0
        for i in range(self.cfg.train.eval_batches):
            chunks = self.val_data.batch(i).to(self.device).split(self.cfg.train.micro_batch_size)
            if self.rt is not None:
                losses = self.rt.forward_only(chunks, lambda stage, h, rows: stage.main_loss(h, rows))
                total += sum(float(x) for x in losses if x is not None)
                continue
            for chunk in chunks:
                main, _ = lm_losses(self.model, chunk)
                total += main.item()
        self.model.train()
        (total,) = self._sum_over_dp([total])
        return total / (self.cfg.train.eval_batches * self.n_micro * self.dp_size)

    # ---- checkpoints: format and logical keys in train/checkpoint.py, signals in train/preempt.py ----

    def _ckpt_group(self):
        """Checkpoint I/O gets its own gloo group over every rank: the save thread's collectives then
        never interleave with training's. Created on first use, which every rank reaches together."""
        if self.meshes is None:
            return None
        if getattr(self, "_ckpt_pg", None) is None:
            import datetime

            import torch.distributed as dist

            self._ckpt_pg = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=self.meshes.timeout_s))
        return self._ckpt_pg

    def checkpointer(self, root: Path) -> ckpt.Checkpointer:
        c = getattr(self, "_checkpointer", None)
        if c is None or c.root != Path(root):
            if c is not None:
                c.wait()
            c = self._checkpointer = ckpt.Checkpointer(root, self.cfg.checkpoint.keep, self._ckpt_group(),
                                                       self.cfg.checkpoint.async_save, log=self.print)
        return c

    def checkpoint_state(self) -> dict:
        """This rank's share of the job state under logical keys (model, optimizer pieces, step, RNG)."""
        from moeforge.parallel.grad_sync import is_routed_expert

        m = self.meshes
        state = ckpt.model_state(self.model, (m.coords.dp, m.dims.dp) if m else (0, 1),
                                 (m.coords.edp, m.dims.edp) if m else (0, 1), is_routed_expert)
        state.update(ckpt.optimizer_state(self.optimizer))
        state["train.step"] = torch.tensor(self.step, dtype=torch.int64)
        state["train.tokens_seen"] = torch.tensor(self.tokens_seen, dtype=torch.int64)
        state.update(ckpt.rng_state(self.rank))
        return state

    def checkpoint_manifest(self) -> dict:
        """The job-level fields of the manifest (the same on every rank; rank 0 writes them)."""
        d = self.meshes.dims if self.meshes else None
        guard = getattr(self, "guard", None)
        return {
            "tokens_seen": self.tokens_seen,
            "layout": {"world_size": d.world_size if d else 1, "pp": d.pp if d else 1, "dp": self.dp_size,
                       "ep": d.ep if d else 1, "edp": d.edp if d else 1},
            "contents": ["model", "optimizer", "train", "rng"],
            # the data position of every dp rank is TokenSampler.batch(step): a pure function of (seed, step)
            "data": {"sampler": "TokenSampler", "seed": self.cfg.train.seed, "next_batch": self.step},
            "lr_schedule": {"next_lr": lr_at(self.step, self.cfg.train), "of": "train.* in config"},
            "metrics": {"last": getattr(self, "last_record", {}), "val_loss": getattr(self, "last_val_loss", None)},
            "extra_state": {"spike_guard": guard.state_dict()} if guard is not None else {},
            "config": self.cfg.to_dict(),
            "code": ckpt.code_version(),
        }

    def save(self, root: Path, block: bool = True) -> Path:
        """Collective: checkpoint this step under root. block=False (and checkpoint.async_save) returns once
        this rank's share is copied to CPU; the write, checksums and manifest finish in the background."""
        root = Path(root)
        c = self.checkpointer(root)
        path = ckpt.step_dir(root, self.step)
        if getattr(self, "_saved_step", None) == self.step and (path / ckpt.MANIFEST).is_file():
            c.wait()  # this step is saved already (or was resumed from): nothing changed since
            return path
        # never from a non-finite state: raises on every rank instead (train/health.py)
        require_finite_state(self.model, self.optimizer, self.step, None if self.meshes is None else dist_world())
        c.save(self.step, self.checkpoint_state(), self.checkpoint_manifest(), block=block)
        self._saved_step = self.step
        if block and self.step >= self.cfg.train.steps:
            self._stop_watching()  # the final checkpoint is written: a signal now has nothing left to save
        return path

    def load(self, path: Path) -> None:
        """Collective: model, optimizer, step, tokens seen, MoE biases and (same world size) RNG from the
        whole checkpoint at path, whichever (pp, dp, ep) layout saved it."""
        t0 = time.perf_counter()
        path = Path(path)
        world = self.meshes.dims.world_size if self.meshes else 1
        out = ckpt.load_trainer_state(path, self.model, self.optimizer, self.rank, world, self._ckpt_group(),
                                      log=self.print)
        self.step, self.tokens_seen = out["step"], out["tokens_seen"]
        manifest = out["manifest"]
        metrics = manifest.get("metrics") or {}
        self.last_record, self.last_val_loss = dict(metrics.get("last") or {}), metrics.get("val_loss")
        guard, extra = getattr(self, "guard", None), manifest.get("extra_state") or {}
        if guard is not None and "spike_guard" in extra:
            guard.load_state_dict(extra["spike_guard"])
        self._saved_step = self.step
        saved_model = (manifest.get("config") or {}).get("model") or {}
        diff = sorted(k for k, v in asdict(self.cfg.model).items() if k in saved_model and saved_model[k] != v)
        if diff:
            self.print(f"checkpoint: model config differs from the saved one in {diff}")
        import os

        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        self.print(f"moeforge: resumed from {path} at step {self.step} ({self.tokens_seen:,} tokens seen; saved with "
                   f"layout {manifest.get('layout')}) in {time.perf_counter() - t0:.1f}s"
                   + (f" (torchrun restart {restart})" if restart != "0" else ""))

    def resume(self, root: Path | None = None) -> int:
        """At the start of a run (collective): arm the preemption signals, then load per checkpoint.resume:
        auto = the newest whole checkpoint under root (each newer partial or corrupt one is reported and
        skipped), never, or a PATH. Returns the step training continues from."""
        c = self.cfg.checkpoint
        root = Path(root or c.dir or Path(self.cfg.run_dir) / "checkpoints")
        self.last_record, self.last_val_loss = {}, None
        self._watch_preemption()
        if c.resume == "never":
            return self.step
        if c.resume == "auto":
            path = ckpt.latest_whole(root, log=self.print, group=self._ckpt_group())
            if path is None:
                return self.step
        else:
            path = Path(c.resume)
            why = ckpt.check_whole(path, self._ckpt_group())
            if why is not None:
                raise ValueError(f"checkpoint.resume={c.resume}: not a whole checkpoint ({why})")
        self.load(path)
        return self.step

    def _watch_preemption(self) -> None:
        from .preempt import PreemptionWatcher, parse_signals

        self._stop_watching()
        signals = parse_signals(self.cfg.checkpoint.preempt_signals)
        self._preempt = PreemptionWatcher(signals, self.cfg.checkpoint.preempt_grace_s).install() if signals else None

    def _stop_watching(self) -> None:
        w = getattr(self, "_preempt", None)
        if w is not None:
            w.uninstall()
        self._preempt = None

    def after_step(self, root: Path, record: dict) -> None:
        """After every step, on every rank: save every checkpoint.interval steps (in the background), and
        when any rank got a preemption signal, save this step on every rank and exit(EXIT_PREEMPTED)."""
        from .preempt import EXIT_PREEMPTED

        self.last_record = record
        if "val_loss" in record:
            self.last_val_loss = record["val_loss"]
        w = getattr(self, "_preempt", None)
        if w is not None:
            group, device = None, "cpu"
            if self.meshes is not None:
                import torch.distributed as dist

                group, device = dist_world(), (self.device if dist.get_backend() == "nccl" else "cpu")
            if w.agreed(group, device) and self.step < self.cfg.train.steps:  # at the last step: finish normally
                path = self.save(root, block=True)
                took, grace = w.elapsed(), w.grace_s
                why = w.received.name if w.received is not None else "a signal on another rank"
                self.print(f"moeforge: preempted ({why}): step {self.step} saved to {path}, {took:.1f}s after the "
                           f"signal (checkpoint.preempt_grace_s={grace:g}); exiting with {EXIT_PREEMPTED}")
                if took > grace:
                    self.print("moeforge: WARNING: the preemption save took longer than the grace period")
                self._stop_watching()
                raise SystemExit(EXIT_PREEMPTED)
        n = self.cfg.checkpoint.interval
        if n and self.step % n == 0 and self.step < self.cfg.train.steps:
            self.save(root, block=False)


def dist_world():
    import torch.distributed as dist

    return dist.group.WORLD


def setup_distributed(cfg):
    """(env, meshes): meshes is None for a single process. Validates the layout before any group forms."""
    from moeforge.launcher.env import RuntimeEnv
    from moeforge.parallel.dims import ParallelDims

    env = RuntimeEnv.from_env()
    dims = ParallelDims.from_config(cfg.parallel, env.world_size, env.local_world_size, cfg.model.n_routed_experts)
    validate_schedule(cfg, dims.pp, dims.dp)
    if env.world_size == 1:
        return env, None
    from moeforge.parallel.mesh import build_meshes, init_distributed

    backend = init_distributed(env, cfg.parallel.backend, cfg.parallel.timeout_s)
    meshes = build_meshes(dims, device_type="cuda" if backend == "nccl" else "cpu", timeout_s=cfg.parallel.timeout_s)
    if env.rank == 0:
        print(f"moeforge: layout {dims}", flush=True)
    return env, meshes


def run(cfg) -> dict:
    """Train per cfg (a JobConfig) on this rank; returns a summary (final losses, paths)."""
    env, meshes = setup_distributed(cfg)
    try:
        return _run(cfg, env, meshes)
    finally:
        if meshes is not None:
            import torch.distributed as dist

            dist.destroy_process_group()


def _run(cfg, env, meshes) -> dict:
    torch.manual_seed(cfg.train.seed)
    run_dir = Path(cfg.run_dir)
    trainer = Trainer(cfg, env, meshes)
    trainer.resume()  # checkpoint.resume: auto (newest whole checkpoint) | never | PATH; arms preemption signals
    P = trainer.print
    if trainer.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(_to_yaml(cfg))
        metrics_file = run_dir / "metrics.jsonl"
        if metrics_file.exists():  # a resumed run keeps its records up to the checkpoint's step
            ckpt.trim_metrics(metrics_file, trainer.step)
    with torch.device("meta"):
        counts = param_counts(Transformer(cfg.model))
    P(f"moeforge: model={cfg.model.name} params total {counts['total']:,} (activated {counts['activated']:,}, "
      f"MTP {counts['mtp']:,}) device={trainer.device} fp8={'blockwise/' + cfg.fp8.backend if cfg.fp8.enabled else 'off'}")
    P(f"moeforge: {cfg.train.steps} steps x {cfg.train.global_batch_size} seqs x {cfg.train.seq_len} tokens, "
      f"pp={trainer.pp}{' schedule=' + cfg.schedule.name if trainer.pp > 1 else ''} dp={trainer.dp_size} "
      f"ep={meshes.dims.ep if meshes else 1}, {trainer.n_micro} micro-batches/step/rank; unigram entropy of the corpus "
      f"{trainer.meta['unigram_entropy_nats']:.3f} nats/token")
    monitor = RunMonitor(run_dir, cfg, trainer)  # sinks, FLOPs/MFU, memory, GPU telemetry, heatmaps, console
    ckpt_root = Path(cfg.checkpoint.dir or run_dir / "checkpoints")
    val_loss = trainer.last_val_loss  # both from the checkpoint when resumed
    record = dict(trainer.last_record)
    while trainer.step < cfg.train.steps:
        record = trainer.train_step()
        if trainer.step % cfg.train.eval_interval == 0 or trainer.step == cfg.train.steps:
            val_loss = trainer.evaluate()
            record["val_loss"] = val_loss
        monitor.log(record)
        trainer.after_step(ckpt_root, record)  # checkpoint.interval saves (async); preemption: save + exit
    summary = {"steps": trainer.step, "final_loss": record.get("loss"), "val_loss": val_loss,
               "unigram_entropy": trainer.meta["unigram_entropy_nats"], "run_dir": str(run_dir)}
    summary.update(monitor.close(summary))
    path = trainer.save(ckpt_root)
    sample = None
    if cfg.train.sample_tokens:  # every rank runs it: with EP each forward needs all ranks' all-to-all
        sample = (greedy_sample(trainer.model, "def ", cfg.train.sample_tokens, trainer.device) if trainer.rt is None
                  else greedy_sample_pipeline(trainer, "def ", cfg.train.sample_tokens))
    if trainer.is_main:
        from .report import plot_run

        pngs = plot_run(run_dir)
        summary["checkpoint"], summary["loss_png"] = str(path), str(pngs[0])
        if sample is not None:
            summary["sample"] = sample
            P("---- greedy sample ----\n" + sample + "\n-----------------------")
        P(f"moeforge: final train loss {summary['final_loss']:.4f}, validation loss {val_loss:.4f} "
          f"(corpus unigram entropy {summary['unigram_entropy']:.4f})")
        P(f"moeforge: metrics {run_dir / 'metrics.jsonl'}, loss curve {pngs[0]}, checkpoint {path}")
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _to_yaml(cfg) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(asdict(cfg)))
