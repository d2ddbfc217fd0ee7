"""moeforge.model.split (stage assignment, pruning, the stage's loss) and dualpipe.stage (pieces, B/W split).
Single process, no process group."""
import dataclasses

import pytest
import torch

from moeforge.dualpipe.stage import Chunk, backward_input, run, stage_forward
from moeforge.model.args import load_preset
from moeforge.model.loss import lm_losses, total_loss
from moeforge.model.split import build_stage, build_stages
from moeforge.model.stages import stage_blocks, stage_layers
from moeforge.model.transformer import Transformer


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model's ops are too small for 2 intra-op threads; on a busy 2-core machine they spin
    against other processes and a 0.2 s test takes 20 s."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny():
    return load_preset("tiny")


def _rows(n, seed=0, T=16, D=1, B=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 257, (B, T + 1 + D), generator=g) for _ in range(n)]


# ---- stage assignment -------------------------------------------------------------------------------
def test_deepseek_v3_split_is_balanced(tiny):
    args = dataclasses.replace(tiny, n_layers=61, n_mtp_modules=1)
    assert stage_blocks(args, 16) == [3] + [4] * 14 + [2]  # 4 units on every stage


@pytest.mark.parametrize("n_layers,n_mtp,n_stages", [(4, 1, 1), (4, 1, 2), (4, 1, 4), (6, 1, 8), (7, 0, 3),
                                                     (61, 1, 16), (5, 2, 3)])
def test_stage_layers_cover_the_model_once_in_order(tiny, n_layers, n_mtp, n_stages):
    args = dataclasses.replace(tiny, n_layers=n_layers, n_mtp_modules=n_mtp)
    plan = stage_layers(args, n_stages)
    assert len(plan) == n_stages
    layers = [f for fqns in plan for f in fqns if f.startswith("layers.")]
    assert layers == [f"layers.{i}" for i in range(n_layers)]
    assert plan[0][0] == "embed"
    last = plan[-1]
    assert {"norm", "head"} <= set(last)
    assert [f for f in last if f.startswith("mtp.")] == [f"mtp.{k}" for k in range(n_mtp)]
    assert ("embed" in last) == (n_mtp > 0 or n_stages == 1)  # MTP embeds with the shared table
    for fqns in plan[1:-1]:
        assert fqns and all(f.startswith("layers.") for f in fqns)
    units = [sum(f.startswith("layers.") for f in p) for p in plan]
    units[0] += 1
    units[-1] += 1 + n_mtp
    if n_layers >= n_stages:
        assert max(units) - min(units) <= 1, units


def test_too_few_layers_is_an_error(tiny):
    with pytest.raises(ValueError, match="n_layers"):
        stage_layers(tiny, 8)  # 4 layers cannot fill 6 middle stages


# ---- pruning ----------------------------------------------------------------------------------------
def test_build_stage_on_meta_keeps_logical_keys(tiny):
    full = set(Transformer(tiny, device="meta").state_dict())
    plan = stage_layers(tiny, 4)
    seen = set()
    for s in range(4):
        with torch.device("meta"):
            model = Transformer(tiny)
        stage = build_stage(model, s, 4)
        keys = set(stage.state_dict())
        assert keys == set(model.state_dict()) and keys <= full
        tops = {k.split(".")[0] if not k.startswith(("layers.", "mtp.")) else ".".join(k.split(".")[:2]) for k in keys}
        assert tops == set(plan[s])
        seen |= keys
    assert seen == full
    model.to_empty(device="cpu")
    model.init_weights(0)  # the pruned model still initialises (by name: the same values as the whole model)
    ref = Transformer(tiny)
    ref.init_weights(0)
    for k, v in stage.state_dict().items():
        assert torch.equal(v, ref.state_dict()[k]), k


def test_build_stages_share_the_embedding(tiny):
    with torch.device("meta"):
        model = Transformer(tiny)
    stages = build_stages(model, [0, 3], 4)  # DualPipeV rank 0 with pp=2: first and last stage
    assert stages[0].embed is stages[3].embed is model.embed
    assert list(stages[0].layers) == ["0"] and stages[3].is_last and stages[3].head is model.head


# ---- the stage computes what the single-process loop does -------------------------------------------
def _ref_model(args, n):
    model = Transformer(args)
    model.init_weights(1)
    model.double()
    for m in model.moe_layers():
        m.aux_loss_scale = 1.0 / n
    return model


