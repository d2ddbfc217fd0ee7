"""The EMA of the parameters (train.ema_decay) survives a kill: saved with the model, loaded on resume.

- kill -9 of a single-process run at a random step after its first whole checkpoint, then the same
  command again: the final checkpoint (model, optimizer, RNG and every ema.<fqn>) is bit for bit the
  uninterrupted run's.
- A checkpoint saved with train.ema_decay=0 resumes into a run with an EMA: a log line says the EMA
  starts from the checkpoint's parameters, and the EMA after two more steps is the float64 recurrence
  started there (FP32 tolerance: tests/unit/test_ema.py).
"""
import os
import random
import signal

import pytest
import torch
from test_resume import Job, run_job

from moeforge.train import checkpoint as ckpt

STEPS = 6
ARGS = ["train.seq_len=32", "train.global_batch_size=4", "train.micro_batch_size=4", "train.sample_tokens=0",
        "logging.progress=false", "train.eval_interval=100", "train.eval_batches=1", f"train.steps={STEPS}",
        "train.ema_decay=0.9"]


def _args(run_dir, data, *extra):
    return ["train", f"data.dir={data}", f"run_dir={run_dir}", *ARGS, *extra]


@pytest.mark.timeout(600)
def test_kill9_then_rerun_gives_the_uninterrupted_ema(tmp_path, stdlib_data):
    ref = tmp_path / "ref"
    ref.mkdir()
    run_job(_args(ref, stdlib_data), ref)
    k = random.randint(2, 4)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    args = _args(run_dir, stdlib_data, "checkpoint.interval=2")
    job = Job(args, run_dir, 300)
    try:
        job.wait_for_step(k)
        job.wait_for_checkpoint()
        os.kill(job.child(), signal.SIGKILL)
        assert job.wait() in (-signal.SIGKILL, 128 + signal.SIGKILL)
    finally:
        job.close()
    killed_at = job.steps_logged()
    assert k <= killed_at < STEPS, (k, killed_at)
    out = run_job(args, run_dir)
    assert "moeforge: resumed from" in out and "holds no EMA" not in out, out[-3000:]
    final = f"checkpoints/step_{STEPS:08d}"
    sa, sb = ckpt.load(ref / final), ckpt.load(run_dir / final)
    assert sa.keys() == sb.keys()
    ema = [k for k in sa if k.startswith("ema.")]
    assert len(ema) == sum(1 for k in sa if k.startswith("model.") and not k.endswith("gate.bias"))
    differ = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not differ, differ[:10]
    assert not torch.equal(sa[ema[0]], sa["model." + ema[0][4:]])  # the EMA is not the live weights


def test_checkpoint_without_ema_resumes_into_an_ema_run(tmp_path, stdlib_data, capsys, one_thread):
    from moeforge.launcher.config import load_job_config
    from moeforge.train.trainer import Trainer

    def cfg(*extra):
        return load_job_config([f"data.dir={stdlib_data}", f"run_dir={tmp_path}", *ARGS, *extra])

    tr = Trainer(cfg("train.ema_decay=0"))
    tr.train_step()
    path = tr.save(tmp_path / "plain")
    assert not [k for k in ckpt.saved_tensors(path) if k.startswith("ema.")]
    capsys.readouterr()
    tr = Trainer(cfg(f"checkpoint.resume={path}"))
    assert tr.resume() == 1
    assert f"checkpoint: {path} holds no EMA" in capsys.readouterr().out
    named = [(n, p) for n, p in tr.model.named_parameters() if p.requires_grad]
    saved = ckpt.read_tensors(path, [f"model.{n}" for n, _ in named])
    ref = {n: saved[f"model.{n}"].double() for n, _ in named}  # the EMA starts from the loaded parameters
    assert all(torch.equal(tr.ema.state_dict()[n], saved[f"model.{n}"]) for n, _ in named)
    for _ in range(2):
        tr.train_step()
        for n, p in named:
            ref[n] = 0.9 * ref[n] + 0.1 * p.detach().double()
    tol = 4 * 2 * 2.0 ** -24 * max(float(p.detach().abs().max()) for _, p in named)
    sd = tr.ema.state_dict()
    for n, r in ref.items():
        torch.testing.assert_close(sd[n].double(), r, rtol=0, atol=tol)
    # and the other way: a checkpoint with an EMA resumes into a run without one (ignored, said so)
    path2 = tr.save(tmp_path / "with_ema")
    capsys.readouterr()
    tr = Trainer(cfg("train.ema_decay=0", f"checkpoint.resume={path2}"))
    assert tr.resume() == 3 and tr.ema is None
    assert "train.ema_decay=0, so it is not loaded" in capsys.readouterr().out
