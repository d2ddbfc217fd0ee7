"""The short table at the end of bench/gpu_check.sh: the JSON of each bench, as Markdown for bench/RESULTS.md,
with issue 11's goals marked (ok / MISS) and issue 18's overlap answer (does the NCCL all-to-all kernel
overlap compute kernels). A missing JSON (its bench skipped, failed or was killed) is said.

    python bench/gpu_summary.py OUT_DIR
Goals: dense FP8 >= 1.6x bf16 matmul; grouped FP8 >= 0.85x dense FP8; quantizers >= 0.85x a device copy;
end to end fp8=blockwise >= 1.3x fp8=off tokens/s.
"""

from __future__ import annotations

import json
import os
import sys


def load(out: str, name: str):
    path = os.path.join(out, name)
    if not os.path.isfile(path):
        print(f"({name}: none; that bench was skipped, failed or killed: see its log)")
        return None
    with open(path) as fh:
        return json.load(fh)


def mark(value: float | None, goal: float) -> str:
    if value is None:
        return "-"
    return f"{value:.2f} {'ok' if value >= goal else 'MISS'}"


def num(r: dict, k: str, fmt: str = "{:.0f}") -> str:
    v = r.get(k)
    return fmt.format(v) if isinstance(v, (int, float)) and v else "-"


def main(out: str) -> None:
    ov = load(out, "stream_overlap.json")
    if ov:
        frac = ov.get("overlap_fraction")
        print(f"\n### EP all-to-all vs compute on one GPU ({ov.get('device')}, NCCL world size 1, CudaCommStream)")
        print("| NCCL kernels | NCCL ms | overlapped with compute ms | fraction | overlaps |")
        print("|---|---|---|---|---|")
        print(f"| {ov['nccl_kernels']} | {ov['nccl_ms']:.3f} | {ov['nccl_overlapped_ms']:.3f} "
              f"| {'-' if frac is None else f'{frac:.2f}'} "
              f"| {'no NCCL kernel in the trace' if ov['overlaps'] is None else 'yes' if ov['overlaps'] else 'NO'} |")
    dense = load(out, "fp8_bench.json")
    if dense:
        bad = [k for k, v in dense["checks"].items() if not v]
        print(f"\n### Dense FP8 GEMM ({dense.get('device')}, torch {dense.get('torch')}); checks "
              f"{len(dense['checks']) - len(bad)}/{len(dense['checks'])}" + (f", FAILED: {bad}" if bad else ""))
        print("| M | N | K | bf16 TFLOP/s | triton | cuBLAS blockwise | best / bf16 (goal 1.6) |")
        print("|---|---|---|---|---|---|---|")
        for r in dense["gemm"]:
            best = max(r.get("triton_tflops") or 0, r.get("cublas_tflops") or 0)
            print(f"| {r['M']} | {r['N']} | {r['K']} | {num(r, 'bf16_tflops')} | {num(r, 'triton_tflops')} "
                  f"| {num(r, 'cublas_tflops')} | {mark(best / r['bf16_tflops'] if best else None, 1.6)} |")
    grouped = load(out, "grouped_bench.json")
    if grouped:
        bad = [k for k, v in grouped["checks"].items() if not v]
        print(f"\n### Grouped FP8 GEMM (TFLOP/s of the real rows); checks "
              f"{len(grouped['checks']) - len(bad)}/{len(grouped['checks'])}" + (f", FAILED: {bad}" if bad else ""))
        print("| shape | experts x rows | bf16 | bf16 _grouped_mm | fp8 dense | fp8 grouped "
              "| grouped / dense (goal 0.85) | Wgrad dense | Wgrad grouped | ratio |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in grouped["gemm"]:
            print(f"| {r['shape']} N={r['N']} K={r['K']} | {r['G']} x {r['M'] // r['G']} {r['rows']} "
                  f"| {num(r, 'bf16_tflops')} | {num(r, 'bf16_grouped_mm_tflops')} | {num(r, 'fp8_dense_tflops')} "
                  f"| {num(r, 'fp8_grouped_tflops')} | {mark(r.get('grouped_vs_dense'), 0.85)} "
                  f"| {num(r, 'wgrad_dense_tflops')} | {num(r, 'wgrad_grouped_tflops')} "
                  f"| {mark(r.get('wgrad_grouped_vs_dense'), 0.85)} |")
    quant = (dense or {}).get("quant", []) + (grouped or {}).get("quant", [])
    if quant:
        print("\n### Quantizers (GB/s read + written)")
        print("| kernel | impl | GB/s | x copy (goal 0.85) | unfused ms | fused ms |")
        print("|---|---|---|---|---|---|")
        for r in quant:
            impl = r.get("impl", "?")
            goal = mark(r["vs_copy"], 0.85) if impl not in ("copy", "torch") else f"{r['vs_copy']:.2f}"
            print(f"| {r['kernel']} | {impl} | {r['GB/s']:.0f} | {goal} | {num(r, 'unfused_ms', '{:.3f}')} "
                  f"| {num(r, 'ms', '{:.3f}')} |")
    if grouped and grouped.get("layer"):
        print("\n### One MoE expert layer of `small` (32 experts, 64K rows), forward + backward")
        print("| variant | ms | TFLOP/s |")
        print("|---|---|---|")
        for r in grouped["layer"]:
            print(f"| {r['variant']} | {r['ms']:.2f} | {r['tflops']:.0f} |")
    e2e = load(out, "e2e_small.json")
    if e2e:
        rows = e2e["rows"]
        base = next((r for r in rows if r["variant"] == "bf16" and "error" not in r), None)
        print(f"\n### End to end: model={e2e['model']}, seq {e2e['seq']}, {e2e['global_batch']} sequences/step")
        print("| variant | tokens/s | x bf16 (goal 1.3) | TFLOP/s | MFU vs bf16 peak | MFU vs fp8 peak "
              "| GPU mem GiB | loss |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            if "error" in r:
                print(f"| {r['variant']} | failed: {r['error'][:60]} |||||||")
                continue
            x = r["tokens_per_s"] / base["tokens_per_s"] if base else None
            pct = lambda k: f"{100 * r[k]:.1f}%" if r.get(k) is not None else "-"  # noqa: E731
            print(f"| {r['variant']} | {r['tokens_per_s']:,.0f} | {mark(x, 1.3) if r['fp8'] else '1.00'} "
                  f"| {r['tflops']:.1f} | {pct('mfu_vs_bf16_peak')} | {pct('mfu_vs_fp8_peak')} "
                  f"| {num(r, 'mem_peak_gib', '{:.1f}')} | {r['loss_last']:.3f} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/fp8_gpu_check")
