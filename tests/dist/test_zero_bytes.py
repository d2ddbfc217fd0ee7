"""ZeRO-1's gradient path and its data-parallel bytes (parallel/zero.py).

Gloo ranks (dp 2 and 4, ep 1/2/4): each rank backprops its own tokens over two micro-batches into the
optimizer's FP32 grad buffer (the AccumulateGrad hooks), ShardedAdamW.reduce_gradients reduce-scatters
it, clip_grad_norm_ takes the norm from the slices, step() updates and all-gathers. The reference is the
all-reduce path on a twin model: grad_sync.reduce_gradients + clip_grad_norm_ + the unsharded optimizer.
Measured on gloo: the reduce-scatter equals an all-reduce of the same bucket bitwise. Against grad_sync's
all-reduce of the grads concatenated in its own order: bitwise at dp 2 (a + b commutes); at dp 4 FP32
sums differ by rounding, since a ring sums an element in an order set by its position in the buffer
(measured: grads within 6.7e-8 of the parameter's largest |grad|, parameters within 7.2e-7 after one step
at lr 1e-2; asserted 1e-6 and 1e-5); BF16 grads summed in FP32 are exact, so bitwise at dp 4 too. Where
the sums are bitwise, so is the update, and the global norm (fp64 accumulation on both sides) agrees to
one float32 ulp (asserted 2e-7). The bytes the counters log per step equal dp_bytes_per_step, and the
tensors' bytes equal memory_per_rank, in FP32 and BF16, one bucket and several.
"""
import pytest
import torch
from _spawn import run_ranks
from test_zero import N_EXPERTS, ToyMoE, batch, loss_fn, no_decay

from moeforge.model.transformer import is_expert_param
from moeforge.parallel.zero import dp_bytes_per_step, flat_buckets, memory_per_rank


def test_flat_buckets_close_at_parameter_boundaries_and_pad_each_bucket():
    # one bucket: the plain layout (shard = ceil(numel / (n·align))·align)
    (b,) = flat_buckets([100, 30, 5], 4, align=8)
    assert (b.start, b.numel, b.local, b.used) == (0, 160, 0, 135)
    bs = flat_buckets([100, 30, 5, 300, 7], 2, align=8, bucket_numel=128)
    # [100] closes before 30 would pass 128; [30, 5]; 300 alone (over the bucket); [7]
    assert [x.used for x in bs] == [100, 35, 300, 7]
    assert [x.numel for x in bs] == [112, 48, 304, 16]
    assert [x.start for x in bs] == [0, 112, 160, 464] and [x.local for x in bs] == [0, 56, 80, 232]
    assert flat_buckets([], 4) == [] and flat_buckets(0, 4) == []
    with pytest.raises(ValueError, match="n=0"):
        flat_buckets([3], 0)


def test_dp_bytes_and_memory_formulas():
    # dense 1000 elements over dp 4 (align 8: 1024 padded, 256 per rank), experts 100 over edp 2 (112, 56)
    got = dp_bytes_per_step([1000], [100], dp=4, edp=2, grad_bytes=4, weight_bytes=2, align=8)
    assert got == {"grad_reduce_scatter": 3 * 256 * 4 + 1 * 56 * 4, "weight_all_gather": 3 * 256 * 2 + 1 * 56 * 2}
    assert dp_bytes_per_step(1000, 100, dp=1, edp=1, align=8) == {"grad_reduce_scatter": 0, "weight_all_gather": 0}
    mem = memory_per_rank([1000], [100], dp=4, edp=2, weight_bytes=2, moment_bytes=2, align=8)
    assert mem == {"weights": (1024 + 112) * 2, "grads": (1024 + 112) * 4, "masters": (256 + 56) * 4,
                   "moments": 2 * (256 + 56) * 2}
    assert memory_per_rank([1000], [], dp=4, edp=1, align=8)["masters"] == 0  # FP32: the weights are the masters


