"""FLOPs/MFU, the spike/NaN rule, MoE load statistics, the finite-state check and the report PNGs."""
import json
import time

import pytest
import torch

from moeforge.model import flops
from moeforge.model.args import ModelArgs, load_preset
from moeforge.model.transformer import Transformer
from moeforge.parallel.zero import ShardedAdamW
from moeforge.train.config import LoggingConfig
from moeforge.train.health import SpikeGuard, model_moe_labels, moe_layer_labels, moe_load_stats, require_finite_state
from moeforge.train.metrics import MetricsLogger, StepTimer, _scalars, device_peak_tflops, read_metrics
from moeforge.train.report import plot_expert_load, plot_run


def test_671b_flops_match_the_report_37b_activated():
    """6·N·tokens for the report's 37B activated parameters (TR: 671B total, 37B activated per token)
    plus causal attention. The 37B is rounded, so N may be anything that rounds to it, [36.5B, 37.5B)
    (our count is 36.6B without the input embedding, a lookup). Attention (QK^T and AV; query t sees t
    keys, T/2 on average) costs 2·H·(d_qk + d_v)·T/2 forward FLOPs per token and layer, x3 with backward."""
    a = load_preset("671b")
    T = 4096
    f = flops.train_flops_per_token(a, T, include_mtp=False)
    attn = 3 * a.n_layers * a.n_heads * T * (a.qk_head_dim + a.v_head_dim)  # 30.7 GFLOP/token at 4K
    lo, hi = 6 * 36.5e9 + attn, 6 * 37.5e9 + attn * (1 + 1 / T)  # (the T+1 keys of an exact causal count)
    assert lo <= f < hi, f"{f / 1e9:.1f} GFLOP/token not in [{lo / 1e9:.1f}, {hi / 1e9:.1f})"
    # MTP adds one more MoE block (plus eh_proj and a second pass through the head), i.e. a few percent
    f_mtp = flops.train_flops_per_token(a, T, include_mtp=True)
    assert 1.01 * f < f_mtp < 1.10 * f, (f, f_mtp)
    # the context enters only through attention, linearly: f(2T) - f(T) = 2 (f(T) - f(T/2))
    f_half, f_double = (flops.train_flops_per_token(a, n, include_mtp=False) for n in (T // 2, 2 * T))
    assert f_double - f == pytest.approx(2 * (f - f_half), rel=1e-3)


def test_peak_table_by_device_name():
    assert device_peak_tflops("NVIDIA H100 80GB HBM3", fp8=False) == pytest.approx(989.4)
    assert device_peak_tflops("NVIDIA H100 80GB HBM3", fp8=True) == pytest.approx(1978.9)
    assert device_peak_tflops("NVIDIA H100 PCIe", fp8=False) == 756.0
    assert device_peak_tflops("NVIDIA H800", fp8=False) == pytest.approx(989.4)
    assert device_peak_tflops("NVIDIA H200", fp8=True) == pytest.approx(1978.9)
    assert device_peak_tflops("NVIDIA H200 NVL", fp8=False) == 835.0
    assert device_peak_tflops("NVIDIA GeForce RTX 4090", fp8=False) is None


def test_non_finite_is_always_skipped_and_spikes_only_when_asked():
    g = SpikeGuard(window=20, zscore=0.0, max_in_row=3)
    assert g.check(2.0, 1.0) is None
    assert "non-finite" in g.check(float("nan"), 1.0)
    assert "non-finite" in g.check(2.0, float("inf"))
    assert g.check(50.0, 1.0) is None  # z-score rule off: a big loss is taken
    assert g.skipped == 2 and g.in_row == 0 and list(g.history) == [2.0, 50.0]

    g = SpikeGuard(window=20, zscore=4.0, max_in_row=3)
    for i in range(9):  # fewer than min(10, window) accepted steps: no z-score yet
        assert g.check(3.0 - 0.01 * i, 1.0) is None
    assert g.check(100.0, 1.0) is None and g.history.pop() == 100.0  # (taken: the window is not full enough)
    for i in range(10):
        assert g.check(3.0 + 0.01 * (i % 3), 1.0) is None
    why = g.check(3.5, 1.0)
    assert why is not None and "loss spike" in why and len(g.history) == 19  # skipped: not added to the window
    assert g.check(2.9, 1.0) is None  # a falling loss is never a spike


def test_too_many_skips_in_a_row_stop_the_run():
    g = SpikeGuard(window=10, zscore=0.0, max_in_row=2)
    g.check(float("nan"), 1.0)
    with pytest.raises(RuntimeError, match="2 steps in a row skipped"):
        g.check(float("nan"), 1.0)
    h = SpikeGuard(window=10, zscore=0.0, max_in_row=5)
    h.load_state_dict(g.state_dict())
    assert h.skipped == 2 and h.in_row == 2


def test_moe_load_stats():
    loads = torch.tensor([[4.0, 4.0, 4.0, 4.0], [10.0, 2.0, 2.0, 2.0]])  # 2 layers, 4 experts, 16 copies each
    s = moe_load_stats(loads, torch.tensor(0.3, dtype=torch.float64), expected_per_layer=16)
    assert s["moe_load_max_over_mean"] == [1.0, 2.5] and s["expert_load_max_over_mean"] == 2.5
    assert s["moe_bias_abs_max"] == pytest.approx(0.3) and s["moe_tokens_dropped"] == 0
    assert moe_load_stats(loads, torch.tensor(0.0), expected_per_layer=18)["moe_tokens_dropped"] == 4


def test_moe_layer_labels_follow_moe_layers_order():
    with torch.device("meta"):
        model = Transformer(ModelArgs(n_layers=3, n_dense_layers=1, n_mtp_modules=1))
    assert moe_layer_labels(model) == ["1", "2", "mtp0"] and len(model.moe_layers()) == 3


def test_step_timer_gives_each_phase_the_time_since_the_previous_mark():
    """Against an independent clock (time.monotonic, read right after each mark): each phase is the
    interval that ended at its mark, a phase marked twice adds up, the step is first to last mark."""
    sleeps = [("compute", 0.06), ("comm", 0.03), ("compute", 0.04), ("optim", 0.08)]
    timer = StepTimer(torch.device("cpu"))
    ticks = [time.monotonic()]
    for phase, s in sleeps:
        time.sleep(s)
        timer.mark(phase)
        ticks.append(time.monotonic())
    r = timer.record()
    want: dict[str, float] = {}
    for (phase, s), a, b in zip(sleeps, ticks, ticks[1:]):
        want[f"time_{phase}_s"] = want.get(f"time_{phase}_s", 0.0) + b - a
    assert sorted(r) == sorted([*want, "step_time_s"])
    for key, seconds in want.items():
        assert r[key] == pytest.approx(seconds, abs=0.01), (key, r)
    assert r["time_compute_s"] >= 0.1 and r["time_comm_s"] >= 0.03 and r["time_optim_s"] >= 0.08
    assert r["step_time_s"] == pytest.approx(ticks[-1] - ticks[0], abs=0.01)


def test_scalars_for_wandb_and_tensorboard():
    rec = {"step": 3, "loss": 2.0, "skipped": True, "skip_reason": "x", "mfu": None, "gpu/xid": [79, 79],
           "moe_load_max_over_mean": [1.5, 2.0], "moe_load": [[1, 2]], "moe_layers": ["1", "mtp0"]}
    assert _scalars(rec, ["1", "mtp0"]) == {"loss": 2.0, "skipped": 1, "gpu/xid": 2,
                                            "moe_load_max_over_mean/layer_1": 1.5,
                                            "moe_load_max_over_mean/layer_mtp0": 2.0}


def test_finite_state_check_refuses_nan_weights_and_moments():
    model = torch.nn.Linear(4, 4)
    opt = ShardedAdamW(list(model.named_parameters()))
    require_finite_state(model, opt, step=1)  # clean: passes
    opt.state_tensors()["dense.exp_avg_sq"][3] = float("inf")
    with pytest.raises(RuntimeError, match=r"refusing to checkpoint step 7.*dense.exp_avg_sq"):
        require_finite_state(model, opt, step=7)
    opt.state_tensors()["dense.exp_avg_sq"].zero_()
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with pytest.raises(RuntimeError, match="weight"):
        require_finite_state(model, opt, step=7)


def test_report_pngs_from_a_metrics_file(tmp_path):
    recs = [{"step": s, "loss": 3.0 - 0.1 * s, "mtp_loss": 3.1 - 0.1 * s, "tokens_per_s": 1000.0 + s,
             "tflops_per_gpu": 0.5, "mfu": 0.4, "expert_load_max_over_mean": 1.5, "moe_bias_abs_max": 0.01 * s,
             "skipped": False} for s in range(1, 6)]
    recs[2].update(loss=None, skipped=True)  # a skipped step: loss NaN, stored as null
    recs[-1].update(val_loss=2.6, moe_layers=["1", "mtp0"], moe_load=[[4, 4, 8, 0], [5, 3, 4, 4]])
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    paths = plot_run(tmp_path)
    assert [p.name for p in paths] == ["loss.png", "throughput.png", "moe_balance.png", "expert_load.png"]
    assert all(p.stat().st_size > 5000 for p in paths)
    assert read_metrics(tmp_path / "metrics.jsonl")[2]["loss"] is None
    out = plot_expert_load(torch.rand(59, 256) * 100, [str(i) for i in range(59)], tmp_path / "h" / "big.png")
    assert out.stat().st_size > 5000


def test_tensorboard_sink_or_a_clear_error(tmp_path):
    cfg = LoggingConfig(tensorboard=True)
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="pip install tensorboard"):
            MetricsLogger(tmp_path, cfg, {})
        return
    m = MetricsLogger(tmp_path, cfg, {})
    m.log({"step": 1, "loss": 2.5, "moe_load_max_over_mean": [1.2]})
    m.close()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert read_metrics(tmp_path / "metrics.jsonl")[0]["loss"] == 2.5


@pytest.mark.parametrize("preset", ["tiny", "16b"])
def test_moe_labels_from_args_match_the_model(preset):
    from moeforge.model.args import load_preset
    from moeforge.model.transformer import Transformer

    args = load_preset(preset)
    with torch.device("meta"):
        model = Transformer(args)
    assert model_moe_labels(args) == moe_layer_labels(model)
