"""`moeforge plan` (launcher/plan.py): hardware profiles, EP row accounting, pipeline pricing, the report check.

The validation against DeepSeek-V3 (TR §3.1-3.4, Table 1): 2048 H800 as 256 nodes x 8, PP16, EP64,
ZeRO-1 DP, 4K sequences, batch 15360, FP8 GEMMs, BF16 AdamW moments, two-hop FP8 dispatch, selective
recompute. The plan prices it from published throughputs with no fitted constant; the test holds DualPipe's
GPU-hours per trillion tokens within 15% of the report's 180K (the issue's goal; slow: the 671b units are
counted and measured on fake tensors). The time terms themselves: tests/unit/test_plan_costs.py. The per-rank
byte counts against a real run are tests/dist/test_plan_bytes.py.
"""
import argparse
import dataclasses

import pytest
import torch

from moeforge.comm.layout import EPTopology, node_limit
from moeforge.dualpipe.schedule import build_schedule
from moeforge.dualpipe.simulate import Costs, bubble_formula, live_peaks, simulate
from moeforge.launcher import plan as P
from moeforge.model.args import load_preset

REPORT = ["model=671b", "parallel.pp=16", "parallel.ep=64", "cluster.nodes=256", "cluster.gpu=h800",
          "train.seq_len=4096", "train.global_batch_size=15360", "train.micro_batch_size=1", "fp8=blockwise",
          "train.moment_dtype=bfloat16", "parallel.two_hop=true", "parallel.fp8_dispatch=true",
          "train.recompute=selective"]
TINY = ["model=tiny", "parallel.pp=2", "parallel.ep=2", "cluster.nodes=1", "cluster.gpus_per_node=4",
        "train.global_batch_size=32", "fp8=blockwise", "train.moment_dtype=bfloat16"]


@pytest.fixture(scope="module")
def report_plan():  # minutes: train.activations measures the 671b modules (256 experts) on fake tensors
    cfg, cluster, _ = P.load_plan_config(REPORT)
    return P.evaluate(cfg, cluster)


def test_cluster_profiles():
    for gpu, mem in (("h800", 79.6), ("h100", 79.6), ("h200", 140.4)):
        c = P.load_cluster({"gpu": gpu, "nodes": "2"})
        assert (c.name, c.world, c.memory_gib, c.bf16_tflops, c.fp8_tflops) == (gpu, 16, mem, 989.4, 1978.9)
        assert c.efficiency is None and c.fp8_gemm and c.fp8_grouped_gemm and c.attn_fwd and c.attn_bwd
    h800 = P.load_cluster({"gpu": "h800"})
    assert (h800.nvlink_gbps, h800.ib_gbps, h800.hbm_gbps) == (160, 50, 3000)  # TR §3.2.2; FlashMLA's H800 figure
    assert (4096, 7168, 16384, 1520) in h800.fp8_gemm  # DeepGEMM's README table
    assert P.load_cluster({"gpu": "h100", "efficiency": "0.5", "gpus_per_node": "4"}).efficiency == 0.5
    assert P.load_cluster({"gpu": "h100", "efficiency": "null"}).efficiency is None
    with pytest.raises(ValueError, match="cluster.gpu='a100'"):
        P.load_cluster({"gpu": "a100"})
    with pytest.raises(ValueError, match="cluster.nic"):
        P.load_cluster({"nic": "1"})
    with pytest.raises(ValueError, match="cluster.fp8_gemm"):
        P.load_cluster({"fp8_gemm": "1"})
    with pytest.raises(ValueError, match="cluster.efficiency"):
        P.load_cluster({"efficiency": "1.5"})
    job, cl = P.split_overrides(["model=671b", "cluster.nodes=4", "cluster=h200", "parallel.pp=2"])
    assert job == ["model=671b", "parallel.pp=2"] and cl == {"nodes": "4", "gpu": "h200"}


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_report_layout_predicts_gpu_hours(report_plan):
    p = report_plan
    assert (p.pp, p.ep, p.dp, p.n_micro, p.tokens_per_chunk) == (16, 64, 128, 120, 4096)
    r = p.schedules["dualpipe"]
    assert r.stages_per_rank == 2 and r.peak_chunks == 17  # 2x params, PP+1 in flight
    gh = p.gpu_hours_per_T(r)
    ratio = gh / P.TR_GPU_HOURS_PER_T
    # Every GEMM at DeepGEMM's / cuBLAS's published throughput, attention at FlashAttention-3's, the
    # memory-bound kernels counted from the modules at FlashMLA's achieved HBM bandwidth, recompute, exposed
    # all-to-all, ZeRO-1 sync and optimizer: no fitted constant. The goal: within 15% of 180K.
    assert 0.85 < ratio < 1.15, (gh, ratio)
    for s in ("1f1b", "zb1p", "dualpipe", "dualpipev"):
        assert not p.schedules[s].error and p.schedules[s].bubble > 0
    # DualPipe overlaps the all-to-all with compute: faster than 1F1B, which waits for it
    assert p.schedules["dualpipe"].step < p.schedules["1f1b"].step
    text = P.render(p)
    assert "180K" in text and "recompute (selective)" in text


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_memory_terms(report_plan):
    p = report_plan
    m = p.schedules["dualpipe"].memory
    one = p.schedules["1f1b"].memory
    # DualPipe holds two stages per rank: about twice 1F1B's weights (the split is 3, 4 x 14, 2 blocks)
    assert 1.8 < m["weights (BF16)"] / one["weights (BF16)"] < 2.2
    assert m["grads (FP32)"] == pytest.approx(2 * m["weights (BF16)"])  # parallel.zero.memory_per_rank
    assert m["moments (BF16)"] == pytest.approx(m["master (FP32)"])  # m and v, 2 bytes each; both sharded
    assert m["FP8 weight caches"] > 0 and m["EP comm buffers"] > 0 and m["activations"] > 0
    cfg, cluster, _ = P.load_plan_config(REPORT)
    full = P.evaluate(cfg, cluster, schedules=("dualpipe",), master="full").best.memory
    assert full["master (FP32)"] == pytest.approx(2 * m["weights (BF16)"], rel=0.01)


