"""Pipeline parallelism in `moeforge train`: 4 gloo ranks (torchrun through `moeforge launch`) with
parallel.pp > 1 and each schedule train like the single process, and checkpoints move between layouts.

Every run uses the same global batch (16 sequences of 32 tokens, micro-batches of 2) and seed. The
pipeline computes each micro-batch exactly as the single process does (tests/dist/test_pipeline.py
checks bit equality of one step); what differs is the order of the gradient sums (data-parallel
all-reduce, DualPipe's twin stages, the embedding copy on the last stage), so the weights differ by
float32 rounding after the first step. Tolerance 1e-6 relative on every step's losses and 1e-5 on the
gradient norm, as for data parallelism (tests/dist/test_train_equivalence.py).
"""
import subprocess
import sys

import pytest

from moeforge.launcher.config import load_job_config
from moeforge.train.loop import run
from moeforge.train.trainer import Trainer
from moeforge.train.metrics import read_metrics

STEPS = 8
COMMON = [f"train.steps={STEPS}", "train.seq_len=32", "train.global_batch_size=16", "train.micro_batch_size=2",
          "train.eval_interval=4", "train.eval_batches=2", "train.sample_tokens=4", "logging.progress=false",
          "checkpoint.interval=4", "checkpoint.async_save=false"]


@pytest.fixture(scope="module")
def single(tmp_path_factory, stdlib_data):
    out = tmp_path_factory.mktemp("single")
    summary = run(load_job_config([f"data.dir={stdlib_data}", f"run_dir={out}", *COMMON]))
    return out, read_metrics(out / "metrics.jsonl"), summary


def launch4(run_dir, data, *extra):
    cmd = [sys.executable, "-m", "moeforge.launcher.cli", "launch", "--nproc-per-node", "4",
           f"data.dir={data}", f"run_dir={run_dir}", "parallel.timeout_s=60", *COMMON, *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-4000:]
    return read_metrics(run_dir / "metrics.jsonl"), out


def assert_same_run(a, b, rel=1e-6, first_step=1):
    a = [r for r in a if r["step"] >= first_step]
    assert [r["step"] for r in b] == [r["step"] for r in a] and a
    for x, y in zip(a, b):
        for key in ("loss", "mtp_loss", "aux_loss"):
            assert y[key] == pytest.approx(x[key], rel=rel), (x["step"], key)
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=10 * rel), x["step"]
        if "val_loss" in x:
            assert y["val_loss"] == pytest.approx(x["val_loss"], rel=rel), x["step"]
        # the routing decisions, summed over the whole pipeline (every MoE layer, every rank)
        assert y["expert_load_max_over_mean"] == pytest.approx(x["expert_load_max_over_mean"], rel=1e-12)
        assert y["moe_load_max_over_mean"] == pytest.approx(x["moe_load_max_over_mean"], rel=1e-12)
        assert y["moe_tokens_dropped"] == 0


@pytest.mark.timeout(600)
def test_dualpipev_pp2_ep2_matches_single_process_and_reshards(single, tmp_path, stdlib_data):
    """The README's layout: pp=2 (DualPipeV: 4 stages, rank r holds stages r and 3-r) x dp=2 with ep=2."""
    ref_dir, ref, ref_summary = single
    four, out = launch4(tmp_path, stdlib_data, "parallel.pp=2", "parallel.ep=2", "schedule=dualpipev")
    assert "pp=2 schedule=dualpipev dp=2 ep=2" in out.stdout
    assert_same_run(ref, four)
    assert all(r["time_bubble_s"] >= 0 for r in four)
    # the greedy sample runs through the pipe and picks the single process' tokens
    assert "---- greedy sample ----\n" + ref_summary["sample"] + "\n" in out.stdout
    # pp checkpoint -> one process: same weights, same validation loss
    cfg = load_job_config([f"data.dir={stdlib_data}", f"run_dir={tmp_path / 'one'}", *COMMON])
    t = Trainer(cfg)
    t.load(tmp_path / "checkpoints" / f"step_{STEPS:08d}")
    assert t.step == STEPS
    assert t.evaluate() == pytest.approx(four[-1]["val_loss"], rel=1e-6)


@pytest.mark.timeout(600)
def test_dualpipe_pp4_resumes_from_a_single_process_checkpoint(single, tmp_path, stdlib_data):
    """DualPipe over 4 ranks (stages r and 3-r on rank r, micro-batches from both ends) picks up the single
    process' step-4 checkpoint and trains steps 5..8 as the single process did."""
    ref_dir, ref, _ = single
    resume = ref_dir / "checkpoints" / "step_00000004"
    four, out = launch4(tmp_path, stdlib_data, "parallel.pp=4", "schedule=dualpipe", f"checkpoint.resume={resume}")
    assert "resumed from" in out.stdout and "pp=4 schedule=dualpipe dp=1" in out.stdout
    assert_same_run(ref, four, first_step=5)


@pytest.mark.timeout(600)
def test_zb1p_pp2_with_dp_matches_single_process(single, tmp_path, stdlib_data):
    """ZB1P (deferred weight gradients) with pp=2 x dp=2 and FP8 off; the embedding's copy on the last
    stage (MTP) is summed with stage 0's."""
    _, ref, _ = single
    four, out = launch4(tmp_path, stdlib_data, "parallel.pp=2", "schedule=zb1p")
    assert "pp=2 schedule=zb1p dp=2" in out.stdout
    assert_same_run(ref, four)


def test_bad_schedule_fails_before_any_process_starts(tmp_path, stdlib_data):
    # dualpipev with pp=2 needs >= 4 micro-batches per rank; 16 / dp 2 / 8 gives 1
    cmd = [sys.executable, "-m", "moeforge.launcher.cli", "launch", "--nproc-per-node", "4", "parallel.pp=2",
           "schedule=dualpipev", "train.micro_batch_size=8", f"data.dir={stdlib_data}", f"run_dir={tmp_path}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "schedule=dualpipev" in out.stderr and "train.micro_batch_size" in out.stderr
    assert "torch.distributed.run" not in out.stderr


@pytest.mark.timeout(600)
def test_readme_layout_experiment_cpu4_trains(tmp_path, stdlib_data):
    """The README's first command (experiment=cpu4: DualPipeV pp 2 x dp 2, ep 2, FP8 GEMMs and FP8 dispatch),
    shortened to a few steps: it composes, every part is on, the loss falls and nothing is dropped."""
    cmd = [sys.executable, "-m", "moeforge.launcher.cli", "launch", "--nproc-per-node", "4", "experiment=cpu4",
           f"data.dir={stdlib_data}", f"run_dir={tmp_path}", "parallel.timeout_s=60", "train.steps=6",
           "train.seq_len=32", "train.eval_interval=6", "train.eval_batches=1", "train.sample_tokens=2",
           "logging.progress=false", "train.warmup_steps=2"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=500)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-4000:]
    assert "pp=2 schedule=dualpipev dp=2 ep=2" in out.stdout and "fp8=blockwise/emulate" in out.stdout
    recs = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in recs] == list(range(1, 7))
    assert recs[-1]["loss"] < recs[0]["loss"] - 0.2
    assert all(r["moe_tokens_dropped"] == 0 and r["ep/dispatch_fwd_intra_bytes"] > 0 for r in recs)
    assert "val_loss" in recs[-1] and (tmp_path / "checkpoints" / "step_00000006" / "manifest.json").is_file()
