"""What a run reports, through the real loop on the tiny model: the metrics file, the heatmaps, the
summary, `moeforge report`, wandb offline files, and a planted NaN step that is skipped, leaves the
weights alone and never reaches a checkpoint as NaN."""
import math
import time

import pytest
import torch

from moeforge.launcher.cli import main
from moeforge.launcher.config import load_job_config
from moeforge.model.flops import train_flops_per_token
from moeforge.train import checkpoint as ckpt
from moeforge.train import trainer as trainer_module
from moeforge.train.health import SpikeGuard
from moeforge.train.loop import run
from moeforge.train.metrics import read_metrics
from moeforge.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")  # the tiny model in this process: one intra-op thread


def cfg_for(tmp, data, *extra):
    return load_job_config([f"data.dir={data}", f"run_dir={tmp}", "logging.progress=false", "train.sample_tokens=0",
                            "train.seq_len=32", "train.global_batch_size=8", "train.micro_batch_size=4",
                            "train.eval_batches=1", *extra])


def test_metrics_file_heatmaps_summary_and_report(tmp_path, stdlib_data, capsys):
    cfg = cfg_for(tmp_path, stdlib_data, "train.steps=4", "train.eval_interval=4", "checkpoint.interval=2",
                  "logging.peak_tflops=1.0", "logging.log_interval=2", "logging.expert_load_interval=0")
    summary = run(cfg)
    out = capsys.readouterr().out
    recs = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    n_moe = cfg.model.n_layers - cfg.model.n_dense_layers + cfg.model.n_mtp_modules
    for r in recs:
        assert r["skipped"] is False and math.isfinite(r["loss"]) and r["mtp_loss"] > 0 and r["aux_loss"] > 0
        assert r["lr"] > 0 and r["grad_norm"] > 0 and r["tokens_per_s"] > 0 and r["mem_host_rss_gib"] > 0
        assert r["time_bubble_s"] == 0.0 and 0 < r["time_compute_s"] < r["step_time_s"]
        assert len(r["moe_load_max_over_mean"]) == n_moe and r["expert_load_max_over_mean"] >= 1.0
        assert r["moe_bias_abs_max"] > 0 and r["moe_tokens_dropped"] == 0
        per_step = train_flops_per_token(cfg.model, 32, include_mtp=True) * 8 * 32
        assert r["tflops_per_gpu"] == pytest.approx(per_step / r["step_time_s"] / 1e12, rel=1e-9)
        assert r["mfu"] == pytest.approx(r["tflops_per_gpu"] / 1.0)  # logging.peak_tflops=1
    # the [layer, expert] matrix at checkpoint steps and the last step only (expert_load_interval=0)
    with_load = [r for r in recs if "moe_load" in r]
    assert [r["step"] for r in with_load] == [2, 4] and with_load[0]["moe_layers"] == ["1", "2", "3", "mtp0"]
    K = cfg.model.n_activated_experts
    assert all(sum(row) == 8 * 32 * K and len(row) == cfg.model.n_routed_experts for row in with_load[1]["moe_load"])
    assert "val_loss" in recs[-1]
    for step in (2, 4):
        assert (tmp_path / "expert_load" / f"step_{step:08d}.png").stat().st_size > 5000
    assert (tmp_path / "expert_load.png").stat().st_size > 5000  # plot_run at the end draws it from the JSONL
    # console: a status line every 2 steps, a summary table; summary.json carries its numbers
    assert "step 2/4 | loss" in out and "step 4/4 | loss" in out and "step 1/4" not in out
    assert "moeforge: summary" in out and "tokens dropped 0" in out and "4 (0 skipped)" in out
    if not torch.cuda.is_available():
        assert "telemetry: CPU run" in out
    assert summary["skipped_steps"] == 0 and summary["tokens_per_s"] > 0 and summary["moe_tokens_dropped"] == 0
    # `moeforge report RUN_DIR` renders the pictures from the JSONL alone
    (tmp_path / "expert_load.png").unlink()
    assert main(["report", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    for name in ("loss.png", "throughput.png", "moe_balance.png", "expert_load.png"):
        assert name in printed and (tmp_path / name).stat().st_size > 5000


def test_each_phase_of_the_step_time_holds_the_work_done_in_it(tmp_path, stdlib_data, monkeypatch):
    """Stretch the forward/backward, the grad-norm reduction and the optimizer step by known sleeps (each
    timed on its own clock): each phase must hold its own stretch and not another's."""
    trainer = Trainer(cfg_for(tmp_path, stdlib_data, "train.steps=3"))
    trainer.train_step()  # warm-up
    took: dict[str, float] = {}

    def stretched(phase, fn, seconds):
        def call(*args, **kwargs):
            t0 = time.perf_counter()
            time.sleep(seconds)
            out = fn(*args, **kwargs)
            took[phase] = time.perf_counter() - t0
            return out
        return call

    engine, optimizer = trainer.engine, trainer.optimizer
    monkeypatch.setattr(engine, "forward_backward", stretched("compute", engine.forward_backward, 0.6))
    monkeypatch.setattr(trainer_module, "clip_grad_norm_", stretched("comm", trainer_module.clip_grad_norm_, 0.4))
    monkeypatch.setattr(optimizer, "step", stretched("optim", optimizer.step, 0.5))
    r = trainer.train_step()
    assert sorted(took) == ["comm", "compute", "optim"] and not r["skipped"]
    for phase, seconds in took.items():
        others = sum(took.values()) - seconds
        assert seconds <= r[f"time_{phase}_s"] < seconds + others / 2, (phase, took, r)
    assert sum(took.values()) <= r["step_time_s"] and r["time_bubble_s"] == 0.0


def test_planted_nan_step_is_skipped_and_leaves_the_state_alone(tmp_path, stdlib_data):
    trainer = Trainer(cfg_for(tmp_path, stdlib_data, "train.steps=3", "train.debug_nan_step=2"))
    r1 = trainer.train_step()
    assert not r1["skipped"]
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}  # gate biases included
    moments = {k: v.clone() for k, v in trainer.optimizer.state_tensors().items()}
    adam_steps = trainer.optimizer.step_count
    r2 = trainer.train_step()
    assert r2["skipped"] and "non-finite" in r2["skip_reason"] and math.isnan(r2["loss"])
    assert "moe_load_max_over_mean" not in r2 and trainer.step == 2 and trainer.guard.skipped == 1
    after = trainer.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), [k for k in before if not torch.equal(before[k], after[k])]
    assert trainer.optimizer.step_count == adam_steps
    after_moments = trainer.optimizer.state_tensors()
    assert sorted(after_moments) == sorted(moments) and any(v.abs().sum() > 0 for v in moments.values())
    assert all(torch.equal(moments[k], after_moments[k]) for k in moments)
    assert all(p.grad is None for _, p in trainer.named_params)
    r3 = trainer.train_step()
    assert not r3["skipped"] and math.isfinite(r3["loss"])
    assert not torch.equal(before["embed.weight"], trainer.model.state_dict()["embed.weight"])


