"""train.recompute (model/recompute.py): gradients bitwise those of no recompute, and the bytes kept for backward.

Bitwise: the tiny preset through train/engine.py's LocalEngine (two micro-batches, MTP on), float64, float32,
bfloat16 and FP8 (fp8=blockwise, emulate backend), selective and full against none: losses, every gradient
and the MoE loads with torch.equal. The pipeline runtime's B/W split: tests/dist/test_recompute_pipeline.py.

Bytes: train/activations.py measures what a block keeps alive for backward (fake tensors at the model's
shapes, the GPU kernels' saved sets). selective must keep at least the norm outputs and the MLA
up-projection outputs less than none, the amount computed here from the shapes; full must keep exactly the
block's input.
"""
import pytest
import torch

from moeforge.model.args import load_preset
from moeforge.model import recompute
from moeforge.model.recompute import apply_recompute, region
from moeforge.model.transformer import Transformer


def _step(policy: str, dtype: torch.dtype, fp8: bool):
    from moeforge.train.engine import LocalEngine

    args = load_preset("tiny", vocab_size=257)
    model = Transformer(args)
    model.init_weights(3)
    model.to(dtype)
    if fp8:
        from moeforge.fp8 import apply_fp8
        from moeforge.fp8.config import Fp8Config

        apply_fp8(model, Fp8Config(enabled=True, backend="emulate"))
    apply_recompute(model, policy)
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, 257, (2, 34), generator=g) for _ in range(2)]
    sums = LocalEngine(model, torch.device("cpu")).forward_backward(rows)
    assert not recompute._state.outputs  # nothing of the step's regions outlives its backward
    grads = {k: p.grad for k, p in model.named_parameters()}
    loads = [m.tokens_per_expert.clone() for m in model.moe_layers()]
    return sums, grads, loads


@pytest.mark.parametrize("dtype,fp8", [(torch.float64, False), (torch.float32, False), (torch.bfloat16, False),
                                       (torch.float32, True)], ids=["float64", "float32", "bfloat16", "fp8-emulate"])
def test_gradients_bitwise_equal_to_none(dtype, fp8):
    ref_sums, ref_grads, ref_loads = _step("none", dtype, fp8)
    assert all(g is not None for g in ref_grads.values())
    for policy in ("selective", "full"):
        sums, grads, loads = _step(policy, dtype, fp8)
        assert all(torch.equal(a, b) for a, b in zip(sums.__dict__.values(), ref_sums.__dict__.values())), policy
        unequal = [k for k in ref_grads if not torch.equal(grads[k], ref_grads[k])]
        assert not unequal, (policy, unequal)
        assert all(torch.equal(a, b) for a, b in zip(loads, ref_loads)), policy  # full: counted once


def _expected_selective_saving(args, act_bytes: int, moe: bool) -> int:
    """Bytes per token selective must drop at least, from the shapes:
    - every RMSNorm output of the block (attn, q, kv, ffn: the next Linear saves it);
    - the up-projections' outputs that backward holds: wkv_b's (SDPA saves its v part) and the q and k that
      rope and cat make (SDPA saves them). wq_b's own output is not saved without recompute either: rope's
      multiplications keep cos/sin, not their input;
    - below FP32 activations (bfloat16): the FP32 copies the norms make (their backward keeps them) and the
      MoE gate's (its Linear keeps it), less the norm inputs the recompute keeps instead in the activation
      dtype where no recompute keeps only their FP32 copy: the block input x, c_q, wkv_a's output, h."""
    D, H = args.dim, args.n_heads
    norms = 2 * D + args.q_lora_rank + args.kv_lora_rank
    up = H * (args.qk_nope_head_dim + args.v_head_dim) + 2 * H * args.qk_head_dim  # wkv_b output; q, k
    saving = (norms + up) * act_bytes
    if act_bytes < 4:
        held = 2 * D + args.q_lora_rank + args.kv_lora_rank + args.qk_rope_head_dim
        saving += (norms + (D if moe else 0)) * 4 - held * act_bytes
    return saving


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_selective_drops_norm_and_up_projection_outputs_full_keeps_the_input(dtype):
    from moeforge.train.activations import saved_bytes_per_token

    args = load_preset("tiny", dtype=dtype)
    e = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
    none = saved_bytes_per_token(args, seq_len=128, recompute="none")
    sel = saved_bytes_per_token(args, seq_len=128, recompute="selective")
    full = saved_bytes_per_token(args, seq_len=128, recompute="full")
    for kind, moe in (("dense", False), ("moe", True)):
        want = _expected_selective_saving(args, e, moe)
        assert none[kind] - sel[kind] >= want, (kind, none[kind], sel[kind], want)
        # the block input [T, D], nothing else (a MoE also holds its last aux loss, a 4-byte scalar, for metrics)
        assert full[kind] * 128 == 128 * args.dim * e + (4 if moe else 0), (kind, full[kind])
    # MTP: [hnorm(h); enorm(e)] (what eh_proj saves) and its block's norms and up-projections
    assert none["mtp"] - sel["mtp"] >= 2 * args.dim * e + _expected_selective_saving(args, e, True)
    assert sel["head"] == none["head"]  # measured on the plain head (no policy applied there)


def test_nothing_recomputed_outlives_the_backward():
    """After forward + backward only the gradients are left, whatever the policy (the recompute's own graph
    once held its tensors through its pack hook, a cycle through C++ that Python's gc cannot see)."""
    from moeforge.model.loss import lm_losses, total_loss
    from moeforge.train.activations import LiveBytes

    args = load_preset("tiny", vocab_size=257)
    rows = torch.randint(0, 257, (2, 66), generator=torch.Generator().manual_seed(0))
    left = {}
    for policy in ("none", "selective", "full"):
        model = Transformer(args)
        model.init_weights(3)
        apply_recompute(model, policy)
        with LiveBytes() as live:
            main, mtp = lm_losses(model, rows)
            total_loss(main, mtp, args.mtp_loss_weight).backward()
            del main, mtp
            left[policy] = live.live(exclude=[p.grad for p in model.parameters() if p.grad is not None])
    assert left["selective"] == left["none"] and left["full"] == left["none"], left


def test_region_recomputes_views_and_fp32_copies_once():
    """A later op saving a view of a region's output gets the same view of the recomputed output; the region
    runs once per backward however many saved tensors come from it."""
    from moeforge.model.recompute import scope

    calls = []

    def fn(x):
        calls.append(1)
        return torch.sin(x) * 2

    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    with scope():
        y = region(fn, x)
        out = (w[:, 1:4] @ y[:, 1:4].t()).sum() + (y.view(24) ** 2).sum()  # two views of y saved
    del y
    out.backward()
    ref_x, ref_w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y = torch.sin(ref_x) * 2
    ((ref_w[:, 1:4] @ y[:, 1:4].t()).sum() + (y.view(24) ** 2).sum()).backward()
    assert torch.equal(x.grad, ref_x.grad) and torch.equal(w.grad, ref_w.grad)
    assert len(calls) == 2  # the forward and one recompute


def test_input_modified_in_place_is_an_error():
    x = torch.randn(8, dtype=torch.float64, requires_grad=True)
    h = x * 1
    y = region(torch.exp, h)
    with torch.no_grad():
        h.add_(1)
    with pytest.raises(RuntimeError, match="modified in place"):
        y.sum().backward()


def test_bad_policy_names_the_field():
    with pytest.raises(ValueError, match="train.recompute"):
        apply_recompute(torch.nn.Linear(2, 2), "some")
