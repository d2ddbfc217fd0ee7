"""Blockwise FP8 (emulated) against BF16 training on the same data and seed: issue 5's loss criterion,
CI-sized, with the report's optimizer (FP32 master weights, BF16 AdamW moments) in both runs.

Both runs are tiny with model.dtype=bfloat16; the FP8 run adds fp8=blockwise, so the only difference is
that the 137 recipe Linears run their three GEMMs in E4M3. What a 2-core CI can resolve, and how:
- The loss curve, averaged step by step over the 40 steps (every step sees the same batch in both
  runs): within 0.5% of BF16, the issue's bound on the statistic a 40-step run resolves. Measured on
  seeds 0/1/2: +0.015% / -0.228% / +0.034%; the floor, BF16 against itself with only micro-batching
  changed (train.micro_batch_size=4), -0.11% / -0.13% / -0.01%. The 300-step criterion of docs/fp8.md
  "Loss vs BF16" (final validation loss) has a floor of 0.5-2.5% per seed and is measured by
  bench/fp8_loss.py (lr 1e-3: FP8 +1.1% +- 0.4% over 3 seeds, not resolved; lr 3e-4, floor 0.1-0.55%:
  within 0.5% on all 3 seeds), not asserted here.
- The final validation loss: within 2%, not 0.5%. One run's final loss on tiny is chaotic (router
  collapse and recovery, loss spikes at 256 tokens per step), so a single value moves by about 1%
  under any perturbation. Measured FP8: +1.25% / -0.59% / +0.27%; floor -0.26% / +0.25% / -0.14%.
- The loss alone cannot show that the recipe is right: with every 128x128 weight scale doubled
  (Fprop and Dgrad outputs 2x) the 40-step mean moved only +0.37% and the last 5 steps +0.02%
  (pre-norm blocks and Adam absorb a uniform scale; checked 2026-11-29). So the FP8 model's GEMMs are
  also checked in place: one forward/backward, every Fp8Linear reached by a module call (attention,
  dense and shared-expert FFNs; the routed experts run grouped), its Fprop, Dgrad and Wgrad against
  FP32 products of the same operands: 3.5-3.8% relative error (E4M3 rounding), asserted in [1%, 4.5%].
  A 2x scale error gives 100%; BF16 passthrough gives < 1%. Wgrad is asserted < 5.5%: with the FP8
  activation cache (fp8.cache_fp8_activations, the default) its X operand is Fprop's 1x128 tiles
  requantized 128x1, i.e. rounded twice without power-of-2 scales (3.6% instead of 2.6% on X, so
  sqrt(3.6^2 + 2.6^2) = 4.4% expected); measured 2.7-4.47% over the 32 Linears (wo, which keeps its BF16
  input, is the 2.7%), 2.6-3.7% with the old saving (fp8.cache_fp8_activations=false), 2.9-3.9% with the
  cache and fp8.power_of_2_scales=true (exact conversion). With the caches on, seed 0 measured the 40-step
  mean loss -0.37% / +0.28% and the final validation loss +0.35% / +0.50% vs BF16 (two runs 2026-12-02, the
  BF16 run itself moved between them with other changes to the tree).
The few-hundred-step measurement (3 seeds x 300 steps, BF16, FP8 and the FP32 floor) is
bench/fp8_loss.py, with its figures in docs/fp8.md."""
import logging

import pytest
import torch

from moeforge.fp8.linear import Fp8Linear
from moeforge.launcher.config import load_job_config
from moeforge.train.checkpoint import saved_tensors
from moeforge.train.build import build_model
from moeforge.train.loop import run
from moeforge.train.metrics import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")  # FP8 emulation: many small GEMMs

# on the byte tokenizer, where every figure above was measured (tiny's default is now a 4,096-id BPE)
COMMON = ["data.tokenizer=bytes", "model.vocab_size=257", "model.dtype=bfloat16", "train.moment_dtype=bfloat16", "train.steps=40", "train.lr=2e-3",
          "train.warmup_steps=10", "train.seq_len=32", "train.global_batch_size=8", "train.micro_batch_size=8",
          "train.eval_interval=40", "train.eval_batches=8", "train.sample_tokens=0", "logging.progress=false",
          "checkpoint.resume=never"]


