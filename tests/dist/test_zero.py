"""ShardedAdamW (ZeRO-1) and grad_sync.

Single process: the update equals torch.optim.AdamW(foreach=False) (asserted to rtol 1e-7; bitwise on
this machine); BF16 moments equal an FP32-arithmetic reference that rounds the moments to BF16 after
each step; state_dict round trip; backward accumulates into the FP32 grad buffer. Four gloo ranks: ZeRO-1
vs the unsharded optimizer with the same grads gives bitwise-identical params and moments (FP32 and BF16
moments, one bucket or several), optimizer-state bytes per rank are 1/dp (dense) and 1/edp (experts) of
the unsharded ones within the alignment padding, state reshards between layouts, and reduce_gradients /
clip_grad_norm_ match a single-process reference. The reduce-scatter path itself: test_zero_bytes.py.
"""
import zlib

import pytest
import torch
import torch.nn as nn
from _spawn import run_ranks

from moeforge.model.transformer import is_expert_param
from moeforge.parallel.grad_sync import all_reduce_sum_, clip_grad_norm_, reduce_gradients
from moeforge.parallel.zero import ShardedAdamW

N_EXPERTS = 4


class ToyMoE(nn.Module):
    """embed -> (router-weighted sum of routed experts) -> norm -> head. Routed experts are named
    `moe.experts.<global index>.*`; `experts` selects which global experts this rank holds."""

    def __init__(self, experts=range(N_EXPERTS), dim=32, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.embed = nn.Linear(24, dim)
        self.moe = nn.Module()
        self.moe.router = nn.Linear(dim, N_EXPERTS, bias=False)
        self.moe.experts = nn.ModuleDict({str(e): nn.Linear(dim, dim) for e in range(N_EXPERTS)})
        self.moe.shared_experts = nn.Linear(dim, dim)  # dense, despite the name
        self.norm = nn.Parameter(torch.ones(dim))
        self.head = nn.Linear(dim, 8)
        with torch.no_grad():
            for _, p in sorted(self.named_parameters()):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        for e in set(range(N_EXPERTS)) - set(experts):
            del self.moe.experts[str(e)]

    def forward(self, x):
        h = torch.tanh(self.embed(x))
        scores = torch.softmax(self.moe.router(h), dim=-1)
        y = sum(scores[:, int(e):int(e) + 1] * exp(h) for e, exp in self.moe.experts.items())
        return self.head((h + y + self.moe.shared_experts(h)) * self.norm)


def no_decay(name, p):
    return p.ndim < 2


def batch(dp_rank, step=0):
    g = torch.Generator().manual_seed(1000 * step + dp_rank)
    return torch.randn(6 + dp_rank, 24, generator=g)  # uneven token counts: the mean is per rank


def loss_fn(model, x):
    return model(x).square().mean()


def set_grads(named, step):
    """Deterministic grads that depend on the parameter's name only (identical on every rank)."""
    for name, p in named:
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()) + 7919 * step)
        p.grad = torch.randn(p.shape, generator=g) * (0.1 + 0.01 * step)


def in_stage(name, stage, pp):
    """With pp = 2, stage 0 holds embed + moe and stage 1 the norm + head: different params per stage."""
    return pp == 1 or name.startswith(("embed", "moe")) == (stage == 0)


# ---------------------------------------------------------------- single process


def test_matches_torch_adamw():
    """Same formula as torch.optim.AdamW(foreach=False); asserted to 1e-7 relative (bitwise here)."""
    ours, ref = ToyMoE(), ToyMoE()
    opt = ShardedAdamW(list(ours.named_parameters()), lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                       no_decay=no_decay)
    decay = [p for n, p in ref.named_parameters() if not no_decay(n, p)]
    plain = [p for n, p in ref.named_parameters() if no_decay(n, p)]
    topt = torch.optim.AdamW([{"params": decay}, {"params": plain, "weight_decay": 0.0}], lr=3e-3,
                             betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, foreach=False)
    for step in range(4):
        lr = 3e-3 * (1 - 0.2 * step)
        for m in (ours, ref):
            loss_fn(m, batch(0, step)).backward()
        opt.step(lr)
        for group in topt.param_groups:
            group["lr"] = lr
        topt.step()
        opt.zero_grad()
        topt.zero_grad()
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-7, atol=0, msg=name)
        assert not torch.equal(p, ToyMoE().state_dict()[name])  # it trained