def test_stage_activations_are_the_measured_modules():
    """A stage's activation bytes per token are train.activations' measurements of its blocks, head and MTP
    (with the job's recompute and FP8, the weight caches left to their own category)."""
    from moeforge.train.activations import saved_bytes_per_token

    cfg, _, _ = P.load_plan_config(TINY)
    a, t = cfg.model, cfg.train
    fp8 = dataclasses.replace(cfg.fp8, cache_fp8_weights=False)
    saved = saved_bytes_per_token(a, seq_len=t.seq_len, recompute=t.recompute, fp8=fp8, micro_batch=1)
    stages = P.build_stages(a, 2, t.seq_len, cfg.fp8, t.recompute, 1)
    # model.stages' split of 4 blocks: 3 (dense layer 0, MoE 1 and 2) after the embedding, 1 before head + MTP
    assert stages[0].units == {"embed": 1, "dense": 1, "moe": 2} and stages[1].units == {"moe": 1, "head": 1, "mtp": 1}
    assert stages[0].act == pytest.approx(saved["dense"] + 2 * saved["moe"])
    assert stages[1].act == pytest.approx(saved["moe"] + saved["head"] + saved["mtp"])


def test_experiment_671b_h800_composes():
    """conf/experiment/671b-h800.yaml: the report's recipe, its cluster section read by the plan."""
    cfg, cluster, defaults = P.load_plan_config(["experiment=671b-h800"])
    assert (cluster.name, cluster.world) == ("h800", 2048) and defaults == []
    assert (cfg.parallel.pp, cfg.parallel.ep, cfg.schedule.name, cfg.model.dtype) == (16, 64, "dualpipe", "bfloat16")
    assert cfg.fp8.enabled and cfg.train.recompute == "selective" and cfg.train.moment_dtype == "bfloat16"
    assert (cfg.train.seq_len, cfg.train.global_batch_size, cfg.train.micro_batch_size) == (4096, 15360, 1)
    assert cfg.train.ema_decay > 0 and P.schedule_given(["experiment=671b-h800"])
    _, c2, _ = P.load_plan_config(["experiment=671b-h800", "cluster.nodes=128"])
    assert c2.world == 1024  # the command line wins