def _named(model, ep, ep_rank):
    per = N_EXPERTS // ep
    local = {str(e) for e in range(ep_rank * per, (ep_rank + 1) * per)}
    return [(n, p) for n, p in model.named_parameters() if not is_expert_param(n) or n.split(".")[2] in local]


def _zero_vs_allreduce(rank, world, bucket_numel, dtype_name):
    import torch.distributed as dist

    from moeforge.parallel.dims import ParallelDims
    from moeforge.parallel.grad_sync import clip_grad_norm_, reduce_gradients
    from moeforge.parallel.mesh import build_meshes
    from moeforge.parallel.zero import ShardedAdamW

    dtype = getattr(torch, dtype_name)
    out = {}
    for ep in (1, 2, 4):
        if ep > world:
            continue
        dims = ParallelDims(world, pp=1, ep=ep)
        meshes = build_meshes(dims, "cpu", timeout_s=30)
        c = meshes.coords
        res = {}
        for max_norm in (1e9, 0.05):  # no clipping (coefficient exactly 1), then clipping
            new, ref = ToyMoE(dim=96).to(dtype), ToyMoE(dim=96).to(dtype)
            nn_, nr = _named(new, ep, c.ep), _named(ref, ep, c.ep)
            kw = dict(lr=1e-2, weight_decay=0.1, no_decay=no_decay)
            zo = ShardedAdamW(nn_, dense_group=meshes.dp, expert_group=meshes.edp, bucket_numel=bucket_numel, **kw)
            un = ShardedAdamW(nr, bucket_numel=bucket_numel, **kw)
            fp32_ref = {n: torch.zeros(p.shape) for n, p in nr}  # the micro-batch grads summed in FP32
            for micro in range(2):  # two micro-batches accumulate into the grad buffer
                x = batch(c.dp, micro).to(dtype)
                (loss_fn(new, x) / 2).backward()
                got = torch.autograd.grad(loss_fn(ref, x) / 2, [q for _, q in nr])
                for (n, _), g in zip(nr, got):
                    fp32_ref[n] += g.float()
            hooked = all((p.grad is None) if dtype != torch.float32 else (p.grad is p.main_grad) for _, p in nn_)
            accumulated = all(torch.equal(p.main_grad, fp32_ref[n]) for n, p in nn_)
            # the reference path in FP32: grad_sync's all-reduce and clipping on FP32 stand-ins of the grads
            shadow = [(n, torch.nn.Parameter(torch.zeros(q.shape))) for n, q in nr]
            for n, q in shadow:
                q.grad = fp32_ref[n]
            # the EP all-to-all backward would sum each expert's grads over ep into its holder: stand-in
            for (n, p), (_, q) in zip(nn_, shadow):
                if is_expert_param(n) and ep > 1:
                    dist.all_reduce(p.main_grad, group=meshes.ep)
                    dist.all_reduce(q.grad, group=meshes.ep)
            zo.counters.reset()
            # each bucket all-reduced instead: the same sums, bitwise (gloo)?
            same_buffer = [g.grads.clone() for g in zo.groups]
            for g, buf in zip(zo.groups, same_buffer):
                for bk in g.buckets if g.n > 1 else []:
                    dist.all_reduce(buf[bk.start:bk.start + bk.numel], group=g.group)
            zo.reduce_gradients()
            rs_equals_ar = all(torch.equal(g.grads[lo:lo + k], buf[lo:lo + k].div_(dims.dp) if g.n > 1 else
                                           g.grads[lo:lo + k])
                               for g, buf in zip(zo.groups, same_buffer) for lo, _, k in g.slices)
            reduce_gradients(shadow, meshes)
            ref_grads = {n: q.grad.reshape(-1).clone() for n, q in shadow}
            grads_equal, worst = True, 0.0  # worst: |difference| / the largest |grad| of the parameter
            for g in zo.groups:
                for s, a, b, _ in g.pieces:
                    mine = g.grads[s.start + a:s.start + b]
                    want = ref_grads[s.name][a:b]
                    grads_equal &= torch.equal(mine, want)
                    worst = max(worst, float((mine - want).abs().max() / ref_grads[s.name].abs().max()))
            norm = zo.clip_grad_norm_(max_norm, meshes)
            ref_norm = clip_grad_norm_(shadow, max_norm, meshes)
            for (_, q), (_, sq) in zip(nr, shadow):  # the unsharded optimizer takes them as reduced
                q.grad = None
                q.main_grad.copy_(sq.grad)
            zo.step()
            un.step()
            params_equal = all(torch.equal(p, q) for (_, p), (_, q) in zip(nn_, nr))
            param_worst = max(float(((p.detach().float() - q.detach().float()).abs()).max()) for (_, p), (_, q) in zip(nn_, nr))
            masters_equal = all(torch.equal(zo.state_dict()["state"][n].get("master", torch.zeros(0)),
                                            un.state_dict()["state"][n].get("master", torch.zeros(0))[
                                                e["start"]:e["end"]])
                                for n, e in zo.state_dict()["state"].items())
            counted = dict(zo.counters.as_dict())
            numels = zo.flat_numels()
            elem = torch.empty(0, dtype=dtype).element_size()
            want_bytes = dp_bytes_per_step(numels["dense"], numels["experts"], dims.dp, dims.edp, 4, elem,
                                           bucket_numel=bucket_numel)
            mem = memory_per_rank(numels["dense"], numels["experts"], dims.dp, dims.edp, elem, 4,
                                  bucket_numel=bucket_numel)
            res[max_norm] = dict(hooked=hooked, rs_equals_ar=rs_equals_ar, accumulated=accumulated, grads_equal=grads_equal, grad_worst=worst,
                                 norm=float(norm), ref_norm=float(ref_norm), params_equal=params_equal,
                                 param_worst=param_worst, masters_equal=masters_equal, counted=counted,
                                 want_bytes=want_bytes, mem=mem, mem_seen=zo.memory_bytes(),
                                 buckets=len(zo.groups[0].buckets), dp=dims.dp,
                                 shard_numel=sum(g.shard for g in zo.groups),
                                 master_numel=sum(0 if g.master is None else g.master.numel() for g in zo.groups))
        out[ep] = res
        dist.barrier()
    return out


