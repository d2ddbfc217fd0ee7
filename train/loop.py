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

from model.moe import update_balance_bias_
from model.transformer import Transformer, param_counts

from . import checkpoint as ckpt
from .data import EOT, TokenSampler, decode, encode, load_meta, prepare, split_window
from .metrics import MetricsLogger
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


def build_model(cfg, device: torch.device) -> Transformer:
    """Meta build -> FP8 module swap -> materialize -> init (the order torchtitan uses)."""
    with torch.device("meta"):
        model = Transformer(cfg.model)
    if cfg.fp8.enabled:
        from fp8 import apply_fp8

        apply_fp8(model, cfg.fp8)
    model.to_empty(device=device)
    model.init_weights(seed=cfg.train.seed)
    return model


def lm_losses(model: Transformer, rows: torch.Tensor):
    """(main LM loss, [MTP loss per depth]) for a [B, T+1+D] block of tokens."""
    inputs, targets, mtp_inputs, mtp_targets = split_window(rows, model.args.n_mtp_modules)
    logits, mtp_logits = model(inputs, mtp_inputs)
    V = logits.size(-1)
    main = F.cross_entropy(logits.float().view(-1, V), targets.reshape(-1))
    mtp = [F.cross_entropy(lg.float().view(-1, V), tg.reshape(-1)) for lg, tg in zip(mtp_logits, mtp_targets)]
    return main, mtp


@torch.no_grad()
def evaluate(model: Transformer, sampler: TokenSampler, n_batches: int, micro: int, device) -> float:
    model.eval()
    total = 0.0
    count = 0
    for i in range(n_batches):
        rows = sampler.batch(i).to(device)
        for chunk in rows.split(micro):
            main, _ = lm_losses(model, chunk)
            total += main.item() * chunk.size(0)
            count += chunk.size(0)
    model.train()
    return total / count


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


class Trainer:
    def __init__(self, cfg, rank: int = 0, dp_rank: int = 0, dp_size: int = 1):
        self.cfg = cfg
        self.rank, self.dp_rank, self.dp_size = rank, dp_rank, dp_size
        self.device = resolve_device(cfg.train.device)
        self.is_main = rank == 0
        t = cfg.train
        per_rank = t.global_batch_size // dp_size
        if t.global_batch_size % (t.micro_batch_size * dp_size):
            raise ValueError(
                f"train.global_batch_size={t.global_batch_size} must be a multiple of "
                f"train.micro_batch_size*dp = {t.micro_batch_size}*{dp_size}")
        self.n_micro = per_rank // t.micro_batch_size
        self.meta = ensure_data(cfg, self.print)
        window = t.seq_len + 1 + cfg.model.n_mtp_modules
        self.train_data = TokenSampler(cfg.data.dir, "train", window, t.global_batch_size, t.seed, dp_rank, dp_size)
        self.val_data = TokenSampler(cfg.data.dir, "val", window, t.micro_batch_size, t.seed)
        self.model = build_model(cfg, self.device)
        self.moe_layers = self.model.moe_layers()
        for m in self.moe_layers:
            m.aux_loss_scale = 1.0 / self.n_micro
        self.gamma = cfg.model.bias_update_speed if t.bias_update_speed is None else t.bias_update_speed
        self.optimizer = self.build_optimizer()
        self.step = 0
        self.tokens_seen = 0

    def print(self, *a):
        if self.is_main:
            print(*a, flush=True)

    def build_optimizer(self):
        t = self.cfg.train
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        from parallel.zero import ShardedAdamW

        return ShardedAdamW(named, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, weight_decay=t.weight_decay,
                            no_decay=no_weight_decay, moment_dtype=getattr(torch, t.moment_dtype))

    def train_step(self) -> dict:
        """One optimizer step over n_micro micro-batches; returns this step's metrics."""
        t = self.cfg.train
        t0 = time.perf_counter()
        rows = self.train_data.batch(self.step).to(self.device)
        lm_sum, mtp_sum, aux_sum = 0.0, 0.0, 0.0
        lam = self.cfg.model.mtp_loss_weight
        for chunk in rows.split(t.micro_batch_size):
            main, mtp = lm_losses(self.model, chunk)
            loss = main + (lam / len(mtp)) * sum(mtp) if mtp else main
            (loss / self.n_micro).backward()
            lm_sum += main.item()
            mtp_sum += sum(x.item() for x in mtp) / max(len(mtp), 1)
            aux_sum += sum(m.last_aux_loss.item() for m in self.moe_layers if m.last_aux_loss is not None)
        params = [p for p in self.model.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
        lr = lr_at(self.step, t)
        self.optimizer.step(lr)
        self.optimizer.zero_grad()
        load = self.update_bias()
        self.step += 1
        n_tokens = t.global_batch_size * t.seq_len
        self.tokens_seen += n_tokens
        dt = time.perf_counter() - t0
        return {
            "step": self.step, "loss": lm_sum / self.n_micro, "mtp_loss": mtp_sum / self.n_micro,
            "aux_loss": aux_sum / self.n_micro, "lr": lr, "grad_norm": float(grad_norm),
            "tokens_per_s": n_tokens / dt, "step_time_s": dt, "tokens_seen": self.tokens_seen,
            "expert_load_max_over_mean": load,
        }

    @torch.no_grad()
    def update_bias(self) -> float:
        """b_i += gamma*sign(mean - load_i) from this step's loads; returns the worst max/mean load ratio."""
        worst = 0.0
        for m in self.moe_layers:
            load = m.tokens_per_expert
            worst = max(worst, float(load.max() / load.mean().clamp(min=1e-9)))
            update_balance_bias_(m.gate.bias, load, self.gamma)
            load.zero_()
        return worst

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "step": self.step, "tokens_seen": self.tokens_seen}