def test_bf16_moments_store_bf16_and_compute_fp32():
    model = ToyMoE()
    named = list(model.named_parameters())
    opt = ShardedAdamW(named, lr=1e-2, no_decay=no_decay, moment_dtype=torch.bfloat16)
    fp32 = ShardedAdamW(list(ToyMoE().named_parameters()), lr=1e-2, no_decay=no_decay)
    assert opt.state_bytes() * 2 == fp32.state_bytes()
    # reference: AdamW in fp32 whose moments are rounded to bf16 after every step
    ref = {n: p.detach().clone() for n, p in named}
    m = {n: torch.zeros_like(p, dtype=torch.bfloat16) for n, p in named}
    v = {n: torch.zeros_like(p, dtype=torch.bfloat16) for n, p in named}
    for t in range(1, 4):
        set_grads(named, t)
        opt.step()
        for n, p in named:
            g, r = p.grad, ref[n]
            if not no_decay(n, r):
                r.mul_(1 - 1e-2 * 0.1)
            m32, v32 = m[n].float().lerp_(g, 0.1), v[n].float().mul_(0.95).addcmul_(g, g, value=0.05)
            r.addcdiv_(m32, (v32.sqrt() / (1 - 0.95 ** t) ** 0.5).add_(1e-8), value=-1e-2 / (1 - 0.9 ** t))
            m[n], v[n] = m32.bfloat16(), v32.bfloat16()
    sd = opt.state_dict()
    assert sd["moment_dtype"] == "bfloat16"
    for n, p in named:
        assert torch.equal(p, ref[n]), n
        assert sd["state"][n]["exp_avg"].dtype == torch.bfloat16
        assert torch.equal(sd["state"][n]["exp_avg"], m[n].reshape(-1))


def test_state_dict_round_trip_and_missing_grads():
    a, b = ToyMoE(), ToyMoE()
    oa = ShardedAdamW(list(a.named_parameters()), lr=1e-2, no_decay=no_decay)
    for t in range(2):
        loss_fn(a, batch(0, t)).backward()
        oa.step()
        oa.zero_grad()
    b.load_state_dict(a.state_dict())
    ob = ShardedAdamW(list(b.named_parameters()), lr=1e-2, no_decay=no_decay)
    ob.load_state_dict(oa.state_dict())
    for opt, m in ((oa, a), (ob, b)):
        loss_fn(m, batch(0, 5)).backward()
        m.moe.experts["1"].weight.grad = None  # a parameter without a grad counts as zero grad
        opt.step()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
    with pytest.raises(ValueError, match=r"optimizer state for moe.experts.0.weight\[0:1024\]"):
        sd = oa.state_dict()
        del sd["state"]["moe.experts.0.weight"]
        ob.load_state_dict(sd)


