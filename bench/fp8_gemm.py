"""Blockwise FP8 on one GPU: correctness first, then GEMM TFLOP/s and quantizer GB/s.

    python bench/fp8_gemm.py [--json PATH] [--quick]

1. Correctness (seconds): Triton quantizers bitwise vs the torch reference; Triton and cuBLAS GEMMs vs
   the emulate reference (Fprop, Dgrad, Wgrad) and vs float64 on the unquantized inputs.
2. GEMM throughput on DeepSeek-V3 shapes, M = 4096 tokens and (N, K) in {(7168, 2048), (2112, 7168),
   (24576, 1536), (4096, 7168)}, plus 8192^3: Triton (a few tile configs, best kept), cuBLAS blockwise
   (torch scaled_mm, the wrapper's scale-layout work included), and torch bf16 matmul in the same run.
3. Quantizer bandwidth (bytes read + written) next to a device-to-device copy of the same tensor.
A short table comes last. Timing: CUDA events, median of `reps` after warm-up; nothing else runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moeforge.fp8 import reference as R  # noqa: E402
from moeforge.fp8.gemm import get_ops, unavailable_reason  # noqa: E402

GEMM_SHAPES = [(4096, 7168, 2048), (4096, 2112, 7168), (4096, 24576, 1536), (4096, 4096, 7168), (8192, 8192, 8192)]
TRITON_CONFIGS = [
    dict(BLOCK_M=128, BLOCK_N=128, GROUP_M=8, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=128, GROUP_M=8, num_warps=8, num_stages=4),
    dict(BLOCK_M=128, BLOCK_N=256, GROUP_M=8, num_warps=8, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=128, GROUP_M=8, num_warps=4, num_stages=4),
]
CHECK_SHAPES = [(77, 200, 130), (4096, 2048, 7168), (4096, 7168, 2112)]  # (M, K, N)
QUANT_ACT, QUANT_WEIGHT = (4096, 7168), (7168, 2048)
BIG_COPY_BYTES = 1 << 30
DEV = "cuda"


def time_ms(fn, warmup: int = 3, reps: int = 20) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for s, e in ev:
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    t = sorted(s.elapsed_time(e) for s, e in ev)
    return t[len(t) // 2]


def rel(c, ref) -> float:
    return ((c.double() - ref.double()).norm() / ref.double().norm()).item()


def log(msg: str) -> None:
    print(msg, flush=True)


def correctness(backends: dict, quick: bool) -> dict:
    out = {}
    g = torch.Generator(device=DEV).manual_seed(0)
    if "triton" in backends:
        from moeforge.fp8 import kernels

        for name, shape, block, dtype in (
            ("act 1x128", QUANT_ACT, (1, 128), torch.bfloat16),
            ("act 128x1", QUANT_ACT, (128, 1), torch.bfloat16),
            ("weight 128x128", QUANT_WEIGHT, (128, 128), torch.float32),
            ("ragged 1x128", (77, 200), (1, 128), torch.float32),
        ):
            for pow2 in (False, True):
                x = torch.randn(*shape, generator=g, device=DEV).to(dtype)
                qk, sk = kernels.quantize(x, block, pow2)
                qr, sr = R.quantize(x, block, pow2)
                same_s = torch.equal(sk, sr)
                n_diff = int((qk.view(torch.uint8) != qr.view(torch.uint8)).sum())
                ok = same_s and n_diff == 0
                out[f"triton quant {name} pow2={pow2}"] = ok
                log(f"[{'PASS' if ok else 'FAIL'}] triton quant {name} pow2={pow2}: scales bitwise {same_s}, "
                    f"{n_diff} of {qk.numel()} codes differ")
    for (M, K, N) in CHECK_SHAPES[:2] if quick else CHECK_SHAPES:
        a = torch.randn(M, K, generator=g, device=DEV)
        b = torch.randn(N, K, generator=g, device=DEV)
        dy = torch.randn(M, N, generator=g, device=DEV)
        aq, as_ = R.act_quant(a)
        bq, bs = R.weight_quant(b)
        cases = {
            "fprop": ((aq, as_, bq, bs), a.double() @ b.double().t()),
            "dgrad": ((*R.act_quant(dy), bq.t(), bs.t()), dy.double() @ b.double()),
            "wgrad": ((*R.act_quant_t(dy), *R.act_quant_t(a)), dy.double().t() @ a.double()),
        }
        for case, (args, c64) in cases.items():
            emu = R.gemm(*args)
            e_emu = rel(emu, c64)
            for name, ops in backends.items():
                try:
                    c = ops.gemm(*args, 128, torch.float32)
                    r_emu, r64 = rel(c, emu), rel(c, c64)
                    ok = r_emu < 2e-3 and r64 < 0.045
                    msg = f"vs emulate {r_emu:.2e} (< 2e-3), vs float64 {r64:.4f} (emulate {e_emu:.4f}, bound 0.045)"
                except Exception as exc:  # report and go on: the table shows which backend failed
                    ok, msg = False, f"raised {type(exc).__name__}: {exc}"
                out[f"{name} {case} {M}x{K}x{N}"] = ok
                log(f"[{'PASS' if ok else 'FAIL'}] {name:6s} {case} M={M} K={K} N={N}: {msg}")
    return out


def gemm_perf(backends: dict, quick: bool) -> list[dict]:
    rows = []
    g = torch.Generator(device=DEV).manual_seed(1)
    for (M, N, K) in GEMM_SHAPES[:2] if quick else GEMM_SHAPES:
        flop = 2.0 * M * N * K
        a = torch.randn(M, K, generator=g, device=DEV, dtype=torch.bfloat16)
        b = torch.randn(N, K, generator=g, device=DEV, dtype=torch.bfloat16)
        row = {"M": M, "N": N, "K": K}
        row["bf16_tflops"] = flop / time_ms(lambda: a @ b.t()) / 1e9
        aq, as_ = R.act_quant(a)
        bq, bs = R.weight_quant(b)
        if "triton" in backends:
            from moeforge.fp8 import kernels

            best = (0.0, None)
            for cfg in TRITON_CONFIGS:
                try:
                    tf = flop / time_ms(lambda: kernels.gemm(aq, as_, bq, bs, 128, torch.bfloat16, config=cfg)) / 1e9
                except Exception as exc:  # e.g. out of shared memory for a config: skip it
                    log(f"  triton config {cfg} failed: {type(exc).__name__}: {str(exc)[:120]}")
                    continue
                best = max(best, (tf, cfg), key=lambda t: t[0])
            row["triton_tflops"], row["triton_config"] = best
        if "cublas" in backends:
            try:
                row["cublas_tflops"] = flop / time_ms(lambda: backends["cublas"].gemm(aq, as_, bq, bs, 128, torch.bfloat16)) / 1e9
            except Exception as exc:
                log(f"  cublas failed: {type(exc).__name__}: {str(exc)[:200]}")
        for k in ("triton", "cublas"):
            if row.get(f"{k}_tflops"):
                row[f"{k}_vs_bf16"] = row[f"{k}_tflops"] / row["bf16_tflops"]
        log("  " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        rows.append(row)
        del a, b, aq, bq
        torch.cuda.empty_cache()
    return rows


def quant_perf(backends: dict) -> list[dict]:
    rows = []
    g = torch.Generator(device=DEV).manual_seed(2)
    x = torch.randn(*QUANT_ACT, generator=g, device=DEV, dtype=torch.bfloat16)
    w = torch.randn(*QUANT_WEIGHT, generator=g, device=DEV, dtype=torch.float32)
    copy_gbs = 2 * x.numel() * x.element_size() / time_ms(lambda: x.clone()) / 1e6
    big = torch.empty(BIG_COPY_BYTES, dtype=torch.uint8, device=DEV)
    peak_gbs = 2 * big.numel() / time_ms(lambda: big.clone(), reps=10) / 1e6
    del big
    log(f"  device copy: bf16 {QUANT_ACT} {copy_gbs:.0f} GB/s, {BIG_COPY_BYTES >> 20} MiB {peak_gbs:.0f} GB/s (read + write)")
    impls = {"torch": R}
    if "triton" in backends:
        from moeforge.fp8 import kernels

        impls["triton"] = kernels
    for impl, mod in impls.items():
        for name, fn, t in (
            (f"act_quant 1x128 (bf16 {QUANT_ACT})", lambda: mod.act_quant(x), x),
            (f"act_quant_t 128x1 (bf16 {QUANT_ACT})", lambda: mod.act_quant_t(x), x),
            (f"weight_quant 128x128 (fp32 {QUANT_WEIGHT})", lambda: mod.weight_quant(w), w),
        ):
            n = t.numel()
            nbytes = n * t.element_size() + n + 4 * n / (16384 if "weight" in name else 128)
            gbs = nbytes / time_ms(fn) / 1e6
            rows.append({"impl": impl, "kernel": name, "GB/s": gbs, "vs_copy": gbs / copy_gbs})
            log(f"  {impl:6s} {name}: {gbs:.0f} GB/s = {gbs / copy_gbs:.2f} x copy")
    rows.append({"impl": "copy", "kernel": f"clone bf16 {QUANT_ACT}", "GB/s": copy_gbs, "vs_copy": 1.0})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--quick", action="store_true", help="two GEMM shapes, fewer checks")
    args = ap.parse_args()
    t0 = time.time()
    if not torch.cuda.is_available():
        sys.exit("bench/fp8_gemm.py needs a CUDA GPU")
    import importlib.util

    triton_v = __import__("triton").__version__ if importlib.util.find_spec("triton") else "none"
    log(f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton_v}, "
        f"{torch.cuda.get_device_name()} sm{''.join(map(str, torch.cuda.get_device_capability()))}")
    backends = {}
    for name in ("triton", "cublas"):
        reason = unavailable_reason(name)
        if reason is None:
            backends[name] = get_ops(name)
        else:
            log(f"backend {name} unavailable: {reason}")
    log("== correctness ==")
    checks = correctness(backends, args.quick)
    log(f"== GEMM throughput ({time.time() - t0:.0f}s) ==")
    gemm_rows = gemm_perf(backends, args.quick)
    log(f"== quantizer bandwidth ({time.time() - t0:.0f}s) ==")
    quant_rows = quant_perf(backends)

    log("\n== summary ==")
    n_ok = sum(checks.values())
    log(f"correctness: {n_ok}/{len(checks)} passed" + "".join(f"\n  FAIL {k}" for k, v in checks.items() if not v))
    log("| M | N | K | bf16 TFLOP/s | triton TFLOP/s | x bf16 | cublas TFLOP/s | x bf16 |")
    log("|---|---|---|---|---|---|---|---|")
    for r in gemm_rows:
        f = lambda k: f"{r[k]:.0f}" if r.get(k) else "-"  # noqa: E731
        rt = lambda k: f"{r[k]:.2f}" if r.get(k) else "-"  # noqa: E731
        log(f"| {r['M']} | {r['N']} | {r['K']} | {f('bf16_tflops')} | {f('triton_tflops')} | {rt('triton_vs_bf16')} "
            f"| {f('cublas_tflops')} | {rt('cublas_vs_bf16')} |")
    log("| quantizer | impl | GB/s | x copy |")
    log("|---|---|---|---|")
    for r in quant_rows:
        log(f"| {r['kernel']} | {r['impl']} | {r['GB/s']:.0f} | {r['vs_copy']:.2f} |")
    log(f"total {time.time() - t0:.0f}s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"checks": checks, "gemm": gemm_rows, "quant": quant_rows,
                       "torch": torch.__version__, "device": torch.cuda.get_device_name()}, fh, indent=1, default=str)
    sys.exit(0 if n_ok == len(checks) else 1)


if __name__ == "__main__":
    main()
