"""Which part of the FP8 recipe costs the loss gap of bench/fp8_loss.py? An ablation without library changes.

    python bench/fp8_ablation.py [--seeds 0 1] [--arms fp8_no_wo fp8_no_experts ...] [--jobs 1] [--steps 300]
                                 [--baseline outputs/fp8_loss] [--out outputs/fp8_ablation] [--json PATH]
    python bench/fp8_ablation.py hook VARIANT [moeforge train overrides ...]    (one run; what the driver starts)
    python bench/fp8_ablation.py show VARIANT [overrides ...]                   (list the Linears it keeps, no run)
    python bench/fp8_ablation.py probe [--ckpt DIR] [--seed S] [--batches N]     (all arms on one set of weights)

Each arm is the `fp8` arm of bench/fp8_loss.py (model.dtype=bfloat16, fp8=blockwise, emulated) with some
Linears kept high precision (BF16, like the `bf16` arm). The `hook` entry replaces `fp8.apply_fp8` (the name
train/build.py's build_model looks up at call time) by the library's apply_fp8 with a wider `exclude`
(the library default plus the variant's names), then runs `launcher.cli train` in the same process. So the
library defaults are unchanged; apply_fp8's own log line ("high precision: [...]") in each run's log proves
which Linears stayed BF16.
    none        the default exclude (head, gate, embeddings): the `fp8` arm itself, bit for bit
    no_wo       + every attention output projection `*.attn.wo` (the report keeps its input in E5M6, §3.3.3)
    no_attn     + every Linear of attention (`*.attn.*`: wq_a, wq_b, wkv_a, wkv_b, wo)
    no_experts  + routed and shared experts (`*.ffn.experts.*`, `*.ffn.shared_experts.*`); the arm sets
                fp8.grouped_experts=false (written before apply_fp8 passed its exclude to the grouped runner,
                which used to run excluded experts in FP8 anyway; the check below stays as a guard)
    no_ffn      + every FFN Linear (the experts above and the dense MLPs `*.ffn.w1/w2/w3`)
Arms without a hook are plain fp8_loss arms: fp8_pow2 (fp8.power_of_2_scales=true) and bf16_mb4 (bf16 with
train.micro_batch_size=4: the same math summed in another order, the run-to-run floor of the bf16 arm).

`probe` needs no training: it loads one checkpoint (default: seed 0's final bf16 weights) into every arm
and measures the validation loss and the gradient (4 train batches) against the FP32 model on the same
weights. The probe arms add backward modes, VARIANT:BACKWARD in `hook` (they need fp8.grouped_experts=false,
the grouped runner has its own backward): fp8_fwd_only (none:bwd_hp: only Fprop in FP8, Dgrad and Wgrad
BF16), fp8_dgrad_hp, fp8_wgrad_hp, and fp8_loop (the experts through Fp8Linear: bitwise the fp8 arm).

The baseline bf16 and fp8 runs are read from --baseline (bench/fp8_loss.py's output, same steps and seeds),
never re-run; a seed missing there gets its bf16 and fp8 runs under --out (kept with --reuse). The gaps
are relative to bf16 (a / bf16 - 1) on the final validation loss, as in fp8_loss.
Results: docs/fp8.md ("Loss vs BF16", Ablation).
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def _under(fqn: str, *names: str) -> bool:
    parts = fqn.split(".")
    return any(n in parts for n in names)


def _is_expert(fqn: str) -> bool:
    parts = fqn.split(".")
    return any(a == "ffn" and b in ("experts", "shared_experts") for a, b in zip(parts, parts[1:]))


def _is_dense_mlp(fqn: str) -> bool:
    parts = fqn.split(".")
    return len(parts) >= 2 and parts[-2] == "ffn" and parts[-1] in ("w1", "w2", "w3")


# variant -> extra names to keep high precision (on top of fp8.linear.default_exclude)
VARIANTS: dict[str, Callable[[str], bool]] = {
    "none": lambda fqn: False,
    "no_wo": lambda fqn: _under(fqn, "attn") and fqn.endswith(".wo"),
    "no_attn": lambda fqn: _under(fqn, "attn"),
    "no_experts": _is_expert,
    "no_ffn": lambda fqn: _is_expert(fqn) or _is_dense_mlp(fqn),
}


def _hp_backward(dgrad_hp: bool, wgrad_hp: bool):
    """Fp8LinearFunction.backward with Dgrad and/or Wgrad as plain matmuls in the master dtype (what
    nn.Linear's backward computes), the other GEMM still blockwise FP8 (the library's code)."""
    import torch

    from moeforge.fp8 import linear

    fp8_backward = linear.Fp8LinearFunction.__dict__["_fp8_backward"].__func__ \
        if "_fp8_backward" in linear.Fp8LinearFunction.__dict__ else linear.Fp8LinearFunction.backward

    def backward(ctx, dy):
        dx, dw, db, *_ = fp8_backward(ctx, dy) if not (dgrad_hp and wgrad_hp) else (None, None, None)
        x2, weight = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        if dgrad_hp and ctx.needs_input_grad[0]:
            dx = (dy2 @ weight.to(dy2.dtype)).to(ctx.x_dtype).view(ctx.x_shape)
        if wgrad_hp and ctx.needs_input_grad[1]:
            dw = (dy2.t() @ x2.to(dy2.dtype)).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2] and db is None:
            db = dy2.sum(dim=0, dtype=torch.float32).to(dy.dtype)
        return dx, dw, db, None, None

    if "_fp8_backward" not in linear.Fp8LinearFunction.__dict__:
        linear.Fp8LinearFunction._fp8_backward = staticmethod(fp8_backward)
    return backward


# backward mode -> (Dgrad in BF16, Wgrad in BF16); "fp8" is the library's recipe (all three GEMMs FP8)
BACKWARDS = {"fp8": (False, False), "dgrad_hp": (True, False), "wgrad_hp": (False, True), "bwd_hp": (True, True)}


def install(variant: str) -> Callable[[str], bool]:
    """Make `from fp8 import apply_fp8` (train/build.py) return apply_fp8 with the variant's exclude.
    VARIANT is EXCLUDE or EXCLUDE:BACKWARD (e.g. none:bwd_hp = FP8 Fprop only, Dgrad/Wgrad BF16)."""
    import logging

    import torch

    from moeforge import fp8
    from moeforge.fp8 import linear

    logger = logging.getLogger("moeforge.fp8")
    variant, _, bwd = variant.partition(":")
    bwd = bwd or "fp8"

    extra = VARIANTS[variant]
    dgrad_hp, wgrad_hp = BACKWARDS[bwd]
    if "_fp8_backward" in linear.Fp8LinearFunction.__dict__:  # undo an earlier install (probe)
        linear.Fp8LinearFunction.backward = linear.Fp8LinearFunction._fp8_backward
    if dgrad_hp or wgrad_hp:
        linear.Fp8LinearFunction.backward = staticmethod(_hp_backward(dgrad_hp, wgrad_hp))

    def exclude(fqn: str) -> bool:
        return linear.default_exclude(fqn) or extra(fqn)

    def apply_fp8(model, cfg, **kw):
        out = linear.apply_fp8(model, cfg, exclude=exclude, **kw)
        kept = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear]
        for n, m in model.named_modules():  # the grouped runner would run excluded experts in FP8 anyway
            experts = getattr(m, "experts", None)
            if getattr(experts, "run_grouped", None) is not None and any(
                    type(e.w1) is torch.nn.Linear for e in experts.values()):
                raise RuntimeError(f"{variant}: {n} keeps its experts BF16 but runs them grouped in FP8; "
                                   "add fp8.grouped_experts=false")
            if getattr(experts, "run_grouped", None) is not None and bwd != "fp8":
                raise RuntimeError(f"{variant}:{bwd}: the grouped expert runner has its own FP8 backward; "
                                   "add fp8.grouped_experts=false")
        kinds = {}
        for n in kept:
            k = ".".join(p for p in n.split(".") if not p.isdigit())
            kinds[k] = kinds.get(k, 0) + 1
        logger.info("fp8_ablation %s (backward %s: Dgrad %s, Wgrad %s): %d nn.Linear kept BF16, by kind: %s",
                    variant, bwd, "BF16" if dgrad_hp else "FP8", "BF16" if wgrad_hp else "FP8", len(kept), kinds)
        return out

    fp8.apply_fp8 = apply_fp8  # a package global: found before fp8.__getattr__, so train/build.py finds this
    return exclude


def _show(variant: str, overrides: list[str]) -> None:
    """Build the model on meta with the variant and list what stays high precision (no training)."""
    import logging

    import torch

    logging.basicConfig(level="INFO", format="%(name)s: %(message)s")
    from moeforge.launcher.config import load_job_config

    cfg = load_job_config(["model=tiny", "fp8=blockwise", *overrides])
    install(variant)
    from moeforge import fp8
    from moeforge.model.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(cfg.model)
    fp8.apply_fp8(model, cfg.fp8)
    n8 = sum(isinstance(m, fp8.Fp8Linear) for m in model.modules())
    grouped = [n for n, m in model.named_modules() if getattr(getattr(m, "experts", None), "run_grouped", None)]
    print(f"{variant}: {n8} Fp8Linear; MoE layers with the grouped FP8 expert runner: {grouped or 'none'}")


# probe arms: name -> (overrides on top of fp8_loss.base_overrides, hook variant or None)
PROBE_ARMS = {
    "fp32": (["model.dtype=float32", "fp8=off"], None),
    "bf16": (["model.dtype=bfloat16", "fp8=off"], None),
    "fp8": (["model.dtype=bfloat16", "fp8=blockwise"], None),
    "fp8_no_wo": (["model.dtype=bfloat16", "fp8=blockwise"], "no_wo"),
    "fp8_no_attn": (["model.dtype=bfloat16", "fp8=blockwise"], "no_attn"),
    "fp8_no_experts": (["model.dtype=bfloat16", "fp8=blockwise", "fp8.grouped_experts=false"], "no_experts"),
    "fp8_no_ffn": (["model.dtype=bfloat16", "fp8=blockwise", "fp8.grouped_experts=false"], "no_ffn"),
    "fp8_pow2": (["model.dtype=bfloat16", "fp8=blockwise", "fp8.power_of_2_scales=true"], None),
    "fp8_fwd_only": (["model.dtype=bfloat16", "fp8=blockwise", "fp8.grouped_experts=false"], "none:bwd_hp"),
    "fp8_dgrad_hp": (["model.dtype=bfloat16", "fp8=blockwise", "fp8.grouped_experts=false"], "none:dgrad_hp"),
    "fp8_wgrad_hp": (["model.dtype=bfloat16", "fp8=blockwise", "fp8.grouped_experts=false"], "none:wgrad_hp"),
    "fp8_loop": (["model.dtype=bfloat16", "fp8=blockwise", "fp8.grouped_experts=false"], "none"),
}


def _probe(argv: list[str]) -> None:
    """Noise-free attribution: every arm on the SAME weights (one checkpoint), no training. Per arm: the
    validation loss (the 16 fixed batches of fp8_loss) and the gradient of the training loss on --batches
    train batches, compared with the FP32 model on the same weights (relative L2 error of the gradient,
    per parameter group). A single 300-step run is chaotic (its floor: docs/fp8.md); this measures the
    per-step perturbation each arm injects, which is what the ablation runs can only see through that noise."""
    import logging

    import torch

    import fp8_loss as FL
    from moeforge.launcher.config import load_job_config
    from moeforge.train import checkpoint as ck
    from moeforge.train.data import Corpus, SampleStream, build_datasets
    from moeforge.train.tokenizer import load_tokenizer
    from moeforge.model.loss import lm_losses, total_loss
    from moeforge.train.build import build_model

    p = argparse.ArgumentParser(prog="fp8_ablation.py probe")
    p.add_argument("--ckpt", default=str(ROOT / "outputs/fp8_loss/seed0/bf16/checkpoints/step_00000300"))
    p.add_argument("--seed", type=int, default=0, help="train.seed of the run (selects its val/train batches)")
    p.add_argument("--batches", type=int, default=4, help="train batches (steps 301..) for the gradient")
    p.add_argument("--arms", nargs="*", default=list(PROBE_ARMS), choices=list(PROBE_ARMS))
    p.add_argument("--data", default=str(ROOT / "data" / "stdlib"))
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    logging.basicConfig(level="WARNING")
    torch.set_num_threads(1)
    sd = {k[len("model."):]: v for k, v in ck.load(a.ckpt).items() if k.startswith("model.")}
    res, g32 = {}, None

    def group(name: str) -> str:
        return "attn" if ".attn." in name else "experts" if (".experts." in name or ".shared_experts." in name) \
            else "dense_ffn" if ".ffn." in name else "other"

    for arm in ["fp32"] + [x for x in a.arms if x != "fp32"]:
        over, variant = PROBE_ARMS[arm]
        install(variant or "none")
        cfg = load_job_config([f"data.dir={a.data}", f"train.seed={a.seed}", *FL.base_overrides(300), *over])
        model = build_model(cfg, torch.device("cpu"))
        model.load_state_dict(sd, strict=True)  # copy_ casts to the arm's dtype
        window = cfg.train.seq_len + 1 + cfg.model.n_mtp_modules
        B = cfg.train.global_batch_size
        tr_ds, val_ds = build_datasets(Corpus.open(cfg.data, load_tokenizer(cfg.data.tokenizer)), cfg.data, window,
                                       a.seed, (cfg.train.steps + 1 + a.batches) * B, cfg.train.eval_batches * B)
        val, tr = SampleStream(val_ds, window), SampleStream(tr_ds, window)
        model.eval()
        with torch.no_grad():
            n_val = cfg.train.eval_batches
            vl = sum(lm_losses(model, val.rows(i * B, B))[0].item() for i in range(n_val)) / n_val
        model.train()
        model.zero_grad(set_to_none=True)
        for i in range(a.batches):
            main, mtp = lm_losses(model, tr.rows((cfg.train.steps + 1 + i) * B, B))
            loss = total_loss(main, mtp, cfg.model.mtp_loss_weight)
            (loss / a.batches).backward()
        g = {n: q.grad.float().clone() for n, q in model.named_parameters() if q.grad is not None}
        if g32 is None:
            g32 = g
        err = {}
        for grp in ("all", "attn", "experts", "dense_ffn", "other"):
            ns = [n for n in g32 if grp == "all" or group(n) == grp]
            num = sum(float((g[n] - g32[n]).pow(2).sum()) for n in ns)
            den = sum(float(g32[n].pow(2).sum()) for n in ns)
            err[grp] = 100 * (num / den) ** 0.5 if den else float("nan")
        dot = sum(float((g[n] * g32[n]).sum()) for n in g32)
        n32 = sum(float(g32[n].pow(2).sum()) for n in g32)
        shrink = 100 * (dot / n32 - 1)  # the error's component along the FP32 gradient (< 0: shorter)
        res[arm] = {"val": vl, "grad_rel_err_pct": err, "grad_along_fp32_pct": shrink}
        print(f"{arm:15s} val {vl:.5f}  along fp32 {shrink:+.2f}%  grad rel. error vs fp32 (%): "
              + "  ".join(f"{k} {v:.2f}" for k, v in err.items()), flush=True)
    b = res.get("bf16")
    print(f"\nprobe on {a.ckpt} (seed {a.seed}); val gap vs bf16 and vs fp32 on the same weights:")
    print("| arm | val loss | vs bf16 | vs fp32 | grad error vs fp32: all | attn | experts | dense FFN | other "
          "| grad along fp32 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for arm, r in res.items():
        vb = f"{100 * (r['val'] / b['val'] - 1):+.3f}%" if b else "-"
        e = r["grad_rel_err_pct"]
        v32 = 100 * (r["val"] / res["fp32"]["val"] - 1)
        print(f"| {arm} | {r['val']:.4f} | {vb} | {v32:+.3f}% | {e['all']:.2f}% | {e['attn']:.2f}% |"
              f" {e['experts']:.2f}% | {e['dense_ffn']:.2f}% | {e['other']:.2f}% | "
              f"{r['grad_along_fp32_pct']:+.2f}% |")
    if a.json:
        Path(a.json).write_text(json.dumps({"ckpt": a.ckpt, "seed": a.seed, "batches": a.batches, "arms": res},
                                           indent=2))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "probe":
        return _probe(sys.argv[2:])
    if len(sys.argv) > 1 and sys.argv[1] in ("hook", "show"):
        v, _, b = sys.argv[2].partition(":") if len(sys.argv) > 2 else ("", "", "")
        if v not in VARIANTS or (b or "fp8") not in BACKWARDS:
            sys.exit(f"usage: fp8_ablation.py {sys.argv[1]} {{{','.join(VARIANTS)}}}[:{{{','.join(BACKWARDS)}}}] "
                     "[overrides ...]")
        if sys.argv[1] == "show":
            return _show(sys.argv[2], sys.argv[3:])
        install(sys.argv[2])
        from moeforge.launcher.cli import main as cli_main

        sys.exit(cli_main(["train", *sys.argv[3:]]))

    import fp8_loss as FL

    ablation_arms = [a for a in FL.ARMS if a in FL.HOOKS or a in ("fp8_pow2", "bf16_mb4")]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--arms", nargs="*", default=["fp8_no_wo", "fp8_no_experts"], choices=ablation_arms,
                   metavar="ARM", help=f"any of {ablation_arms} (none: only the bf16/fp8 baseline of new seeds)")
    p.add_argument("--data", default=str(ROOT / "data" / "stdlib"))
    p.add_argument("--baseline", default=str(ROOT / "outputs" / "fp8_loss"), help="fp8_loss output with bf16 and fp8")
    p.add_argument("--out", default=str(ROOT / "outputs" / "fp8_ablation"))
    p.add_argument("--json", default=None)
    p.add_argument("--reuse", action="store_true", help="keep finished ablation runs under --out")
    p.add_argument("--report-only", action="store_true", help="only tabulate finished runs (no training)")
    args, extra = p.parse_known_args()

    base = argparse.Namespace(**{**vars(args), "out": args.baseline, "reuse": True})
    res, missing = {}, []
    for s in args.seeds:  # baseline bf16/fp8: reused from --baseline (fp8_loss's runs); a seed it lacks is run here
        for arm in ("bf16", "fp8"):
            done = Path(args.baseline) / f"seed{s}" / arm / "summary.json"
            if done.is_file() and json.loads(done.read_text()).get("steps") == args.steps:
                res[(arm, s)] = FL.train(arm, s, base, extra)
            else:
                missing.append((arm, s))
    jobs = missing + [(arm, s) for arm in args.arms for s in args.seeds]
    if args.report_only:
        args.reuse = True
        jobs = [(a, s) for a, s in jobs if (Path(args.out) / f"seed{s}" / a / "summary.json").is_file()]
    print(f"fp8_ablation: {len(jobs)} runs ({', '.join(args.arms)} x seeds {args.seeds}), {args.steps} steps, "
          f"{args.jobs} at a time", flush=True)
    with ThreadPoolExecutor(args.jobs) as ex:
        for r in ex.map(lambda j: FL.train(j[0], j[1], args, extra), jobs):
            res[(r["arm"], r["seed"])] = r
            print(f"  seed {r['seed']} {r['arm']}: val {r['val']:.4f}, {r['train_s']:.0f}s in steps", flush=True)

    rows = []
    print("\n| variant | seed | final val loss | vs bf16 | train (last 50) | vs bf16 |")
    print("|---|---:|---:|---:|---:|---:|")
    for arm in ["bf16", "fp8", *args.arms]:
        for s in args.seeds:
            r, b = res.get((arm, s)), res.get(("bf16", s))
            if r is None or b is None:
                continue
            gv, gt = 100 * (r["val"] / b["val"] - 1), 100 * (r["train_tail"] / b["train_tail"] - 1)
            rows.append({"arm": arm, "seed": s, "val": r["val"], "gap_val": gv, "train_tail": r["train_tail"],
                         "gap_train_tail": gt, "max_grad_norm": r["max_grad_norm"]})
            print(f"| {arm} | {s} | {r['val']:.4f} | {gv:+.3f}% | {r['train_tail']:.4f} | {gt:+.3f}% |")
    print("\nmean over seeds of the gap vs bf16 (final val loss), +- s.e.m.:")
    summary = {}
    for arm in ["fp8", *args.arms]:
        g = [r["gap_val"] for r in rows if r["arm"] == arm]
        if g:
            m, se = FL.mean_sem(g)
            summary[arm] = {"seeds": [r["seed"] for r in rows if r["arm"] == arm], "mean": m, "sem": se}
            print(f"  {arm:15s} {m:+.3f}% +- {se:.3f}%  over seeds {summary[arm]['seeds']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "mean_gap_val": summary, "steps": args.steps,
                                               "overrides": FL.base_overrides(args.steps) + extra}, indent=2))


if __name__ == "__main__":
    main()