def test_ep_bytes_of_a_hand_routed_layer():
    """2 nodes x 2 ranks, one expert per rank; rank 0 routes two tokens to experts (1, 2) and (2, 3), the
    others none. The bytes below are counted by hand from the dispatch rules (comm/layout.py)."""
    topo = EPTopology.from_ranks(list(range(4)), 4, ranks_per_node=2)
    none = torch.empty(0, 2, dtype=torch.long)
    ids = [torch.tensor([[1, 2], [2, 3]]), none, none, none]
    # the count exchange: 8 bytes per peer (rows), + 8 per receiver expert on the last hop (1 expert per rank)
    counts = {("dispatch_fwd", "intra", "counts"): 16, ("dispatch_fwd", "inter", "counts"): 32}
    x, meta, xg, gmeta = 256 * 2, 8 * 2, 256 * 2, 4 * 2  # BF16 rows of dim 256, K = 2

    def back(link, rows):  # what a rank returns over `link` for `rows` rows it received
        return {("dispatch_bwd", link, "x"): rows * xg, ("dispatch_bwd", link, "meta"): rows * gmeta,
                ("combine_fwd", link, "x"): rows * xg}

    def out(link, rows, row_x=x):  # what a rank sends over `link` for `rows` rows it dispatches
        return {("dispatch_fwd", link, "x"): rows * row_x, ("dispatch_fwd", link, "meta"): rows * meta,
                ("combine_bwd", link, "x"): rows * row_x}

    # flat: token 0 to ranks 1 (intra) and 2, token 1 to ranks 2 and 3; FP8 rows are 256 + 4 * 2 bytes
    flat = P.ep_bytes_for_routing(ids, topo, dim=256, x_bytes=2, fp8=True, two_hop=False)
    assert flat == [{**counts, **out("intra", 1, 264), **out("inter", 3, 264)}, {**counts, **back("intra", 1)},
                    {**counts, **back("inter", 2)}, {**counts, **back("inter", 1)}]
    # two-hop: hop 1 sends token 0 to rank 0 itself (relay of node 0) and both tokens to rank 2 (relay of
    # node 1); hop 2: rank 0 forwards token 0 to rank 1, rank 2 keeps both and forwards token 1 to rank 3
    hop = P.ep_bytes_for_routing(ids, topo, dim=256, x_bytes=2, fp8=False, two_hop=True)
    both_hops = {k: v // 2 + v for k, v in counts.items()}  # hop 1: rows only; hop 2: rows + pairs
    assert hop == [{**both_hops, **out("inter", 2), **out("intra", 1)}, {**both_hops, **back("intra", 1)},
                   {**both_hops, **out("intra", 1), **back("inter", 2)}, {**both_hops, **back("intra", 1)}]


def test_uniform_routing_respects_the_node_limit():
    a = load_preset("671b")
    tr = P.ep_traffic(a, 64, 8, 2)
    topo = EPTopology.from_ranks(list(range(64)), 256, 8)
    assert node_limit(a.n_expert_groups, a.n_limited_groups, topo) == 4
    flat, hop = tr[(False, True)], tr[(True, True)]
    assert 3.5 < flat.nodes_per_token <= 4 and 7 < flat.ranks_per_token <= 8
    # two-hop sends a token over IB once per remote node instead of once per remote rank
    inter = {m: sum(v for (e, lk), v in tr[m].per_token.items() if lk == "inter") for m in tr}
    assert inter[(True, True)] / inter[(False, True)] == pytest.approx(
        (hop.nodes_per_token - 0.5) / (flat.ranks_per_token - flat.ranks_per_token / 8), rel=0.03)
    # FP8 dispatch: the dispatch-direction payload is (7168 + 224 + 64) / (2 x 7168 + 64) of BF16
    d = {m: tr[m].per_token[("dispatch_fwd", "inter")] for m in ((False, False), (False, True))}
    assert d[(False, True)] / d[(False, False)] == pytest.approx((7168 + 224 + 64) / (14336 + 64))


@pytest.mark.parametrize("name", ["1f1b", "zb1p", "dualpipe", "dualpipev"])
def test_closed_form_pipeline_matches_the_simulator(name):
    """--search prices with busy time + the report's bubble; with comm = 0 that is the simulated makespan,
    and the activation peaks of a short run are those of the long one."""
    costs = Costs(F=3.0, B=3.4, W=2.6, FB=8.0)
    for pp, n in ((4, 24), (8, 40)):
        sim = simulate(build_schedule(name, pp, n), costs)
        rank = P._FORMULA_RANK[name](pp)
        busy = sum(costs.price(a) for a in P._rank_actions(name, pp, n, rank) if a.is_compute)
        assert busy + bubble_formula(name, pp, costs) == pytest.approx(sim.makespan)
        S = 2 * pp if name == "dualpipev" else pp
        short = build_schedule(name, pp, 2 * S + 2)
        assert [live_peaks(a)[0] for a in short] == sim.peak_activations


def test_cli_prints_a_table_and_a_verdict(capsys):
    ns = argparse.ArgumentParser()
    P.add_plan_parser(ns.add_subparsers(dest="command"))
    args = ns.parse_args(["plan", *TINY])
    rc = args.fn(args)
    out = capsys.readouterr().out
    assert "schedule    bubble s" in out and "memory per GPU" in out and "EP bytes" in out and "GEMMs" in out
    assert out.rstrip().splitlines()[-1].startswith("verdict:") and rc in (0, 1)
    args = ns.parse_args(["plan", "model=671b", "parallel.pp=7", "cluster.nodes=1"])
    assert args.fn(args) == 2 and "parallel.pp=7" in capsys.readouterr().err


def test_search_ranks_fitting_layouts_fastest_first():
    """--search on 8 GPUs for the tiny model: every valid (pp, ep) priced in closed form, the ones that fit
    sorted by step time, each with the schedule asked for."""
    cfg, cluster, _ = P.load_plan_config(["model=tiny", "cluster.nodes=1", "train.global_batch_size=64",
                                          "fp8=blockwise"])
    plans, misfits = P.search(cfg, cluster, "1f1b")
    assert plans and all(p.best.fits and p.best.name == "1f1b" for p in plans)
    assert [p.best.step for p in plans] == sorted(p.best.step for p in plans)
    plans, misfits = P.search(cfg, cluster)
    text = P.render_search(plans, misfits, cfg, cluster, None, 10)
    assert "layouts fit" in text and len({(p.pp, p.ep) for p in plans}) == len(plans)


def test_tiny_on_one_node_has_no_inter_node_traffic():
    cfg, cluster, defaults = P.load_plan_config(["model=tiny", "parallel.ep=4", "cluster.nodes=1",
                                                 "cluster.gpus_per_node=4", "train.global_batch_size=64"])
    assert "train.micro_batch_size=1" in defaults and cfg.train.seq_len == 256
    p = P.evaluate(cfg, cluster)
    assert p.best.fits and p.dp == 4 and p.n_micro == 16
    assert all(lk == "intra" for (_, lk) in p.traffic[(False, False)].per_token)
    cfg2 = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, pp=2, ep=2))
    assert P.evaluate(cfg2, cluster).best.stages_per_rank == 2