@pytest.mark.timeout(240)
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("bucket_numel,dtype", [(1 << 27, "float32"), (5000, "float32"), (5000, "bfloat16")])
def test_zero1_gradient_path_matches_the_all_reduce_path(world, bucket_numel, dtype):
    results = run_ranks(_zero_vs_allreduce, world, bucket_numel, dtype, timeout_s=200)
    for rank, res in enumerate(results):
        for ep, by_clip in res.items():
            for max_norm, r in by_clip.items():
                where = (rank, ep, max_norm, r)
                assert r["hooked"] and r["accumulated"], where  # FP32 accumulation into the grad buffer
                assert r["buckets"] == (1 if bucket_numel > 1e6 else r["buckets"]) and \
                    (bucket_numel > 1e6 or r["buckets"] > 1), where
                assert r["rs_equals_ar"], where  # gloo: reduce-scatter == all-reduce of the same buffer, bitwise
                # vs the all-reduce of the grads laid out as grad_sync concatenates them: bitwise at dp 2 (a + b
                # commutes); at dp 4 the ring sums an element in an order set by its position in the buffer
                assert r["grads_equal"] or (world > 2 and r["grad_worst"] < 1e-6), where
                assert r["norm"] == pytest.approx(r["ref_norm"], rel=1e-6 if not r["grads_equal"] else 2e-7), where
                if max_norm > 1e6 and r["grads_equal"]:
                    assert r["norm"] < max_norm and r["params_equal"] and r["masters_equal"], where
                else:
                    assert r["param_worst"] < 1e-5, where
                assert r["counted"]["dp/grad_reduce_scatter_bytes"] == r["want_bytes"]["grad_reduce_scatter"], where
                assert r["counted"]["dp/weight_all_gather_bytes"] == r["want_bytes"]["weight_all_gather"], where
                assert r["want_bytes"]["grad_reduce_scatter"] > 0, where
                assert r["mem_seen"] == r["mem"], where
                # BF16: the FP32 masters exist for the rank's slices only (1/dp of the dense elements)
                assert r["master_numel"] == (0 if dtype == "float32" else r["shard_numel"]), where