def test_low_precision_params_keep_their_fp32_master_through_state_dict():
    """A bf16 parameter's FP32 value lives only in the optimizer's flat buffer: state_dict carries it as
    "master", load_state_dict restores it, so training goes on bit for bit; without it the master is
    rebuilt from the (rounded) parameter."""
    def bf16_grads(named, step):
        for name, p in named:
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()) + 7919 * step)
            p.grad = torch.randn(p.shape, generator=g).to(p.dtype)

    a, b, c = (nn.Linear(16, 16).to(torch.bfloat16) for _ in range(3))
    oa = ShardedAdamW(list(a.named_parameters()), lr=1e-3)
    for t in (1, 2):
        bf16_grads(list(a.named_parameters()), t)
        oa.step()
    sd = oa.state_dict()
    assert oa.shard_layout() == {"weight": ((16, 16), 0, 256), "bias": ((16,), 0, 16)}
    master = sd["state"]["weight"]["master"]
    assert master.dtype == torch.float32 and not torch.equal(master, a.weight.float().reshape(-1))
    for m in (b, c):
        m.load_state_dict(a.state_dict())
    ob, oc = (ShardedAdamW(list(m.named_parameters()), lr=1e-3) for m in (b, c))
    ob.load_state_dict(sd)
    oc.load_state_dict({**sd, "state": {n: {k: v for k, v in e.items() if k != "master"}
                                        for n, e in sd["state"].items()}})
    for m, opt in ((a, oa), (b, ob), (c, oc)):
        bf16_grads(list(m.named_parameters()), 3)
        opt.step()
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert torch.equal(ob.state_dict()["state"]["weight"]["master"], oa.state_dict()["state"]["weight"]["master"])
    assert torch.equal(oc.state_dict()["state"]["weight"]["exp_avg"], oa.state_dict()["state"]["weight"]["exp_avg"])
    assert not torch.equal(oc.state_dict()["state"]["weight"]["master"], oa.state_dict()["state"]["weight"]["master"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_accumulates_into_the_fp32_grad_buffer(dtype):
    """Autograd's grads land in the optimizer's FP32 grad buffer (p.main_grad): an FP32 parameter's .grad
    is that view after backward (later micro-batches add in place, bitwise torch's accumulation); a BF16
    parameter keeps no .grad and its micro-batch grads are summed in FP32. zero_grad drops .grad as
    torch.optim does and zeroes the buffer."""
    model, ref = ToyMoE().to(dtype), ToyMoE().to(dtype)
    opt = ShardedAdamW(list(model.named_parameters()), lr=1e-2, no_decay=no_decay)
    for step in range(2):
        want = {n: torch.zeros(p.shape) for n, p in ref.named_parameters()}
        for micro in range(3):
            loss_fn(model, batch(micro, step).to(dtype)).backward()
            for (n, p), g in zip(ref.named_parameters(), torch.autograd.grad(loss_fn(ref, batch(micro, step).to(dtype)),
                                                                             list(ref.parameters()))):
                want[n] += g.float()
        for n, p in model.named_parameters():
            assert p.main_grad.dtype == torch.float32 and torch.equal(p.main_grad, want[n]), n
            assert (p.grad is p.main_grad) if dtype == torch.float32 else p.grad is None, n
        if dtype == torch.float32:  # torch's own accumulation, bitwise
            ref.zero_grad()
            for micro in range(3):
                loss_fn(ref, batch(micro, step)).backward()
            assert all(torch.equal(p.main_grad, q.grad) for p, q in zip(model.parameters(), ref.parameters()))
        opt.zero_grad()
        assert all(p.grad is None and not p.main_grad.any() for p in model.parameters())


def test_params_become_views_of_the_flat_buffer():
    model = ToyMoE()
    opt = ShardedAdamW(list(model.named_parameters()), lr=1e-2, no_decay=no_decay)
    dense, expert = opt.groups
    assert model.embed.weight.untyped_storage().data_ptr() == dense.weights.untyped_storage().data_ptr()
    assert model.moe.experts["2"].weight.untyped_storage().data_ptr() == expert.weights.untyped_storage().data_ptr()
    assert model.moe.shared_experts.weight.untyped_storage().data_ptr() == dense.weights.untyped_storage().data_ptr()
    assert dense.weights.numel() % 128 == 0 and dense.numel <= dense.weights.numel() < dense.numel + 128


# ---------------------------------------------------------------- 4 gloo ranks


def _zero_vs_unsharded(rank, world, moment_dtype_name, bucket_numel=1 << 27):
    import torch.distributed as dist

    from moeforge.parallel.dims import ParallelDims
    from moeforge.parallel.mesh import build_meshes

    moment_dtype = getattr(torch, moment_dtype_name)
    out = {}
    for pp, ep in ((1, 1), (1, 2), (2, 2)):
        dims = ParallelDims(world, pp=pp, ep=ep)
        meshes = build_meshes(dims, "cpu", timeout_s=30)
        per = N_EXPERTS // ep
        local = range(meshes.coords.ep * per, (meshes.coords.ep + 1) * per)
        sharded, plain = ToyMoE(local, dim=96), ToyMoE(local, dim=96)
        ns = [(n, p) for n, p in sharded.named_parameters() if in_stage(n, meshes.coords.pp, pp)]
        nu = [(n, p) for n, p in plain.named_parameters() if in_stage(n, meshes.coords.pp, pp)]
        kw = dict(lr=1e-2, weight_decay=0.1, no_decay=no_decay, moment_dtype=moment_dtype)
        zo = ShardedAdamW(ns, dense_group=meshes.dp, expert_group=meshes.edp, bucket_numel=bucket_numel, **kw)
        un = ShardedAdamW(nu, **kw)  # one bucket: the state dicts are layout-free
        init = {n: p.detach().clone() for n, p in ns}
        for t in range(1, 4):
            set_grads(ns, t)
            set_grads(nu, t)
            zo.step()
            un.step()
            zo.zero_grad()
            un.zero_grad()
        # every parameter trained, and to the unsharded optimizer's bits
        moved = [n for n, p in ns if not torch.equal(p, init[n])]
        param_diff = [n for (n, p), (_, q) in zip(ns, nu) if not torch.equal(p, q)]
        # moments: this rank's pieces equal the same ranges of the unsharded state (the test checks that
        # the pieces of all ranks cover every parameter)
        zsd, usd = zo.state_dict(), un.state_dict()
        kinds = ("exp_avg", "exp_avg_sq")
        moment_diff = [n for n, e in zsd["state"].items() for k in kinds
                       if not torch.equal(e[k], usd["state"][n][k][e["start"]:e["end"]])]
        # reshard: every rank's pieces (of this stage and ep index) load into an unsharded optimizer,
        # and the unsharded state loads into a sharded one
        pieces = [None] * world
        dist.all_gather_object(pieces, zsd)
        mine = [pieces[r] for r in range(world) if r in set(meshes.ranks("dp"))]
        mine = [{**sd, "state": {n: e for n, e in sd["state"].items() if n in dict(nu)}} for sd in mine]
        un2 = ShardedAdamW([(n, p.detach().clone().requires_grad_()) for n, p in nu], **kw)
        un2.load_state_dict(mine)
        in_diff = [n for n in usd["state"] for k in kinds if not torch.equal(un2.state_dict()["state"][n][k],
                                                                              usd["state"][n][k])]
        zo2 = ShardedAdamW([(n, p.detach().clone().requires_grad_()) for n, p in ns],
                           dense_group=meshes.dp, expert_group=meshes.edp, bucket_numel=bucket_numel, **kw)
        zo2.load_state_dict(usd)
        out_diff = [n for n, e in zsd["state"].items() for k in kinds
                    if not torch.equal(zo2.state_dict()["state"][n][k], e[k])]
        wrong_group_caught = None
        if ep > 1 and any(is_expert_param(n) for n, _ in ns):
            # experts differ across ep ranks: sharding them over dp must be refused, not silently wrong
            try:
                ShardedAdamW([(n, p.detach().clone().requires_grad_()) for n, p in ns], dense_group=meshes.dp,
                             expert_group=meshes.dp, **kw)
                wrong_group_caught = False
            except ValueError as e:
                wrong_group_caught = "hold different parameters" in str(e)
        bytes_ = {kind: (g.exp_avg.numel() + g.exp_avg_sq.numel()) * g.exp_avg.element_size()
                  for kind, g in zip(("dense", "expert"), zo.groups)}
        full = {kind: 2 * g.numel * g.exp_avg.element_size() for kind, g in zip(("dense", "expert"), un.groups)}
        out[(pp, ep)] = dict(params=len(ns), moved=len(moved), param_diff=param_diff, moment_diff=moment_diff,
                             numel={n: p.numel() for n, p in ns},
                             owned={n: (e["start"], e["end"]) for n, e in zsd["state"].items()},
                             unsharded_names=sorted(usd["state"]), in_diff=in_diff, out_diff=out_diff,
                             wrong_group_caught=wrong_group_caught,
                             state_bytes=zo.state_bytes(), bytes=bytes_,
                             full=full, unsharded_state_bytes=un.state_bytes(), dp=dims.dp, edp=dims.edp,
                             elem=zo.groups[0].exp_avg.element_size(), buckets=max(len(g.buckets) for g in zo.groups),
                             checksum=float(sum(p.double().sum() for _, p in ns)))
    return out


@pytest.mark.timeout(120)
@pytest.mark.parametrize("moment_dtype,bucket_numel", [("float32", 1 << 27), ("bfloat16", 1 << 27), ("float32", 3000)])
def test_zero1_bitwise_equals_unsharded_and_holds_1_over_dp_of_the_state(moment_dtype, bucket_numel):
    """bucket_numel 3000: several buckets, each rank owning a slice of each (reshards to one bucket)."""
    results = run_ranks(_zero_vs_unsharded, 4, moment_dtype, bucket_numel, timeout_s=100)
    assert all(sorted(res) == [(1, 1), (1, 2), (2, 2)] for res in results)
    for layout in results[0]:
        # the ranks' moment pieces tile every parameter: element [0, numel) of each is owned somewhere
        owned: dict[str, list[tuple[int, int]]] = {}
        numel: dict[str, int] = {}
        for res in results:
            numel.update(res[layout]["numel"])
            for n, ab in res[layout]["owned"].items():
                owned.setdefault(n, []).append(ab)
        assert sorted(owned) == sorted(numel), layout
        assert all(_union(owned[n]) == [(0, size)] for n, size in numel.items()), (layout, owned, numel)
    for rank, res in enumerate(results):
        for layout, r in res.items():
            assert r["buckets"] == 1 or bucket_numel < 1e6, (rank, layout, r["buckets"])
            assert r["params"] > 0 and r["moved"] == r["params"], (rank, layout, r["moved"])
            assert r["param_diff"] == [] and r["moment_diff"] == [], (rank, layout)
            assert r["unsharded_names"] == sorted(r["numel"]), (rank, layout)  # every parameter, reloaded
            assert r["in_diff"] == [] and r["out_diff"] == [], (rank, layout)
            # checked where the rank holds experts and ep > 1: (1, 2) everywhere, (2, 2) on stage 0
            expect = True if layout == (1, 2) or (layout == (2, 2) and rank < 2) else None
            assert r["wrong_group_caught"] is expect, (rank, layout)
            pad = 2 * 128 * r["elem"] * r["buckets"]  # two moments, at most one alignment block per rank and bucket
            # dense state is 1/dp of the unsharded, expert state 1/edp, to within the padding
            assert 0 <= r["bytes"]["dense"] * r["dp"] - r["full"]["dense"] < r["dp"] * pad, (rank, layout, r)
            assert 0 <= r["bytes"]["expert"] * r["edp"] - r["full"]["expert"] < r["edp"] * pad, (rank, layout, r)
            assert r["state_bytes"] == r["bytes"]["dense"] + r["bytes"]["expert"]
    assert bucket_numel > 1e6 or all(res[(1, 1)]["buckets"] > 1 for res in results)  # several buckets tested
    # ep = 1: the whole optimizer state per rank is ~1/dp of the unsharded total
    r = results[0][(1, 1)]
    assert r["state_bytes"] / r["unsharded_state_bytes"] == pytest.approx(1 / 4, rel=0.02)
    # with pp = ep = 1 every rank ends with the same parameters
    assert len({res[(1, 1)]["checksum"] for res in results}) == 1


def _union(intervals: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(intervals):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def _grad_sync_and_clip(rank, world):
    import torch.distributed as dist

    from moeforge.parallel.dims import ParallelDims
    from moeforge.parallel.mesh import build_meshes

    out = {}
    for pp, ep in ((1, 1), (1, 2), (2, 2), (1, 4)):
        dims = ParallelDims(world, pp=pp, ep=ep)
        meshes = build_meshes(dims, "cpu", timeout_s=30)
        c = meshes.coords
        # reference: the single-process model, loss = (1/dp) sum over dp ranks of each rank's mean loss
        ref = ToyMoE()
        (sum(loss_fn(ref, batch(r)) for r in range(dims.dp)) / dims.dp).backward()
        # this rank: the whole model on its own tokens; the EP all-to-all backward would sum each expert's
        # grads over the ep group into the rank that holds it: an all-reduce over ep stands in for it here
        model = ToyMoE()
        loss_fn(model, batch(c.dp)).backward()
        for n, p in model.named_parameters():
            if is_expert_param(n):
                dist.all_reduce(p.grad, group=meshes.ep)
        per = N_EXPERTS // ep
        local = {str(e) for e in range(c.ep * per, (c.ep + 1) * per)}
        named = [(n, p) for n, p in model.named_parameters()
                 if in_stage(n, c.pp, pp) and (not is_expert_param(n) or n.split(".")[2] in local)]
        reduce_gradients(named, meshes)
        refp = dict(ref.named_parameters())
        grads_ok = {n: torch.allclose(p.grad, refp[n].grad, rtol=1e-5, atol=1e-7) for n, p in named}
        # clipping: the global norm over all stages and all experts equals the single-process one
        max_norm = 0.05
        norm = clip_grad_norm_(named, max_norm, meshes)
        ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm)
        clipped_ok = {n: torch.allclose(p.grad, refp[n].grad, rtol=1e-5, atol=1e-8) for n, p in named}
        load = torch.full((N_EXPERTS,), float(rank))
        all_reduce_sum_([load], meshes, "dp")
        out[(pp, ep)] = dict(grads_ok=grads_ok, clipped_ok=clipped_ok, norm=norm.item(), ref_norm=ref_norm.item(),
                             n_named=len(named), unclipped_norm_gt=ref_norm.item() > max_norm,
                             load=load[0].item(), dp_sum=float(sum(meshes.ranks("dp"))))
    return out


@pytest.mark.timeout(120)
def test_reduce_gradients_and_clip_match_single_process():
    results = run_ranks(_grad_sync_and_clip, 4, timeout_s=100)
    for rank, res in enumerate(results):
        assert sorted(res) == [(1, 1), (1, 2), (1, 4), (2, 2)], rank
        for layout, r in res.items():
            assert len(r["grads_ok"]) == r["n_named"] > 0 and sorted(r["clipped_ok"]) == sorted(r["grads_ok"])
            assert all(r["grads_ok"].values()), (rank, layout, r["grads_ok"])
            assert r["unclipped_norm_gt"]  # clipping really scaled the grads
            assert r["norm"] == pytest.approx(r["ref_norm"], rel=1e-6), (rank, layout)
            assert all(r["clipped_ok"].values()), (rank, layout, r["clipped_ok"])
            assert r["load"] == r["dp_sum"]
    # rank 2 in pp=2/ep=2 owns the second stage only (norm, head.weight, head.bias); with ep=4 a rank
    # holds 1 of the 4 experts: 8 dense params + its expert's weight and bias
    assert results[2][(2, 2)]["n_named"] == 3 and results[0][(1, 4)]["n_named"] == 10


def test_single_process_reduce_is_identity_and_clip_equals_torch():
    a, b = ToyMoE(), ToyMoE()
    for m in (a, b):
        loss_fn(m, batch(0)).backward()
    reduce_gradients(list(a.named_parameters()), None)
    norm = clip_grad_norm_(list(a.named_parameters()), 0.01)
    ref = torch.nn.utils.clip_grad_norm_(b.parameters(), 0.01)
    torch.testing.assert_close(norm, ref, rtol=1e-6, atol=0)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-9)


def test_clip_norm_params_counts_a_subset_and_scales_all():
    """DualPipe (not V) holds each stage on two ranks: the norm counts chunk 0 only, every grad is scaled."""
    a, b = ToyMoE(), ToyMoE()
    for m in (a, b):
        loss_fn(m, batch(0)).backward()
    named = list(a.named_parameters())
    subset = [(n, p) for n, p in named if n.startswith("head")]
    want = torch.linalg.vector_norm(torch.cat([p.grad.reshape(-1) for _, p in subset]))
    norm = clip_grad_norm_(named, 1e-3, norm_params=subset)
    torch.testing.assert_close(norm, want, rtol=1e-6, atol=0)
    coef = 1e-3 / (want + 1e-6)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad * coef, rtol=1e-6, atol=1e-12)