@pytest.mark.parametrize("override,field", [
    ("train.stepz=3", "train.stepz"), ("train.steps=abc", "train.steps"), ("+train.foo=1", "train.foo"),
    ("model=nope", "model/nope"), ("parallel.pp=0", "parallel.pp"), ("cluster.nodes=abc", "cluster.nodes"),
    ("cluster.nic=1", "cluster.nic"), ("cluster.gpu=a100", "cluster.gpu")])
def test_bad_overrides_name_the_field(override, field, capsys):
    """The job's overrides go through launcher.config (hydra), the cluster's through load_cluster: exit 2."""
    assert P.main(["model=tiny", "cluster.nodes=1", override]) == 2
    assert field in capsys.readouterr().err


def test_plan_runs_from_any_directory(tmp_path):
    """A fresh process outside the repository: conf/ comes from the installed package, not the cwd."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "moeforge.launcher.plan", *TINY], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.rstrip().splitlines()[-1].startswith("verdict: fits"), out


def test_null_micro_batch_takes_the_plan_default():
    """train.micro_batch_size=null (the trainer's "derive it") plans with the plan's default of 1, and says so."""
    cfg, _, defaults = P.load_plan_config(["model=671b", "train.micro_batch_size=null"])
    assert cfg.train.micro_batch_size == 1 and "train.micro_batch_size=1" in defaults