def fp8_gemm_errors(cfg) -> dict[str, tuple[float, float, float]]:
    """{Linear: relative Frobenius error of its Fprop, Dgrad, Wgrad} in one forward/backward of the FP8
    model, each against the FP32 product of the operands that Linear actually saw."""
    model = build_model(cfg, torch.device("cpu"))
    lins = {n: m for n, m in model.named_modules() if isinstance(m, Fp8Linear)}
    seen: dict[str, list[torch.Tensor]] = {}
    for n, m in lins.items():
        m.register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, [i[0].detach(), o.detach()]))
        m.register_full_backward_hook(lambda m, gi, go, n=n: seen[n].extend([go[0].detach(), gi[0].detach()]))
    tokens = torch.randint(0, cfg.model.vocab_size, (8, 32), generator=torch.Generator().manual_seed(0))
    logits, _ = model(tokens)
    torch.nn.functional.cross_entropy(logits.float().flatten(0, 1)[:-1], tokens.flatten()[1:]).backward()

    def rel(a, ref):
        return ((a.float() - ref).norm() / ref.norm()).item()

    out = {}
    for n, m in lins.items():
        if len(seen.get(n, ())) == 4:
            x, y, dy, dx = (t.reshape(-1, t.shape[-1]).float() for t in seen[n])
            w = m.weight.detach().float()
            out[n] = (rel(y, x @ w.T), rel(dx, dy @ w), rel(m.weight.grad, dy.T @ x))
    return out


@pytest.mark.timeout(900)
def test_fp8_blockwise_tracks_bf16_on_the_same_data_and_seed(tmp_path, stdlib_data, caplog):
    out = {}
    for fp8 in ("off", "blockwise"):
        with caplog.at_level(logging.INFO, logger="moeforge.fp8"):
            s = run(load_job_config([f"data.dir={stdlib_data}", f"run_dir={tmp_path / fp8}", f"fp8={fp8}", *COMMON]))
        losses = [r["loss"] for r in read_metrics(tmp_path / fp8 / "metrics.jsonl")]
        assert len(losses) == 40 and losses[-1] < losses[0] - 1.5, (fp8, losses[0], losses[-1])
        out[fp8] = (s["val_loss"], sum(losses) / len(losses), s["checkpoint"])
        # the optimizer the report describes: BF16 weights for compute, FP32 master copy, BF16 moments
        index = saved_tensors(s["checkpoint"])
        dtypes = {key.split(".")[1] if key.startswith("optim.") else key.split(".")[0]: dt
                  for key, (_, dt) in index.items() if key.endswith("wkv_b.weight") or "wkv_b.weight[" in key}
        assert dtypes == {"model": torch.bfloat16, "master": torch.float32,
                          "exp_avg": torch.bfloat16, "exp_avg_sq": torch.bfloat16}, dtypes
    swaps = [r.getMessage() for r in caplog.records if "Fp8Linear" in r.getMessage()]
    assert len(swaps) == 1 and "backend=emulate, 137 nn.Linear -> Fp8Linear" in swaps[0], swaps
    (v_bf16, curve_bf16, _), (v_fp8, curve_fp8, _) = out["off"], out["blockwise"]
    print(f"val {v_bf16:.4f} vs fp8 {v_fp8:.4f} ({(v_fp8 / v_bf16 - 1) * 100:+.3f}%); "
          f"mean loss over 40 steps {curve_bf16:.4f} vs {curve_fp8:.4f} ({(curve_fp8 / curve_bf16 - 1) * 100:+.3f}%)")
    assert v_fp8 != v_bf16  # FP8 really ran
    # ... with the recipe's numerics: every GEMM within E4M3 rounding of the exact product (a wrong scale,
    # which the loss hardly sees, gives ~100%)
    errs = fp8_gemm_errors(load_job_config([f"data.dir={stdlib_data}", "fp8=blockwise", *COMMON]))
    assert len(errs) >= 30, sorted(errs)
    worst = {g: max((e[k], n) for n, e in errs.items()) for k, g in enumerate(("fprop", "dgrad", "wgrad"))}
    best = {g: min((e[k], n) for n, e in errs.items()) for k, g in enumerate(("fprop", "dgrad", "wgrad"))}
    print(f"GEMM errors over {len(errs)} Fp8Linears: worst {worst}, best {best}")
    bound = {"fprop": 0.045, "dgrad": 0.045, "wgrad": 0.055}  # Wgrad's X rounded twice (module docstring)
    assert all(worst[g][0] < bound[g] for g in bound) and all(e > 0.01 for e, _ in best.values()), (worst, best)
    assert curve_fp8 == pytest.approx(curve_bf16, rel=0.005)
    assert v_fp8 == pytest.approx(v_bf16, rel=0.02)
