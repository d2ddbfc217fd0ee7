"""The data position is the number of samples consumed: resuming, resharding and a batch-size ramp all read
each sample index once; the ramp's batches, micro-batches and LR schedule (pure, no processes)."""
import pytest

from moeforge.launcher.config import load_job_config
from moeforge.train.batches import BatchSchedule, rank_samples
from moeforge.train.build import batch_split, check_layout
from moeforge.train.config import BatchRamp, TrainConfig
from moeforge.train.optim import lr_at, run_samples

RAMP = BatchRamp(start=4, increment=4, ramp_samples=480)  # conf/train/default.yaml's shape, tiny's scale


def read(schedule: BatchSchedule, steps: int, dp: int, consumed: int = 0) -> tuple[list[int], int]:
    """(the sample indices `steps` steps read at `dp` ranks, rank by rank within a step; the samples
    consumed after them: all a checkpoint keeps of the data position)."""
    seen = []
    for b in schedule.batches(steps, consumed):
        for r in range(dp):
            seen += list(rank_samples(consumed, b, r, dp))
        consumed += b
    return seen, consumed


@pytest.mark.parametrize("ramp", [None, RAMP])
def test_resume_and_reshard_read_every_sample_once_in_the_same_order(ramp):
    s = BatchSchedule(16, ramp)
    whole, _ = read(s, 120, dp=4)
    assert whole == list(range(s.consumed_after(120)))  # each index once, none skipped
    first, c = read(s, 50, dp=4)
    rest, _ = read(s, 70, dp=2, consumed=c)  # killed after step 50, resumed at dp 2
    assert first + rest == whole
    a, c = read(s, 7, dp=1)
    b, c = read(s, 70, dp=4, consumed=c)
    rest, _ = read(s, 43, dp=2, consumed=c)
    assert a + b + rest == whole


def test_ramp_changes_the_batch_at_the_planned_steps():
    """16 sequences reached from 4 by +4 over 480 samples: +4 every 160 samples, so 40 steps of 4 (160
    samples), 20 of 8 (320), 14 of 12 (488 >= 480), then 16 (Megatron's rampup_batch_size arithmetic)."""
    s = BatchSchedule(16, RAMP)
    batches = list(s.batches(100))
    assert batches == [4] * 40 + [8] * 20 + [12] * 14 + [16] * 26
    assert s.sizes(100) == [4, 8, 12, 16] and s.sizes(50) == [4, 8, 16] and BatchSchedule(16).sizes(9) == [16]
    assert s.consumed_after(100) == sum(batches) and s.consumed_after(30) == 120
    assert list(s.batches(3, consumed=476)) == [12, 16, 16]  # a resumed run continues the ramp where it was


def test_lr_schedule_runs_on_samples():
    t = TrainConfig(steps=100, global_batch_size=16, warmup_steps=10, decay_start=0.5)
    # without a ramp the sample schedule is the step schedule exactly (same floats)
    assert [lr_at(s, 16 * s, t) for s in range(100)][10:50] == [t.lr] * 40
    assert lr_at(99, 16 * 99, t) == t.lr * t.min_lr_ratio + (t.lr - t.lr * t.min_lr_ratio) * 0.5 * (
        1 + __import__("math").cos(__import__("math").pi * 49 / 50))
    r = TrainConfig(steps=100, global_batch_size=16, warmup_steps=10, decay_start=0.5, batch_ramp=RAMP)
    total = run_samples(r)
    assert total == BatchSchedule(16, RAMP).consumed_after(100) < 1600
    assert lr_at(0, 0, r) == r.lr / 10  # warmup in steps, as the report's first 2K steps
    decay_from = int(0.5 * total / 16) * 16  # half the run's samples, in whole batches of 16
    assert lr_at(60, decay_from - 1, r) == r.lr and lr_at(60, decay_from + 16, r) < r.lr
    assert lr_at(99, total, r) == pytest.approx(r.lr * r.min_lr_ratio)


def test_the_whole_ramp_is_checked_before_start():
    ramp = ["train.batch_ramp={start: 4, increment: 4, ramp_samples: 480}"]
    cfg = load_job_config(ramp)
    assert cfg.train.batch_ramp == RAMP
    assert batch_split(cfg.train, dp=1) == (2, 8)  # one micro-batch size for 4, 8, 12 and 16 sequences
    assert batch_split(cfg.train, dp=2) == (1, 8)
    with pytest.raises(ValueError, match=r"train.batch_ramp: the global batch 4 gives 1 micro-batches per rank .*"
                                         r"schedule=dualpipev"):
        check_layout(load_job_config(["experiment=cpu4", *ramp]), 4, 4)  # the README's layout: micro-batch 2, dp 2
    with pytest.raises(ValueError, match=r"train.batch_ramp: the global batch 6 \(of \[6, 8, 10, 12, 14, 16\]\) must "
                                         r"be a multiple of train.micro_batch_size\*dp = 2\*2"):
        check_layout(load_job_config(["experiment=cpu4",
                                      "train.batch_ramp={start: 6, increment: 2, ramp_samples: 480}"]), 4, 4)
    with pytest.raises(ValueError, match="train.batch_ramp"):
        load_job_config(["train.batch_ramp={start: 4, increment: 5, ramp_samples: 480}"])
    with pytest.raises(ValueError, match="rampup|ramp_sampels|not in 'BatchRamp'"):
        load_job_config(["train.batch_ramp={start: 4, increment: 4, ramp_sampels: 480}"])


def test_the_planner_checks_and_prices_the_ramp():
    from moeforge.launcher.plan import evaluate, load_plan_config, render

    base = ["model=tiny", "parallel.pp=2", "parallel.ep=2", "cluster.gpu=h800", "cluster.nodes=1",
            "train.seq_len=128", "train.global_batch_size=64", "train.micro_batch_size=2"]  # dp 4: 8 micro-batches
    cfg, cluster, _ = load_plan_config([*base, "train.batch_ramp={start: 16, increment: 16, ramp_samples: 960}"])
    with pytest.raises(ValueError, match=r"train.batch_ramp: the global batch 16 gives 2 micro-batches per pipeline"):
        evaluate(cfg, cluster, chosen="dualpipev")  # DualPipeV needs 2 x pp = 4
    cfg, cluster, _ = load_plan_config([*base, "train.batch_ramp={start: 32, increment: 16, ramp_samples: 960}"])
    p = evaluate(cfg, cluster, chosen="dualpipev")
    r = p.ramp
    assert r.sizes == [32, 48, 64] and r.first.n_micro == 4
    assert r.samples == sum(BatchSchedule(64, cfg.train.batch_ramp).batches(r.steps))
    assert r.first.best.step < p.best.step and r.gpu_hours > 0
    assert "batch ramp (train.batch_ramp, dualpipev): 32 -> 64 sequences" in render(p)