COMMON = ["train.seq_len=32", "train.global_batch_size=8", "train.micro_batch_size=2", "train.sample_tokens=0",
          "logging.progress=false", "train.eval_interval=100", "parallel.timeout_s=60"]


def _trainer_step(rank, world, data_dir, run_dir):
    """One training step of the tiny model at dp = world (ep 2), in FP32 and in BF16: the step record's dp
    bytes, the optimizer's memory and its masters."""
    import torch.distributed as dist

    from moeforge.launcher.config import load_job_config
    from moeforge.train.build import setup_distributed
    from moeforge.train.trainer import Trainer

    out = {}
    for dtype in ("float32", "bfloat16"):
        cfg = load_job_config(COMMON + [f"data.dir={data_dir}", f"run_dir={run_dir}/{dtype}", "parallel.ep=2",
                                        f"model.dtype={dtype}"])
        env, meshes = setup_distributed(cfg)
        tr = Trainer(cfg, env, meshes)
        rec = tr.train_step()
        opt, d = tr.optimizer, meshes.dims
        numels = opt.flat_numels()
        elem = 4 if dtype == "float32" else 2
        out[dtype] = dict(
            record={k: v for k, v in rec.items() if k.startswith("dp/")}, loss=rec["loss"],
            want=dp_bytes_per_step(numels["dense"], numels["experts"], d.dp, d.edp, 4, elem),
            mem=opt.memory_bytes(), want_mem=memory_per_rank(numels["dense"], numels["experts"], d.dp, d.edp, elem,
                                                              4),
            param_dtypes=sorted({str(p.dtype) for _, p in tr.named_params}),
            grads_none=all(p.grad is None for _, p in tr.named_params),
            dense_numel=sum(numels["dense"]), dp=d.dp)
        dist.barrier()
    return out


@pytest.mark.timeout(300)
def test_trainer_step_logs_dp_bytes_equal_to_the_formula(stdlib_data, tmp_path):
    results = run_ranks(_trainer_step, 2, stdlib_data, str(tmp_path), timeout_s=280)
    for rank, res in enumerate(results):
        for dtype, r in res.items():
            assert r["record"] == {"dp/grad_reduce_scatter_bytes": r["want"]["grad_reduce_scatter"],
                                   "dp/weight_all_gather_bytes": r["want"]["weight_all_gather"],
                                   "dp/calls": r["record"]["dp/calls"]}, (rank, dtype, r)
            assert r["record"]["dp/calls"] >= 2 and r["want"]["grad_reduce_scatter"] > 0, (rank, dtype, r)
            assert r["mem"] == r["want_mem"] and r["grads_none"], (rank, dtype, r)
            assert r["param_dtypes"] == [f"torch.{dtype}"] and r["loss"] > 0, (rank, dtype, r)
        f32, b16 = res["float32"], res["bfloat16"]
        # BF16: the weights all-gathered in half the bytes; FP32 masters for this rank's slices only
        assert b16["want"]["weight_all_gather"] * 2 == f32["want"]["weight_all_gather"]
        assert b16["want"]["grad_reduce_scatter"] == f32["want"]["grad_reduce_scatter"]
        # (the dense masters are halved at dp 2; the experts' are whole: edp = 1 at ep 2 on 2 ranks)
        assert f32["mem"]["masters"] == 0 and 0 < b16["mem"]["masters"] < b16["mem"]["grads"]
