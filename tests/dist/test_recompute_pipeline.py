"""train.recompute in the pipeline runtime: selective and full give bit-for-bit the losses, gradients and MoE
loads of recompute=none, on gloo ranks, in the schedules that split backward into B and W.

What the cases exercise (model/recompute.py, dualpipe/stage.py):
  - dualpipev pp 2 x ep 2, overlapped F&B: each MoE block runs as ATTN | MLP | COMBINE pieces around the
    async all-to-alls; selective hands the ffn norm's output to COMBINE by its autograd edge (Chunk.link),
    full checkpoints each piece; B (autograd.grad with retain_graph) recomputes, W later reads the same
    recomputed tensors;
  - the same with fb_weight_split (W inside the F&B pair), and zb1p (W deferred past other chunks' work);
  - 1f1b pp 2 with FP8 (fp8=blockwise, emulate backend: exact torch math), float32;
  - no pipeline, ep 2 (LocalEngine): full re-runs a block's all-to-alls in its recompute.
Every case: the tiny preset (4 layers, 1 MTP module, vocab 257), seq 16, micro-batch 2, 2·pp micro-batches,
one model per policy built and initialised alike on every rank, compared with torch.equal.
"""
import pytest
from _spawn import run_ranks

WORLD = 4
SEQ, MICRO = 16, 2
POLICIES = ("none", "selective", "full")
# (schedule, pp, ep, overlap, dtype, fp8); overlap "split_w": overlap with fb_weight_split
CASES = [("dualpipev", 2, 2, True, "float64", False), ("dualpipev", 2, 2, "split_w", "float64", False),
         ("zb1p", 2, 2, True, "float64", False), ("dualpipev", 2, 2, True, "float32", False),
         ("1f1b", 2, 1, True, "float32", True)]
LOCAL_EP = ("local", 1, 2, False, "float64", False)  # LocalEngine, ep 2: no pipeline (_run_local_ep)


def _id(case):
    name, pp, ep, overlap, dtype, fp8 = case
    return (f"{name}-pp{pp}-ep{ep}" + ("-fb_weight_split" if overlap == "split_w" else "") + f"-{dtype}"
            + ("-fp8" if fp8 else ""))


def _run(rank, groups, case, policy):
    import torch

    from moeforge.dualpipe.runtime import PipelineRuntime
    from moeforge.dualpipe.schedule import num_stages, stage_placement
    from moeforge.model.args import load_preset
    from moeforge.model.recompute import apply_recompute
    from moeforge.model.split import build_stages
    from moeforge.model.transformer import Transformer

    name, pp, ep, overlap, dtype, fp8 = case
    fb_weight_split, overlap = overlap == "split_w", bool(overlap)
    args = load_preset("tiny", vocab_size=257)
    dp = WORLD // pp
    pp_rank, dp_rank = rank // dp, rank % dp
    n = 2 * pp
    with torch.device("meta"):
        model = Transformer(args)
    if ep > 1:
        from moeforge.parallel.apply_ep import apply_ep

        apply_ep(model, groups["ep"][rank // ep], rank % ep, ep)
    if fp8:
        from moeforge.fp8 import apply_fp8
        from moeforge.fp8.config import Fp8Config

        apply_fp8(model, Fp8Config(enabled=True, backend="emulate"))
    apply_recompute(model, policy)
    stages = build_stages(model, stage_placement(name, pp)[pp_rank], num_stages(name, pp))
    model.to_empty(device="cpu")
    model.init_weights(5)
    model.to(getattr(torch, dtype))
    rt = PipelineRuntime.for_schedule(name, stages, groups[f"pp{pp}"][dp_rank], n, overlap=overlap,
                                      fb_weight_split=fb_weight_split, timeout_s=60)
    g = torch.Generator().manual_seed(100 + dp_rank)
    rows = [torch.randint(0, 257, (MICRO, SEQ + 2), generator=g) for _ in range(n)]
    losses = rt.step(rows)
    rt.reduce_tied_grads()
    rt.reduce_tied_loads()
    return ([None if v is None else v.clone() for v in losses],
            {k: p.grad.clone() for k, p in rt.named_parameters() if p.grad is not None},
            {k: b.clone() for k, b in model.named_buffers() if k.endswith("tokens_per_expert")})


def _run_local_ep(rank, groups, policy):
    """No pipeline, ep = 2 (train/engine.py LocalEngine, comm.AllToAllDispatcher's synchronous path): under
    full the block's recompute runs its dispatch and combine again in backward, on every rank in the same order."""
    import torch

    from moeforge.model.args import load_preset
    from moeforge.model.recompute import apply_recompute
    from moeforge.model.transformer import Transformer
    from moeforge.parallel.apply_ep import apply_ep
    from moeforge.train.engine import LocalEngine

    args = load_preset("tiny", vocab_size=257)
    with torch.device("meta"):
        model = Transformer(args)
    apply_ep(model, groups["ep"][rank // 2], rank % 2, 2)
    apply_recompute(model, policy)
    model.to_empty(device="cpu")
    model.init_weights(5)
    model.double()
    g = torch.Generator().manual_seed(200 + rank)
    rows = [torch.randint(0, 257, (MICRO, SEQ + 2), generator=g) for _ in range(2)]
    sums = LocalEngine(model, torch.device("cpu")).forward_backward(rows)
    return ([sums.lm, sums.mtp, sums.aux], {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None},
            {k: b.clone() for k, b in model.named_buffers() if k.endswith("tokens_per_expert")})


def _all_cases(rank, world):
    import torch
    import torch.distributed as dist

    torch.manual_seed(0)
    groups = {"pp2": [dist.new_group([0, 2]), dist.new_group([1, 3])],
              "ep": [dist.new_group([0, 1]), dist.new_group([2, 3])]}
    out = {}
    for case in CASES + [LOCAL_EP]:
        run = _run if case != LOCAL_EP else (lambda rank, groups, case, policy: _run_local_ep(rank, groups, policy))
        ref_losses, ref_grads, ref_loads = run(rank, groups, case, "none")
        for policy in POLICIES[1:]:
            losses, grads, loads = run(rank, groups, case, policy)
            out[_id(case), policy] = {
                "n_losses": sum(v is not None for v in ref_losses),
                "losses_equal": all((a is None and b is None) or torch.equal(a, b) for a, b in zip(losses, ref_losses)),
                "same_params": sorted(grads) == sorted(ref_grads),
                "unequal_grads": [k for k in ref_grads if k in grads and not torch.equal(grads[k], ref_grads[k])],
                "n_grads": len(ref_grads),
                "loads_equal": all(torch.equal(loads[k], ref_loads[k]) for k in ref_loads),
            }
    return out


@pytest.fixture(scope="module")
def results():
    return run_ranks(_all_cases, WORLD, timeout_s=600, pg_timeout_s=120)


@pytest.mark.timeout(700)
@pytest.mark.parametrize("policy", POLICIES[1:])
@pytest.mark.parametrize("case", CASES + [LOCAL_EP], ids=_id)
def test_recompute_is_bitwise_none_in_the_pipeline(results, case, policy):
    for rank, r in enumerate(results):
        got = r[_id(case), policy]
        assert got["n_grads"] > 0 and got["same_params"], (rank, got)
        assert got["losses_equal"], (rank, got)
        assert not got["unequal_grads"], (rank, got)
        assert got["loads_equal"], (rank, got)
    assert sum(r[_id(case), policy]["n_losses"] for r in results) > 0
