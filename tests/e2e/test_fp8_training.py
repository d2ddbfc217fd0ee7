"""Blockwise FP8 (emulated on CPU) against high precision on the same data and seed.

TR §3.3 reports < 0.25% relative loss error at scale. The tiny model does NOT reach that yet:
measured 2026-11-29, 200 steps at seq 64, fp8=blockwise ends +6.3% above fp8=off (FP32) in validation
loss (2.641 vs 2.484), while both are still falling fast. Every FP8 GEMM carries ~3.7% relative error
(3 mantissa bits on both operands), and a 1.1M-parameter model with 64-wide layers early in training
has no averaging to hide it. The issue's 0.5% goal is open. This CI-sized test (60 steps, seq 32;
measured +0.22% val, -0.002% train) pins the early-training agreement within 2% and checks that FP8
training learns (the loss falls from ~5.5 at the start)."""
import pytest

from launcher.config import load_job_config
from train.loop import run
from train.metrics import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")  # FP8 emulation: many small GEMMs

COMMON = ["train.steps=60", "train.seq_len=32", "train.global_batch_size=8", "train.micro_batch_size=8",
          "train.eval_interval=60", "train.eval_batches=4", "train.sample_tokens=0", "logging.progress=false"]


@pytest.mark.timeout(900)
def test_fp8_blockwise_trains_within_measured_gap_of_high_precision(tmp_path, stdlib_data):
    out = {}
    for fp8 in ("off", "blockwise"):
        s = run(load_job_config([f"data.dir={stdlib_data}", f"run_dir={tmp_path / fp8}", f"fp8={fp8}", *COMMON]))
        losses = [r["loss"] for r in read_metrics(tmp_path / fp8 / "metrics.jsonl")]
        assert losses[-1] < losses[0] - 1.5, (fp8, losses[0], losses[-1])
        tail = losses[-20:]
        out[fp8] = (s["val_loss"], sum(tail) / len(tail))
    (v_hi, t_hi), (v_fp8, t_fp8) = out["off"], out["blockwise"]
    print(f"val {v_hi:.4f} vs fp8 {v_fp8:.4f} ({(v_fp8 / v_hi - 1) * 100:+.3f}%); "
          f"train(last 20) {t_hi:.4f} vs {t_fp8:.4f} ({(t_fp8 / t_hi - 1) * 100:+.3f}%)")
    assert v_fp8 != v_hi  # FP8 really ran
    assert v_fp8 == pytest.approx(v_hi, rel=0.02)
    assert t_fp8 == pytest.approx(t_hi, rel=0.02)
