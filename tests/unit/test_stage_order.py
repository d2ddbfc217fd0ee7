"""The order of the shared expert and the combine wait in DualPipe's COMBINE piece (dualpipe.stage.block_forward).

The COMBINE piece computes `moe.shared_experts(x_ND)` *before* `handle.wait()` of the combine, so that
  - forward: the shared expert computes while the combine all-to-all is in flight (started in the MLP
    piece, waited after the shared expert);
  - backward: the combine wait node is newer than the shared expert's nodes, so autograd (ready nodes,
    highest sequence number first) runs `_CombineWait.backward` first, which starts the reverse combine
    exchange (`_combine_bwd`) on the comm stream, and only then the shared expert's backward: the reverse
    all-to-all is in flight while it computes.
With the shared expert after the wait, both orders flip (forward: wait, then shared; backward: the whole
shared-expert input backward, then the reverse combine starts), and the exact event logs below fail.

Real code paths: a 1-rank gloo group, parallel.apply_ep (a real comm.AllToAllDispatcher with ep = 1, so
the block is cut into ATTN | MLP | COMBINE pieces and every exchange runs on the comm stream), one MoE
block of the tiny preset in float64, driven as the runtime drives it: `run(block_forward(...))`, then
the split backward B (`chunk.backward(grad, split=True)`) and W (`chunk.run_weight()`). The events come
from `_Runner.start`/`_Runner.finish` (every exchange's start and wait) and from hooks on the shared
expert (its forward; a hook on its output tensor, which fires when its backward begins). The output,
the input gradient and the parameter gradients must equal Block.forward + a plain backward bit for bit:
the pieces run the same ops as MoE.forward (`y + shared`, in its operand order).
"""
import pytest
import torch
import torch.distributed as dist

import moeforge.dualpipe.stage as stage
from moeforge.comm.all_to_all import _Runner
from moeforge.model.args import load_preset
from moeforge.model.moe import MoE
from moeforge.model.transformer import Transformer
from moeforge.parallel.apply_ep import apply_ep

pytestmark = pytest.mark.usefixtures("one_thread")

B, T = 2, 8