def run(cfg) -> dict:
    """Train per cfg (a JobConfig); returns a summary (final losses, paths)."""
    torch.manual_seed(cfg.train.seed)
    run_dir = Path(cfg.run_dir)
    trainer = Trainer(cfg)
    P = trainer.print
    if trainer.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(_to_yaml(cfg))
        metrics_file = run_dir / "metrics.jsonl"
        if metrics_file.exists():
            metrics_file.unlink()
    counts = param_counts(trainer.model)
    P(f"moeforge: model={cfg.model.name} params total {counts['total']:,} (activated {counts['activated']:,}, "
      f"MTP {counts['mtp']:,}) device={trainer.device} fp8={'blockwise/' + cfg.fp8.backend if cfg.fp8.enabled else 'off'}")
    P(f"moeforge: {cfg.train.steps} steps x {cfg.train.global_batch_size} seqs x {cfg.train.seq_len} tokens, "
      f"{trainer.n_micro} micro-batches/step; unigram entropy of the corpus "
      f"{trainer.meta['unigram_entropy_nats']:.3f} nats/token")
    metrics = MetricsLogger(run_dir, cfg.logging, cfg.to_dict(), enabled=trainer.is_main)
    ckpt_root = Path(cfg.checkpoint.dir or run_dir / "checkpoints")
    bar = None
    if trainer.is_main and cfg.logging.progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.train.steps, desc="train", unit="step", dynamic_ncols=True)
    val_loss = None
    record = {}
    while trainer.step < cfg.train.steps:
        record = trainer.train_step()
        if trainer.step % cfg.train.eval_interval == 0 or trainer.step == cfg.train.steps:
            val_loss = evaluate(trainer.model, trainer.val_data, cfg.train.eval_batches, cfg.train.micro_batch_size,
                                trainer.device)
            record["val_loss"] = val_loss
        metrics.log(record)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.3f}", val=f"{val_loss:.3f}" if val_loss else "-",
                            lr=f"{record['lr']:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
        if cfg.checkpoint.interval and trainer.step % cfg.checkpoint.interval == 0 and trainer.step < cfg.train.steps:
            _save(trainer, ckpt_root, cfg)
    if bar is not None:
        bar.close()
    metrics.close()
    summary = {"steps": trainer.step, "final_loss": record.get("loss"), "val_loss": val_loss,
               "unigram_entropy": trainer.meta["unigram_entropy_nats"], "run_dir": str(run_dir)}
    if trainer.is_main:
        path = _save(trainer, ckpt_root, cfg)
        from .report import plot_run

        pngs = plot_run(run_dir)
        summary["checkpoint"], summary["loss_png"] = str(path), str(pngs[0])
        if cfg.train.sample_tokens:
            sample = greedy_sample(trainer.model, "def ", cfg.train.sample_tokens, trainer.device)
            summary["sample"] = sample
            P("---- greedy sample ----\n" + sample + "\n-----------------------")
        P(f"moeforge: final train loss {summary['final_loss']:.4f}, validation loss {val_loss:.4f} "
          f"(corpus unigram entropy {summary['unigram_entropy']:.4f})")
        P(f"moeforge: metrics {run_dir / 'metrics.jsonl'}, loss curve {pngs[0]}, checkpoint {path}")
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _save(trainer: Trainer, root: Path, cfg) -> Path:
    return ckpt.save(root, trainer.step, trainer.state_dict(),
                     {"model": cfg.model.name, "layout": {"pp": 1, "ep": 1, "dp": trainer.dp_size}},
                     keep=cfg.checkpoint.keep)


def _to_yaml(cfg) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(asdict(cfg)))
