"""Grouped FP8 GEMMs (fp8/grouped.py) and fused quantizers (fp8/fused.py) on one GPU: correctness first,
then TFLOP/s and GB/s, a short table last.

    python bench/grouped_gemm.py [--json PATH] [--smoke]

1. Correctness (seconds): Triton grouped Fprop/Dgrad/Wgrad vs the per-group reference GEMM; the fused
   quantizers vs their torch twins; one expert layer, Triton grouped vs emulate.
2. Grouped GEMM TFLOP/s (useful FLOPs: the real rows, not the padding) on DeepSeek-V3 expert shapes
   (8 local experts x 4096 rows, DeepGEMM's m-grouped contiguous benchmark; balanced and ragged row
   counts) and the `small` model's (32 experts): the Triton m-grouped GEMM (best of 2 tile configs) next
   to the dense Triton FP8 GEMM over the same total rows (goal: grouped >= 0.85x dense), torch bf16
   matmul over the same rows, and torch._grouped_mm in bf16 where it runs; the k-grouped Wgrad next to
   the dense Wgrad GEMM.
3. Fused quantizers, GB/s (bytes read + written) next to a device copy (goal: >= 85%), and the time of
   the unfused sequence they replace.
4. One MoE expert layer of `small` (32 SwiGLU experts, D=1024, I=512, 64K routed rows), forward +
   backward: grouped Triton vs the Fp8Linear loop (Triton) vs a BF16 loop, ms.
--smoke: tiny shapes, one repetition; runs on CPU under TRITON_INTERPRET=1 (checks the script itself).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moeforge.fp8 import Fp8Config, apply_fp8  # noqa: E402
from moeforge.fp8 import reference as R  # noqa: E402
from fp8_gemm import log, rel, time_ms  # noqa: E402  (bench/ is sys.path[0] when run as a script)

M_CONFIGS = [dict(BLOCK_M=128, BLOCK_N=128, GROUP_M=8, num_warps=8, num_stages=3),
             dict(BLOCK_M=128, BLOCK_N=256, GROUP_M=8, num_warps=8, num_stages=3)]
# (name, experts, rows per expert, N, K)
SHAPES = [("V3 up (w1|w3)", 8, 4096, 4096, 7168), ("V3 down (w2)", 8, 4096, 7168, 2048),
          ("small w1", 32, 2048, 512, 1024), ("small w2", 32, 2048, 1024, 512)]
SMOKE_SHAPES = [("smoke", 3, 100, 128, 256)]
QUANT_ROWS, QUANT_DIM, SWIGLU_DIM = 16384, 7168, 2048


class Timer:
    def __init__(self, dev: str, smoke: bool):
        self.cuda, self.smoke = dev == "cuda", smoke

    def ms(self, fn, warmup: int = 3, reps: int = 10) -> float:
        if self.smoke:
            warmup, reps = 0, 1
        if self.cuda:
            return time_ms(fn, warmup, reps)  # CUDA events, median (bench/fp8_gemm.py)
        for _ in range(warmup):
            fn()
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t) / reps * 1e3


def counts_for(G: int, m: int, ragged: bool, seed: int = 0) -> list[int]:
    if not ragged:
        return [m] * G
    g = torch.Generator().manual_seed(seed)
    return (m * (0.5 + torch.rand(G, generator=g))).long().tolist()  # mean m, not multiples of 128


def correctness(dev: str, smoke: bool) -> dict:
    from moeforge.fp8 import fused
    from moeforge.fp8 import grouped as Gm

    out = {}
    g = torch.Generator(device=dev).manual_seed(0)
    G, m, N, K = (3, 100, 136, 200) if smoke else (8, 700, 2048, 7168)
    L = Gm.GroupedLayout.build(counts_for(G, m, True), dev)
    x, dy = torch.randn(L.m, K, generator=g, device=dev), torch.randn(L.m, N, generator=g, device=dev)
    qs = [R.weight_quant(torch.randn(N, K, generator=g, device=dev)) for _ in range(G)]
    wq, ws = torch.stack([q for q, _ in qs]), torch.stack([s for _, s in qs])
    xq, xs = R.act_quant(L.pad(x))
    dq, ds = R.act_quant(L.pad(dy))
    for case, fn, ref, args in (
        ("fprop", Gm.gemm_grouped_triton, Gm.gemm_grouped_ref, (xq, xs, wq, ws, L)),
        ("dgrad", Gm.gemm_grouped_triton, Gm.gemm_grouped_ref, (dq, ds, wq.transpose(1, 2), ws.transpose(1, 2), L)),
        ("wgrad", Gm.gemm_wgrad_grouped_triton, Gm.gemm_wgrad_grouped_ref,
         (*R.act_quant_t(L.pad(dy)), *R.act_quant_t(L.pad(x)), L)),
    ):
        e = rel(fn(*args), ref(*args))
        out[f"grouped {case} G={G} N={N} K={K}"] = ok = e < 2e-3
        log(f"[{'PASS' if ok else 'FAIL'}] triton grouped {case}: vs per-group reference {e:.2e} (< 2e-3)")
    if dev == "cuda":  # the interpreter's fp8 / bf16 casts are wrong: the fused quantizers are checked on GPUs only
        xb = x.bfloat16()
        for tr in (False, True):
            q, s = fused.permute_quant(xb, L.src, 128, False, tr)
            qr, sr = fused.permute_quant_ref(xb, L.src, 128, False, tr)
            ok = torch.equal(s, sr.contiguous()) and torch.equal(q.view(torch.uint8), qr.contiguous().view(torch.uint8))
            out[f"permute_quant transposed={tr} bitwise"] = ok
            log(f"[{'PASS' if ok else 'FAIL'}] permute_quant transposed={tr}: scales and codes bitwise")
        h1, h3 = (torch.randn(4096, SWIGLU_DIM, generator=g, device=dev).bfloat16() for _ in range(2))
        (q, s), (qr, sr) = fused.swiglu_quant(h1, h3), fused.swiglu_quant_ref(h1, h3)
        e = rel(R.dequantize(q, s), R.dequantize(qr, sr))
        out["swiglu_quant bf16"] = ok = e < 1e-2
        log(f"[{'PASS' if ok else 'FAIL'}] swiglu_quant bf16: dequantized vs twin {e:.2e} (< 1e-2)")
        w = torch.rand(K, generator=g, device=dev) + 0.5
        (y, q, s), (yr, qr, sr) = fused.rmsnorm_quant(xb, w), fused.rmsnorm_quant_ref(xb, w)
        e = max(rel(y, yr), rel(R.dequantize(q, s), R.dequantize(qr, sr)))
        out["rmsnorm_quant bf16"] = ok = e < 1e-2
        log(f"[{'PASS' if ok else 'FAIL'}] rmsnorm_quant bf16: y and dequantized vs twin {e:.2e} (< 1e-2)")
        res = []
        for backend in ("emulate", "triton"):
            e_ = expert_layer(dev, torch.bfloat16, backend, True, 1024, 512, 32, 300)
            res.append(e_[2]())
        errs = [rel(a, b) for a, b in zip(res[1], res[0])]
        out["expert layer triton vs emulate"] = ok = max(errs) < 2e-2
        log(f"[{'PASS' if ok else 'FAIL'}] expert layer (32 experts, bf16) triton vs emulate: y, dx, dw "
            + ", ".join(f"{e:.1e}" for e in errs) + " (< 2e-2)")
    return out


def _grouped_mm_bf16(a, w_GNK, counts):
    if not hasattr(torch, "_grouped_mm"):
        return None
    offs = torch.tensor(counts, device=a.device).cumsum(0).to(torch.int32)
    b = w_GNK.transpose(1, 2)  # (G, K, N), K-major
    try:
        torch._grouped_mm(a, b, offs=offs)
    except Exception as exc:  # noqa: BLE001 - reported, the column stays empty
        log(f"  torch._grouped_mm unavailable: {type(exc).__name__}: {str(exc)[:120]}")
        return None
    return lambda: torch._grouped_mm(a, b, offs=offs)


def gemm_perf(dev: str, timer: Timer, smoke: bool) -> list[dict]:
    from moeforge.fp8 import grouped as Gm
    from moeforge.fp8 import kernels

    rows = []
    g = torch.Generator(device=dev).manual_seed(1)
    for name, G, m, N, K in SMOKE_SHAPES if smoke else SHAPES:
        for ragged in (False, True):
            counts = counts_for(G, m, ragged, seed=G)
            L = Gm.GroupedLayout.build(counts, dev)
            M = L.m
            flop = 2.0 * M * N * K
            a = torch.randn(M, K, generator=g, device=dev, dtype=torch.bfloat16)
            w = torch.randn(G, N, K, generator=g, device=dev, dtype=torch.bfloat16) * K ** -0.5
            dy = torch.randn(M, N, generator=g, device=dev, dtype=torch.bfloat16)
            row = {"shape": name, "G": G, "rows": "ragged" if ragged else "equal", "M": M, "M_pad": L.m_pad,
                   "N": N, "K": K}
            row["bf16_tflops"] = flop / timer.ms(lambda: a @ w[0].t()) / 1e9  # one dense matmul, same FLOPs
            gmm = _grouped_mm_bf16(a, w, counts) if dev == "cuda" else None
            if gmm is not None:
                row["bf16_grouped_mm_tflops"] = flop / timer.ms(gmm) / 1e9
            aq, as_ = R.act_quant(L.pad(a))
            wq, ws = Gm._weight_quant_triton(list(w), 128, False)
            dq, ds = R.act_quant(a)
            best_g = best_d = 0.0
            for cfg in M_CONFIGS[:1] if smoke else M_CONFIGS:
                try:
                    best_g = max(best_g, flop / timer.ms(
                        lambda: Gm.gemm_grouped_triton(aq, as_, wq, ws, L, 128, torch.bfloat16, config=cfg)) / 1e9)
                    best_d = max(best_d, flop / timer.ms(
                        lambda: kernels.gemm(dq, ds, wq[0], ws[0], 128, torch.bfloat16, config=cfg)) / 1e9)
                except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory for a config
                    log(f"  config {cfg} failed: {type(exc).__name__}: {str(exc)[:120]}")
            row["fp8_grouped_tflops"], row["fp8_dense_tflops"] = best_g, best_d
            at = [t.contiguous() for t in R.act_quant_t(L.pad(dy))]  # the layout the Triton quantizers write
            bt = [t.contiguous() for t in R.act_quant_t(L.pad(a))]
            row["wgrad_grouped_tflops"] = flop / timer.ms(lambda: Gm.gemm_wgrad_grouped_triton(*at, *bt, L)) / 1e9
            at_d, bt_d = ([t.contiguous() for t in R.act_quant_t(v)] for v in (dy, a))
            row["wgrad_dense_tflops"] = flop / timer.ms(lambda: kernels.gemm(*at_d, *bt_d, 128, torch.float32)) / 1e9
            if best_d:
                row["grouped_vs_dense"] = best_g / best_d
            row["wgrad_grouped_vs_dense"] = row["wgrad_grouped_tflops"] / row["wgrad_dense_tflops"]
            row["grouped_vs_bf16"] = best_g / row["bf16_tflops"]
            log("  " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
            rows.append(row)
            del a, w, dy, aq, wq, at, bt
            if dev == "cuda":
                torch.cuda.empty_cache()
    return rows


def quant_perf(dev: str, timer: Timer, smoke: bool) -> list[dict]:
    from moeforge.fp8 import fused
    from moeforge.fp8 import grouped as Gm
    from moeforge.fp8 import kernels

    T, D, I = (300, 256, 256) if smoke else (QUANT_ROWS, QUANT_DIM, SWIGLU_DIM)
    g = torch.Generator(device=dev).manual_seed(2)
    x = torch.randn(T, D, generator=g, device=dev).bfloat16()
    copy_gbs = 2 * x.numel() * 2 / timer.ms(lambda: x.clone()) / 1e6
    L = Gm.GroupedLayout.build(counts_for(8, T // 8, True), dev)
    L = Gm.GroupedLayout.build(list(L.counts[:-1]) + [T - sum(L.counts[:-1])], dev)  # exactly T rows
    h1, h3 = (torch.randn(T * 2, I, generator=g, device=dev).bfloat16() for _ in range(2))
    w = torch.rand(D, generator=g, device=dev).bfloat16() + 0.5

    def rms_unfused():
        y = F.rms_norm(x.float(), (D,), w.float(), 1e-6).type_as(x)
        return kernels.act_quant(y)

    n, nh = x.numel(), h1.numel()
    cases = [  # (kernel, fused fn, unfused fn, bytes the fused kernel reads + writes)
        ("permute+quant 1x128", lambda: fused.permute_quant(x, L.src), lambda: kernels.act_quant(L.pad(x)),
         2 * n + L.m_pad * D * (1 + 4 / 128)),
        ("permute+quant 128x1 (Wgrad)", lambda: fused.permute_quant(x, L.src, transposed=True),
         lambda: kernels.act_quant_t(L.pad(x)), 2 * n + L.m_pad * D * (1 + 4 / 128)),
        ("swiglu+quant", lambda: fused.swiglu_quant(h1, h3), lambda: kernels.act_quant(F.silu(h1) * h3),
         2 * 2 * nh + nh * (1 + 4 / 128)),
        ("rmsnorm+quant", lambda: fused.rmsnorm_quant(x, w), rms_unfused, 2 * n + 2 * n + n * (1 + 4 / 128)),
        ("act_quant 1x128 (kernels.py)", lambda: kernels.act_quant(x), None, 2 * n + n * (1 + 4 / 128)),
    ]
    rows = [{"kernel": f"copy bf16 {T}x{D}", "impl": "copy", "GB/s": copy_gbs, "vs_copy": 1.0}]
    log(f"  device copy bf16 {T}x{D}: {copy_gbs:.0f} GB/s (read + write)")
    for name, fn, unfused, nbytes in cases:
        t = timer.ms(fn)
        row = {"kernel": name, "impl": "triton" if unfused is None else "triton fused", "ms": t,
               "GB/s": nbytes / t / 1e6, "vs_copy": nbytes / t / 1e6 / copy_gbs}
        if unfused is not None:
            row["unfused_ms"] = timer.ms(unfused)
            row["speedup"] = row["unfused_ms"] / t
        log("  " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        rows.append(row)
    return rows


class _Layer(nn.Module):
    def __init__(self, experts):
        super().__init__()
        self.experts = experts


def expert_layer(dev, dtype, backend, grouped, D, I, G, mean, seed=0):
    """(run fwd+bwd, flops, run returning [y, dx, dw2 of expert 0]) for one layer of G SwiGLU experts."""
    from moeforge.fp8.grouped import apply_grouped_experts
    from moeforge.model.moe import MLP, run_experts

    torch.manual_seed(seed)
    e = nn.ModuleDict({str(i): MLP(D, I, device=dev, dtype=dtype) for i in range(G)})
    for p in e.parameters():
        nn.init.normal_(p, std=D ** -0.5)
    if backend != "bf16":
        cfg = Fp8Config(enabled=True, backend=backend, grouped_experts=grouped)
        apply_fp8(e, cfg)
        apply_grouped_experts(_Layer(e), cfg)
    counts = counts_for(G, mean, True, seed=1)
    g = torch.Generator(device=dev).manual_seed(3)
    xs = torch.randn(sum(counts), D, generator=g, device=dev).to(dtype)
    dy = torch.randn(sum(counts), D, generator=g, device=dev).to(dtype)

    def run():
        x = xs.detach().requires_grad_()
        run_experts(e, x, counts).backward(dy)
        return x

    def outputs():
        e.zero_grad(set_to_none=True)
        x = xs.detach().requires_grad_()
        y = run_experts(e, x, counts)
        y.backward(dy)
        return [y.detach(), x.grad, e["0"].w2.weight.grad]

    return run, 18.0 * sum(counts) * D * I, outputs


def layer_perf(dev: str, timer: Timer, smoke: bool) -> list[dict]:
    D, I, G, mean = (128, 128, 4, 100) if smoke else (1024, 512, 32, 2048)
    rows = []
    variants = [("fp8 grouped (triton)", "triton", True), ("fp8 loop (triton)", "triton", False),
                ("bf16 loop", "bf16", False)]
    if dev != "cuda":
        variants = [("fp8 grouped (emulate)", "emulate", True), ("fp8 loop (emulate)", "emulate", False)]
    for name, backend, grouped in variants:
        dtype = torch.bfloat16 if dev == "cuda" else torch.float32
        run, flop, _ = expert_layer(dev, dtype, backend, grouped, D, I, G, mean)
        t = timer.ms(run, warmup=2, reps=5)
        rows.append({"variant": name, "ms": t, "tflops": flop / t / 1e9})
        log(f"  {name}: {t:.2f} ms fwd+bwd, {flop / t / 1e9:.0f} TFLOP/s ({G} experts, D={D}, I={I}, {G * mean} rows)")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, one rep (CPU: needs TRITON_INTERPRET=1)")
    args = ap.parse_args()
    t0 = time.time()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu" and not (args.smoke and os.environ.get("TRITON_INTERPRET") == "1"):
        log("bench/grouped_gemm.py: no CUDA GPU here, skipping "
            "(TRITON_INTERPRET=1 ... --smoke checks the script on CPU)")
        return
    from moeforge.fp8.gemm import unavailable_reason

    if dev == "cuda" and unavailable_reason("triton"):
        sys.exit(f"bench/grouped_gemm.py: {unavailable_reason('triton')}")
    timer = Timer(dev, args.smoke)
    log(f"== grouped FP8: correctness ({dev}) ==")
    checks = correctness(dev, args.smoke)
    log(f"== grouped GEMM throughput ({time.time() - t0:.0f}s) ==")
    gemm_rows = gemm_perf(dev, timer, args.smoke)
    log(f"== fused quantizers ({time.time() - t0:.0f}s) ==")
    quant_rows = quant_perf(dev, timer, args.smoke)
    log(f"== one MoE expert layer, fwd + bwd ({time.time() - t0:.0f}s) ==")
    layer_rows = layer_perf(dev, timer, args.smoke)

    log("\n== summary (grouped) ==")
    n_ok = sum(checks.values())
    log(f"correctness: {n_ok}/{len(checks)} passed" + "".join(f"\n  FAIL {k}" for k, v in checks.items() if not v))
    log("| shape | G x rows | bf16 | bf16 grouped_mm | fp8 dense | fp8 grouped | grouped/dense | Wgrad dense "
        "| Wgrad grouped | ratio |")
    log("|---|---|---|---|---|---|---|---|---|---|")
    f = lambda r, k: f"{r[k]:.0f}" if r.get(k) else "-"  # noqa: E731
    for r in gemm_rows:
        log(f"| {r['shape']} N={r['N']} K={r['K']} | {r['G']} x {r['M'] // r['G']} {r['rows']} | {f(r, 'bf16_tflops')} "
            f"| {f(r, 'bf16_grouped_mm_tflops')} | {f(r, 'fp8_dense_tflops')} | {f(r, 'fp8_grouped_tflops')} "
            f"| {r.get('grouped_vs_dense', 0):.2f} | {f(r, 'wgrad_dense_tflops')} | {f(r, 'wgrad_grouped_tflops')} "
            f"| {r['wgrad_grouped_vs_dense']:.2f} |")
    if quant_rows:
        log("| fused kernel | GB/s | x copy | ms | unfused ms | speedup |")
        log("|---|---|---|---|---|---|")
        for r in quant_rows:
            log(f"| {r['kernel']} | {r['GB/s']:.0f} | {r['vs_copy']:.2f} | {r.get('ms', 0):.3f} "
                f"| {r.get('unfused_ms', 0):.3f} | {r.get('speedup', 0):.2f} |")
    log("| expert layer fwd+bwd | ms | TFLOP/s |")
    log("|---|---|---|")
    for r in layer_rows:
        log(f"| {r['variant']} | {r['ms']:.2f} | {r['tflops']:.0f} |")
    log(f"total {time.time() - t0:.0f}s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"checks": checks, "gemm": gemm_rows, "quant": quant_rows, "layer": layer_rows,
                       "torch": torch.__version__,
                       "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu"}, fh, indent=1)
    sys.exit(0 if n_ok == len(checks) else 1)


if __name__ == "__main__":
    main()