def test_nan_step_is_logged_and_its_checkpoint_is_the_previous_finite_state(tmp_path, stdlib_data, capsys):
    run(cfg_for(tmp_path, stdlib_data, "train.steps=3", "train.eval_interval=3", "train.debug_nan_step=2",
                "checkpoint.interval=1", "checkpoint.keep=3", "checkpoint.async_save=false"))
    assert "moeforge: step 2 skipped (non-finite loss=nan" in capsys.readouterr().out
    recs = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["skipped"] for r in recs] == [False, True, False]
    assert recs[1]["loss"] is None and "non-finite" in recs[1]["skip_reason"] and recs[2]["loss"] > 0
    root = tmp_path / "checkpoints"
    s1, s2 = (ckpt.read_tensors(root / f"step_{i:08d}") for i in (1, 2))
    model_keys = [k for k in s1 if k.startswith("model.")]
    assert model_keys and all(torch.isfinite(s2[k]).all() and torch.equal(s1[k], s2[k]) for k in model_keys)
    assert int(s2["train.step"]) == 2


def test_a_non_finite_state_is_never_checkpointed(tmp_path, stdlib_data, monkeypatch):
    """With the skip rule switched off the planted NaN reaches the weights; the save must refuse."""
    monkeypatch.setattr(SpikeGuard, "check", lambda self, loss, grad_norm: None)
    with pytest.raises(RuntimeError, match="refusing to checkpoint step 2: non-finite"):
        run(cfg_for(tmp_path, stdlib_data, "train.steps=3", "train.eval_interval=3", "train.debug_nan_step=2",
                    "checkpoint.interval=2", "checkpoint.async_save=false"))
    assert not (tmp_path / "checkpoints" / "step_00000002" / ckpt.MANIFEST).exists()


def test_wandb_offline_writes_its_files_and_never_the_api_key(tmp_path, stdlib_data, monkeypatch, capfd):
    key = "moeforgetestkey" + "0123456789abcdef" * 2  # 47 characters; never a real key
    monkeypatch.setenv("WANDB_API_KEY", key)
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home"))
    run_dir = tmp_path / "run"
    run(cfg_for(run_dir, stdlib_data, "logging=wandb", "logging.progress=false", "logging.wandb_mode=offline",
                "train.steps=2", "train.eval_interval=2"))
    files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1 and files[0].stat().st_size > 0
    data = files[0].read_bytes()
    assert b"moe_load_max_over_mean/layer_mtp0" in data and b"grad_norm" in data
    out = capfd.readouterr()
    assert key not in out.out and key not in out.err
    leaks = [p for p in tmp_path.rglob("*") if p.is_file() and key.encode() in p.read_bytes()]
    assert leaks == []
