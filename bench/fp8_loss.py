"""FP8 vs BF16 training loss on the same data and seed (issue 5; TR §3.3 / App. B.1 saw < 0.25%).

    python bench/fp8_loss.py [--seeds 0 1 2] [--steps 300] [--jobs 2] [--arms bf16 fp8 fp32 fp32_mb4]
                             [--data DIR] [--out DIR] [--json PATH] [--reuse] [extra hydra overrides ...]

Each seed trains the same model on the same batches once per arm, each arm a `moeforge train` process
with one thread (--jobs of them at a time), and compares the final validation loss:
  bf16       model.dtype=bfloat16: BF16 weights/activations/GEMMs, FP32 master weights (the baseline)
  fp8        the same plus fp8=blockwise (emulated): every recipe Linear runs its 3 GEMMs in E4M3
  fp32       model.dtype=float32, fp8 off
  fp32_mb4   fp32 with train.micro_batch_size=4: identical math, only the summation order of the
             gradients changes. Its distance from `fp32` is the run-to-run floor of this comparison:
             any perturbation, however harmless, moves a single run's final loss by about that much.
  fp8_fp32   fp8=blockwise on the FP32 model (compared with `fp32`): the same FP8 GEMMs; the pair
             costs about half the bf16/fp8 pair on a CPU without BF16 matmul units (more seeds per hour)
Both AdamW moments are BF16 in every arm (train.moment_dtype=bfloat16, the report's setting).
The default config (tiny, seq 64, 8 sequences per step, lr 1e-3 with warm-up and cosine decay to 10%)
is the regime where the floor is small; at tiny's default lr 3e-3 loss spikes (grad norm up to 50)
make single runs chaotic and the floor is ~1.5% (FP32 vs FP32) to ~3% (BF16 vs FP32) by itself.

Measured results and the cost of a run are in docs/fp8.md ("Loss vs BF16").
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

ARMS = {
    "bf16": ["model.dtype=bfloat16", "fp8=off"],
    "fp8": ["model.dtype=bfloat16", "fp8=blockwise"],
    "fp32": ["model.dtype=float32", "fp8=off"],
    "fp32_mb4": ["model.dtype=float32", "fp8=off", "train.micro_batch_size=4"],
    "fp8_fp32": ["model.dtype=float32", "fp8=blockwise"],
}


def base_overrides(steps: int) -> list[str]:
    return ["model=tiny", f"train.steps={steps}", "train.seq_len=64", "train.global_batch_size=8",
            "train.micro_batch_size=8", "train.lr=1e-3", "train.warmup_steps=20", "train.moment_dtype=bfloat16",
            f"train.eval_interval={max(1, steps // 6)}", "train.eval_batches=16", "train.sample_tokens=0",
            "checkpoint.interval=0", "checkpoint.resume=never", "logging.progress=false"]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train(arm: str, seed: int, args, extra: list[str]) -> dict:
    run_dir = Path(args.out) / f"seed{seed}" / arm
    cmd = [sys.executable, "-m", "launcher.cli", "train", f"data.dir={args.data}", f"run_dir={run_dir}",
           f"train.seed={seed}", *base_overrides(args.steps), *ARMS[arm], *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    t0 = time.time()
    log = run_dir.parent / f"{arm}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    done = run_dir / "summary.json"
    if args.reuse and done.is_file() and json.loads(done.read_text()).get("steps") == args.steps:
        print(f"  seed {seed} {arm}: reusing {run_dir}", flush=True)
    else:
        with open(log, "w") as f:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
        if rc:
            raise RuntimeError(f"{arm} seed {seed} failed (exit {rc}); see {log}")
    recs = read_jsonl(run_dir / "metrics.jsonl")
    vals = {r["step"]: r["val_loss"] for r in recs if "val_loss" in r}
    tail = [r["loss"] for r in recs[-50:]]
    return {"arm": arm, "seed": seed, "val": vals[max(vals)], "vals": vals, "train_tail": sum(tail) / len(tail),
            "max_grad_norm": max(r["grad_norm"] for r in recs), "wall_s": time.time() - t0}


def mean_sem(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, float("nan")
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--arms", nargs="+", default=["bf16", "fp8", "fp32", "fp32_mb4"], choices=list(ARMS))
    p.add_argument("--data", default=str(ROOT / "data" / "stdlib"), help="prepared token dir (made if missing)")
    p.add_argument("--out", default=str(ROOT / "outputs" / "fp8_loss"))
    p.add_argument("--json", default=None)
    p.add_argument("--reuse", action="store_true", help="keep finished runs under --out (same steps) and only add the rest")
    args, extra = p.parse_known_args()
    if not (Path(args.data) / "meta.json").is_file():
        sys.path.insert(0, str(ROOT))
        from train.data import prepare

        prepare(None, args.data)
    jobs = [(arm, s) for s in args.seeds for arm in args.arms]
    print(f"fp8_loss: {len(jobs)} runs ({', '.join(args.arms)} x seeds {args.seeds}), {args.steps} steps, "
          f"{args.jobs} at a time; overrides {base_overrides(args.steps) + extra}", flush=True)
    with ThreadPoolExecutor(args.jobs) as ex:
        res = list(ex.map(lambda j: train(j[0], j[1], args, extra), jobs))
    by = {(r["arm"], r["seed"]): r for r in res}
    for r in res:
        print(f"  seed {r['seed']} {r['arm']:9s} val {r['val']:.4f}  train(last 50) {r['train_tail']:.4f}  "
              f"max grad-norm {r['max_grad_norm']:.1f}  {r['wall_s']:.0f}s", flush=True)

    def gaps(a: str, b: str, key: str = "val") -> list[float]:
        return [100 * (by[(a, s)][key] / by[(b, s)][key] - 1) for s in args.seeds if (a, s) in by and (b, s) in by]

    summary = {}
    print("\nrelative final-loss gap, per seed, then mean +- s.e.m. over seeds:")
    for a, b in (("fp8", "bf16"), ("fp8", "fp32"), ("fp8_fp32", "fp32"), ("bf16", "fp32"), ("fp32_mb4", "fp32")):
        for key in ("val", "train_tail"):
            g = gaps(a, b, key)
            if not g:
                continue
            m, se = mean_sem(g)
            summary[f"{a}_vs_{b}_{key}"] = {"per_seed": g, "mean": m, "sem": se, "max_abs": max(map(abs, g))}
            print(f"  {a:>8s} vs {b:<5s} {key:10s} " + " ".join(f"{x:+.3f}%" for x in g)
                  + f"   mean {m:+.3f}% +- {se:.3f}%   max |gap| {max(map(abs, g)):.3f}%")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": res, "gaps": summary, "steps": args.steps,
                                               "overrides": base_overrides(args.steps) + extra}, indent=2))


if __name__ == "__main__":
    main()
