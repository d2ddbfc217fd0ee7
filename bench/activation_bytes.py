"""Activation bytes kept for backward per token, by block kind, with train.recompute none / selective / full and
FP8 activation caches off / on: measured, not estimated.

    python bench/activation_bytes.py                       # tiny (seq 128) and small (seq 512), bfloat16
    python bench/activation_bytes.py --presets small --seq 1024 --dtypes bfloat16 --json out.json

Each number is train/activations.py's saved_bytes_per_token: the real modules (model/transformer.py's Block,
MTPModule) at the preset's shapes on fake tensors, the policy applied by model/recompute.apply_recompute and
the FP8 swap by fp8.apply_fp8 (fp8=blockwise, backend emulate) as train/build.py applies them, one micro-batch
forward, then the bytes of every storage made inside that is still alive (what autograd keeps; each storage
once, whatever the views). The MTP column is the whole MTP module: projection, block, its norm, the shared
head and the loss. The FP8 rows run with the weight cache off (fp8.cache_fp8_weights=false): its FP8 copies
of the weights are per layer, not per token, and the planner prices them apart (fp8.linear.fp8_weight_cache_bytes).
Ratios are to recompute=none with the same FP8 setting.
"""
from __future__ import annotations

import argparse
import json
import time

KINDS = ("dense", "moe", "mtp")
POLICIES = ("none", "selective", "full")


def measure(preset: str, seq: int, dtype: str, fp8: bool) -> dict[str, dict[str, float]]:
    from moeforge.fp8.config import Fp8Config
    from moeforge.model.args import load_preset
    from moeforge.train.activations import saved_bytes_per_token

    args = load_preset(preset, dtype=dtype)
    cfg = Fp8Config(enabled=True, backend="emulate", cache_fp8_weights=False) if fp8 else None
    return {p: saved_bytes_per_token(args, seq_len=seq, recompute=p, fp8=cfg) for p in POLICIES}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", nargs="+", default=["tiny", "small"])
    ap.add_argument("--seq", type=int, nargs="+", default=None, help="one per preset (default tiny 128, small 512)")
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16"], help="model.dtype (the report trains in bfloat16)")
    ap.add_argument("--json", default=None, help="also write the numbers here")
    a = ap.parse_args(argv)
    default_seq = {"tiny": 128, "small": 512}
    seqs = a.seq or [default_seq.get(p, 512) for p in a.presets]
    if len(seqs) != len(a.presets):
        ap.error(f"--seq needs one value per preset ({len(a.presets)}), got {len(seqs)}")
    rows, t0 = [], time.perf_counter()
    print(f"{'preset':<6} {'seq':>5} {'dtype':<9} {'fp8':<4} {'recompute':<10}"
          + "".join(f"{k + ' B/tok':>12} {'ratio':>6}" for k in KINDS))
    for preset, seq in zip(a.presets, seqs):
        for dtype in a.dtypes:
            for fp8 in (False, True):
                got = measure(preset, seq, dtype, fp8)
                for p in POLICIES:
                    cells = "".join(f"{got[p][k]:>12.1f} {got[p][k] / got['none'][k] if got['none'][k] else 0:>6.3f}"
                                    for k in KINDS)
                    print(f"{preset:<6} {seq:>5} {dtype:<9} {'on' if fp8 else 'off':<4} {p:<10}{cells}")
                    rows.append({"preset": preset, "seq": seq, "dtype": dtype, "fp8": fp8, "recompute": p,
                                 **{k: got[p][k] for k in KINDS}})
    print(f"({time.perf_counter() - t0:.1f} s; bytes per token of one block of each kind kept for backward, "
          f"measured on fake tensors: train/activations.py)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
