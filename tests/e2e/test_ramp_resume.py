"""The data position through the real trainer: a batch-size ramp changes the batch (and the micro-batches)
at the planned steps, and a run stopped, checkpointed and resumed continues with the same samples and
losses as the uninterrupted one (the checkpoint holds the samples consumed)."""
import pytest
import torch

from moeforge.launcher.config import load_job_config
from moeforge.train.batches import BatchSchedule
from moeforge.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

RAMP = "train.batch_ramp={start: 4, increment: 2, ramp_samples: 24}"  # 4 until 12 samples, 6 until 24, then 8


def config(tmp_path, data):
    return load_job_config([f"data.dir={data}", f"run_dir={tmp_path}", "logging.progress=false", "train.steps=8",
                            "train.global_batch_size=8", "train.seq_len=16", "train.eval_batches=1", RAMP])


def test_ramp_and_resume_through_the_trainer(tmp_path, stdlib_data):
    cfg = config(tmp_path, stdlib_data)
    planned = list(BatchSchedule.of(cfg.train).batches(8))
    assert planned == [4, 4, 4, 6, 6, 8, 8, 8]
    whole = Trainer(cfg)
    assert whole.micro_batch_size == 2  # one micro-batch size for 4, 6 and 8 sequences: 2, 3, 4 micro-batches
    records = [whole.train_step() for _ in range(8)]
    assert [r["global_batch_size"] for r in records] == planned
    assert [r["consumed_samples"] for r in records] == [sum(planned[:i + 1]) for i in range(8)]
    assert records[-1]["tokens_seen"] == sum(planned) * 16

    first = Trainer(cfg)
    for _ in range(4):
        first.train_step()
    path = first.save(tmp_path / "ckpt")
    resumed = Trainer(cfg)
    resumed.load(path)
    assert (resumed.step, resumed.consumed_samples) == (4, 18)
    assert torch.equal(resumed.train_data.rows(18, 6), whole.train_data.rows(18, 6))
    again = [resumed.train_step() for _ in range(4)]
    assert [r["loss"] for r in again] == [r["loss"] for r in records[4:]]  # bit for bit on CPU
    assert [r["lr"] for r in again] == [r["lr"] for r in records[4:]]