def _ref_step(model, rows, n):
    losses = []
    for r in rows:
        main, mtp = lm_losses(model, r)
        loss = total_loss(main, mtp, model.args.mtp_loss_weight)
        (loss / n).backward()
        losses.append(loss.detach())
    return losses


@pytest.mark.parametrize("n_stages", [1, 2, 4])
def test_stage_forward_chain_equals_lm_losses(tiny, n_stages):
    rows = _rows(2)
    ref = _ref_model(tiny, 2)
    model = _ref_model(tiny, 2)
    stages = build_stages(model, list(range(n_stages)), n_stages)
    ref_losses = _ref_step(ref, rows, 2)
    for r, want in zip(rows, ref_losses):
        x = None
        for s in range(n_stages):
            x = stages[s](x, r)
        assert torch.equal(x, want)  # bit for bit


@pytest.mark.parametrize("n_stages,split", [(1, False), (1, True), (3, False), (3, True)])
def test_pieces_full_and_split_backward_equal_reference(tiny, n_stages, split):
    """dualpipe.stage: the forward in pieces, then BW (or B of every stage, then every W) over a chain
    of stages in one process, against loss.backward() on the whole model (float64)."""
    n = 3
    rows = _rows(n, seed=1)
    ref = _ref_model(tiny, n)
    ref_losses = _ref_step(ref, rows, n)
    model = _ref_model(tiny, n)
    stages = build_stages(model, list(range(n_stages)), n_stages)
    for r, want in zip(rows, ref_losses):
        x, chunks = None, []
        for s in range(n_stages):
            leaf = None if x is None else x.detach().requires_grad_()
            c = Chunk(s, 0, leaf)
            x = run(stage_forward(c, stages[s], leaf, r, n))
            chunks.append(c)
        assert torch.equal(chunks[-1].loss, want)
        g = None
        for c in reversed(chunks):
            g = run(c.backward(g, split))
        for c in chunks if split else []:
            c.run_weight()
    ref_p = dict(ref.named_parameters())
    for k, p in model.named_parameters():
        r = ref_p[k].grad
        assert p.grad is not None, k
        assert ((p.grad - r).abs().max() / r.abs().max()).item() < 1e-12, k


# ---- the B/W split on small graphs ------------------------------------------------------------------
def _bw_vs_full(build):
    """build() -> (outs, grads, ins, params) on fresh tensors; returns (max err of B+W vs full backward)."""
    outs, grads, ins, params = build()
    want = torch.autograd.grad(outs, list(ins) + list(params), grads, allow_unused=True)
    outs, grads, ins, params = build()
    in_grads, job = backward_input(outs, grads, ins, params)
    for p in params:
        p.grad = None
    job.run()
    got = list(in_grads) + [p.grad for p in params]
    err = 0.0
    for a, b in zip(got, want):
        if b is None:
            assert a is None or a.abs().max() == 0
            continue
        err = max(err, (a - b).abs().max().item())
    return err


def _params(seed, *shapes):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_() for s in shapes]


def test_split_weight_used_twice_on_the_input_path():
    """W is used by two matmuls in a row: two frontier nodes, one below the other (no double count)."""
    def build():
        w, u = _params(0, (5, 5), (5,))
        x = _params(1, (3, 5))[0]
        y = torch.tanh(x @ w) * u
        out = torch.tanh(y @ w).sum(0)
        return [out], [torch.ones(5, dtype=torch.float64)], [x], [w, u]
    assert _bw_vs_full(build) < 1e-14


def test_split_branch_without_input_is_deferred_to_w():
    """An output that does not depend on the input (token embedding) is computed whole in W."""
    def build():
        emb, w = _params(2, (7, 4), (4, 4))
        x = _params(3, (3, 4))[0]
        tok = torch.tensor([1, 2, 6])
        a = emb[tok] @ w  # no input
        b = (x @ w).relu() + emb[tok]
        return [a, b], [torch.ones(3, 4, dtype=torch.float64)] * 2, [x], [emb, w]
    assert _bw_vs_full(build) < 1e-14


def test_split_with_no_differentiable_input():
    def build():
        emb, w = _params(4, (7, 4), (4, 4))
        out = (emb[torch.tensor([0, 3])] @ w).sum()
        return [out], [torch.ones((), dtype=torch.float64)], [], [emb, w]
    assert _bw_vs_full(build) < 1e-14
