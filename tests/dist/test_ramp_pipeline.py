"""A batch-size ramp through the pipeline and a resume at another dp, with real ranks.

4 gloo ranks (DualPipeV over pp 2 x dp 2, ep 2; `moeforge launch`) train 6 steps whose global batch ramps
8, 8, 12, 16, 16, 16 (each rank's schedule is rebuilt for 4, 6 and 8 micro-batches) and must match the
single process on the same samples within 1e-6 relative (fp32: only the summation order differs,
tests/dist/test_train_equivalence.py). Then one process (dp 1) resumes the 4-rank run's step-3 checkpoint:
its data position is the checkpoint's consumed samples, so steps 4-6 read the same samples and give the
4-rank run's losses.
"""
import os
import subprocess
import sys

import pytest

from moeforge.launcher.config import load_job_config
from moeforge.train.loop import run
from moeforge.train.metrics import read_metrics

COMMON = ["train.steps=6", "train.seq_len=16", "train.global_batch_size=16", "train.micro_batch_size=1",
          "train.batch_ramp={start: 8, increment: 4, ramp_samples: 24}", "train.eval_interval=6",
          "train.eval_batches=1", "train.sample_tokens=0", "logging.progress=false", "checkpoint.interval=3"]
RAMP = [8, 8, 12, 16, 16, 16]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.timeout(900)
def test_ramp_through_the_pipeline_and_resume_at_another_dp(tmp_path, stdlib_data):
    single = tmp_path / "single"
    run(load_job_config([f"data.dir={stdlib_data}", f"run_dir={single}", *COMMON]))
    one = read_metrics(single / "metrics.jsonl")
    assert [r["global_batch_size"] for r in one] == RAMP

    four_dir = tmp_path / "four"
    out = subprocess.run([sys.executable, "-m", "moeforge.launcher.cli", "launch", "--nproc-per-node", "4",
                          f"data.dir={stdlib_data}", f"run_dir={four_dir}", "parallel.timeout_s=120", *COMMON,
                          "parallel.pp=2", "parallel.ep=2", "schedule=dualpipev"],
                         capture_output=True, text=True, timeout=600, env=ENV)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    four = read_metrics(four_dir / "metrics.jsonl")
    assert [r["global_batch_size"] for r in four] == RAMP
    for a, b in zip(one, four):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6), a["step"]

    resumed_dir = tmp_path / "resumed"
    run(load_job_config([f"data.dir={stdlib_data}", f"run_dir={resumed_dir}", *COMMON,
                         f"checkpoint.resume={four_dir / 'checkpoints' / 'step_00000003'}"]))
    resumed = read_metrics(resumed_dir / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [4, 5, 6]
    assert [r["consumed_samples"] for r in resumed] == [r["consumed_samples"] for r in four[3:]] == [44, 60, 76]
    for a, b in zip(four[3:], resumed):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6), a["step"]