@pytest.fixture
def ep1_group():
    """A 1-rank gloo process group (the default group), destroyed afterwards."""
    if dist.is_initialized():
        pytest.skip("a default process group already exists in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def _event_log(monkeypatch, moe: MoE) -> list[str]:
    """Log every exchange's start / wait (by its program: _dispatch_fwd, _combine_fwd, _combine_bwd, ...)
    and the shared expert's forward and the start of its backward."""
    log: list[str] = []
    start, finish = _Runner.start, _Runner.finish

    def logged_start(self, program, inputs):
        self.log_name = program.__name__
        log.append(f"start {self.log_name}")
        return start(self, program, inputs)

    def logged_finish(self):
        log.append(f"wait {self.log_name}")
        return finish(self)

    monkeypatch.setattr(_Runner, "start", logged_start)
    monkeypatch.setattr(_Runner, "finish", logged_finish)

    def on_forward(_module, _inputs, out):
        log.append("shared fwd")
        if out.requires_grad:
            out.register_hook(lambda _g: log.append("shared bwd"))

    moe.shared_experts.register_forward_hook(on_forward)  # the model is the test's own: never removed
    return log


class _Block:
    """MoE block 1 of a 2-layer tiny model on the 1-rank group (real dispatcher, float64), a random input and
    output gradient, and the reference: Block.forward (MoE.forward: dispatcher(...) then
    `y + shared_experts(x_ND)`) with a plain backward. Gradients are zeroed after the reference."""

    def __init__(self, group, seed: int):
        args = load_preset("tiny", n_layers=2, n_mtp_modules=0)
        model = Transformer(args)
        apply_ep(model, group, 0, 1, timeout_s=30.0)
        model.init_weights(3)
        model.to(torch.float64)
        self.layer, self.angles = model.layers["1"], model.angles
        gen = torch.Generator().manual_seed(seed)
        self.x0 = torch.randn(B, T, args.dim, generator=gen, dtype=torch.float64)
        self.g_out = torch.randn(B, T, args.dim, generator=gen, dtype=torch.float64)
        self.params = dict(self.layer.named_parameters())
        x_ref = self.x0.clone().requires_grad_()
        self.out_ref = self.layer(x_ref, self.angles)
        self.out_ref.backward(self.g_out)
        self.gx_ref = x_ref.grad
        self.grads_ref = {k: p.grad.clone() for k, p in self.params.items()}
        self.layer.zero_grad(set_to_none=True)

    def assert_same_bits(self, out, gx) -> None:
        assert torch.equal(out, self.out_ref)
        assert torch.equal(gx, self.gx_ref)
        for k, p in self.params.items():
            assert p.grad is not None and torch.equal(p.grad, self.grads_ref[k]), k


@pytest.mark.timeout(60)
def test_shared_expert_runs_while_the_combine_is_in_flight(ep1_group, monkeypatch):
    blk = _Block(ep1_group, seed=0)
    layer = blk.layer
    moe = layer.ffn
    assert isinstance(moe, MoE) and moe.shared_experts is not None and moe.training and moe.aux_alpha > 0
    assert stage._is_async(layer), f"{moe.dispatcher!r} has no dispatch_async: the block would not be cut"

    log = _event_log(monkeypatch, moe)
    # forward, as the runtime runs a chunk: the pieces ATTN | MLP | COMBINE
    x = blk.x0.clone().requires_grad_()
    chunk = stage.Chunk(0, 0, x, trace=[])
    out = stage.run(stage.block_forward(chunk, layer, x, blk.angles, overlap=True))
    chunk.finish(out)
    assert chunk.trace == ["0F0:attn1", "0F0:mlp1", "0F0:combine1"]
    fwd_log, log[:] = list(log), []
    # B, piece by piece from COMBINE (the runtime's `run(self._backward(..., split=True))`), then W
    gx = stage.run(chunk.backward(blk.g_out, split=True))
    bwd_log, log[:] = list(log), []
    chunk.run_weight()
    assert not any(e.startswith(("start", "wait")) for e in log), f"W ran an exchange: {log}"

    # forward: the shared expert computes between the combine's start (MLP piece) and its wait
    assert fwd_log == ["start _dispatch_fwd", "wait _dispatch_fwd",
                       "start _combine_fwd", "shared fwd", "wait _combine_fwd"], fwd_log
    # backward: the combine wait node's backward starts the reverse combine before the shared expert's
    # backward begins; it is waited for in the MLP piece's backward
    assert bwd_log == ["start _combine_bwd", "shared bwd", "wait _combine_bwd",
                       "start _dispatch_bwd", "wait _dispatch_bwd"], bwd_log
    assert chunk.trace[3:] == ["0B0:combine1", "0B0:mlp1", "0B0:attn1"]
    blk.assert_same_bits(out, gx)  # the same bits as the plain block


@pytest.mark.timeout(60)
def test_weight_now_runs_each_w_under_its_reverse_all_to_all(ep1_group, monkeypatch):
    """With schedule.fb_weight_split the runtime's overlapped F&B runs the backward chunk as B then W piece
    by piece (`chunk.backward(grad, split=True, weight_now=True)`): each piece's weight gradients compute
    after its B has started the reverse all-to-all and before that exchange is waited for (the next
    piece's B), as MLP(W) and ATTN(W) sit in the TR's Figure 4. A full backward (split=False, the default)
    computes each Linear's weight gradient in the node that computes its input gradient, before the
    exchange can start. Same bits as the plain block."""
    blk = _Block(ep1_group, seed=1)
    log = _event_log(monkeypatch, blk.layer.ffn)
    x = blk.x0.clone().requires_grad_()
    chunk = stage.Chunk(0, 0, x, trace=log)  # piece names land in the same log, in time order
    out = stage.run(stage.block_forward(chunk, blk.layer, x, blk.angles, overlap=True))
    chunk.finish(out)
    log[:] = []
    gx = stage.run(chunk.backward(blk.g_out, split=True, weight_now=True))
    at = log.index
    for piece, exchange in (("combine1", "_combine_bwd"), ("mlp1", "_dispatch_bwd")):
        assert at(f"0B0:{piece}") < at(f"0W0:{piece}") < at(f"wait {exchange}"), log
        assert at(f"start {exchange}") < at(f"0W0:{piece}"), log
    assert at("0W0:attn1") == len(log) - 1, log  # the chunk's last W
    assert chunk.pieces == [], "weight_now leaves no W for run_weight"
    blk.assert_same_bits(out, gx)
