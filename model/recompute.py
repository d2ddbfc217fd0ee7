"""Activation recompute: tensors that autograd would keep for backward are dropped in forward and
recomputed, bit for bit, when backward first asks for them (`train.recompute=none|selective|full`).

    apply_recompute(model, "selective")  # TR §3.2.3: every RMSNorm output and the MLA up-projections
    apply_recompute(model, "full")       # whole blocks: only each block's input is kept

How. A *region* is a call `region(fn, *inputs)` whose work can be redone from its inputs. While fn runs,
every tensor autograd saves inside it (a saved-tensor hook, torch.autograd.graph.saved_tensors_hooks) is
replaced by a small `_Holder`: the norm's FP32 copy, the up-projection's input, rope's intermediates, and
what custom autograd Functions save (fp8/linear.py, fp8/grouped.py) alike. That alone is what
torch.utils.checkpoint does; it leaves the region's *outputs* alive whenever a later op saves them (the
Linear after a norm saves the norm's output; SDPA saves q, k, v). So a region also registers its outputs,
and inside a `scope()` (the blocks open one) a tensor saved by any later op that is an output of a live
region, or a view of one (storage aliasing: torch._C._is_alias_of), is packed as a holder too, with its
size, stride and offset, and comes back as the same view of the recomputed output.

The first unpack of any holder of a region in backward re-runs fn once on the kept inputs (under grad mode,
capturing what it saves in the same order as the first run), hands every still-alive holder its tensor
and keeps nothing else: a recomputed tensor lives exactly as long as the saved-tensor slots that hold it.
So a pipeline's split backward (dualpipe/stage.py: B with retain_graph, W later) finds in W the tensors B
recomputed, and no second recompute happens. A region whose input is another region's output holds that
input as a holder too (the MoE gate's FP32 copy of the ffn norm's output), so it stays dropped; nested
regions inside a region's forward are part of it. Recomputation runs the same ops on the same inputs, so
gradients are bitwise those of no recompute (tests/unit/test_recompute.py; the pipeline: tests/dist).

`full` makes each Block one region whose outputs are not registered (non-reentrant checkpointing: the block
input is kept, the output is the next block's input). A MoE block's recompute runs its dispatcher again:
`is_recomputing()` tells the MoE not to count its tokens twice, and `host_read` hands LocalDispatcher the
routing counts of the forward instead of reading the host again. (An all-to-all dispatcher in a block
recomputed whole runs its exchanges and their count reads again; the pipeline's pieces never do:
dualpipe/stage.py.) The torch function modes of the forward are re-entered for the recompute, which may run
on an autograd device thread without them (the dry run's GPU attention, train/dryrun.py).

The model stays rank-agnostic: this file imports nothing from torch.distributed, and a module learns its
policy from the `recompute` attribute apply_recompute sets ("none" by default).
"""
from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Any, Callable

import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks

POLICIES = ("none", "selective", "full")


class _State(threading.local):
    def __init__(self):
        self.scopes = 0  # open scope()s: consumers' saved tensors are checked against live region outputs
        self.recording: _Region | None = None  # the region whose first forward is running
        self.recomputing = 0  # >0 while a region re-runs in backward
        # live region outputs: weak ref to the base tensor -> (region, output index); an entry leaves when its
        # tensor dies, and with it the entry's hold on the region (and so on the region's inputs)
        self.outputs: dict[weakref.ref, tuple[_Region, int]] = {}
        self.replay: list[Any] = []  # host_read() values a recompute hands back, last first


_state = _State()


def is_recomputing() -> bool:
    """True while backward re-runs a region (model code skips its side effects, e.g. MoE load counts)."""
    return _state.recomputing > 0


def host_read(read: Callable[[], Any]) -> Any:
    """read() (a host read: routing counts) inside a region's forward; the recompute gets the same value back
    without reading the host again (a MoE block under `full`: model/moe.py LocalDispatcher)."""
    if _state.recomputing:
        if not _state.replay:
            raise RuntimeError("recompute: a host read that the forward did not make")
        return _state.replay.pop()
    value = read()
    if _state.recording is not None:
        _state.recording.host.append(value)
    return value


def _function_modes() -> list:
    from torch.overrides import _get_current_function_mode_stack

    return list(_get_current_function_mode_stack())


class _Holder:
    """What a saved-tensor slot holds instead of a tensor: the region and where its tensor comes from."""

    __slots__ = ("region", "value", "__weakref__")

    def __init__(self, region: "_Region"):
        self.region, self.value = region, None

    def get(self) -> torch.Tensor:
        if self.value is None:
            self.region.recompute()
        if self.value is None:
            raise RuntimeError("recompute: a saved tensor was not recomputed (was it freed by an earlier backward?)")
        return self.value


def _base(t: torch.Tensor) -> torch.Tensor:
    return t._base if t._base is not None else t


class _Region:
    def __init__(self, fn: Callable, inputs: tuple):
        self.fn = fn
        # a tensor input that is itself a live region's output is held as a holder (it stays dropped)
        self.inputs = [_pack_input(a) for a in inputs]
        self.internal: list[weakref.ref] = []  # holders of tensors saved inside fn, in save order
        self.metas: list[tuple] = []  # their (shape, dtype): the recompute must save the same
        self.views: list[tuple[weakref.ref, int, tuple, tuple, int]] = []  # (holder, output, size, stride, offset)
        self.host: list[Any] = []  # host_read() values of the forward, replayed by the recompute
        # torch function modes of the forward (the dry run's GPU attention, train/dryrun.py): backward may run
        # on an autograd thread without them, and the recompute must take the same ops
        self.modes = _function_modes()
        self.done = False

    def hold_internal(self, t: torch.Tensor) -> _Holder:
        h = _Holder(self)
        self.internal.append(weakref.ref(h))
        self.metas.append((tuple(t.shape), t.dtype))
        return h

    def hold_view(self, out: int, base: torch.Tensor, t: torch.Tensor) -> _Holder:
        h = _Holder(self)
        self.views.append((weakref.ref(h), out, tuple(t.shape), t.stride(), t.storage_offset() - base.storage_offset()))
        return h

    def recompute(self) -> None:
        if self.done:
            raise RuntimeError("recompute: a region was asked again after it was recomputed; a saved tensor of it "
                               "was freed (backward twice without retain_graph?)")
        args = [_unpack_input(a) for a in self.inputs]
        captured: list[torch.Tensor] = []

        def capture(t):
            captured.append(t)
            return None  # the recompute's own graph is thrown away: nothing in it is ever unpacked

        _state.recomputing += 1
        replay, _state.replay = _state.replay, list(reversed(self.host))
        try:
            with contextlib.ExitStack() as modes:
                active = _function_modes()
                for m in self.modes:
                    if not any(m is a for a in active):
                        modes.enter_context(m)
                with torch.enable_grad(), saved_tensors_hooks(capture, lambda _: None):
                    outs = self.fn(*args)
            if _state.replay:
                raise RuntimeError(f"recompute: {len(_state.replay)} host reads of the forward were not made again")
        finally:
            _state.recomputing -= 1
            _state.replay = replay
            values = list(captured)
            # the recompute's graph nodes hold `capture` (their pack hook), which holds the list: emptied, the
            # cycle node -> hook -> list -> tensor -> node (invisible to Python's gc) is broken, the graph freed
            captured.clear()
        metas = [(tuple(t.shape), t.dtype) for t in values]
        if metas != self.metas:
            i = next((i for i, (a, b) in enumerate(zip(self.metas, metas)) if a != b), min(len(metas), len(self.metas)))
            raise RuntimeError(f"recompute: {getattr(self.fn, '__qualname__', self.fn)} saved {len(self.metas)} tensors "
                               f"in forward, {len(metas)} when recomputed, first difference at #{i}: "
                               f"{self.metas[i:i + 3]} vs {metas[i:i + 3]} (its forward must run the same ops again)")
        for ref, t in zip(self.internal, values):
            h = ref()
            if h is not None:
                h.value = t.detach()
        outs = outs if isinstance(outs, tuple) else (outs,)
        for ref, i, size, stride, offset in self.views:
            h = ref()
            if h is not None:
                b = _base(outs[i]).detach()
                h.value = b.as_strided(size, stride, b.storage_offset() + offset)
        del values, outs
        self.inputs, self.internal, self.views, self.metas, self.done = [], [], [], [], True


def _pack_input(a):
    if not isinstance(a, torch.Tensor):
        return ("value", a)
    src = _find_output(a)
    if src is not None:
        return ("held", src, a.requires_grad)
    return ("tensor", a, a._version, a.requires_grad)


def _unpack_input(entry):
    kind = entry[0]
    if kind == "value":
        return entry[1]
    if kind == "held":
        return entry[1].get().detach().requires_grad_(entry[2])
    _, t, version, rg = entry
    if t._version != version:
        raise RuntimeError(f"recompute: an input of a region {tuple(t.shape)} was modified in place after the "
                           f"forward (version {version} -> {t._version}); recomputing would be wrong")
    return t.detach().requires_grad_(rg)


def _find_output(t: torch.Tensor) -> _Holder | None:
    """A holder for t if it is (a view of) a live region output, else None."""
    for ref, (region, i) in list(_state.outputs.items()):
        base = ref()
        if base is None or region.done:
            _state.outputs.pop(ref, None)
        elif torch._C._is_alias_of(t, base):
            return region.hold_view(i, base, t)
    return None


def _register_output(base: torch.Tensor, region: _Region, i: int) -> None:
    outputs = _state.outputs  # this thread's: the callback may run on another
    outputs[weakref.ref(base, lambda ref: outputs.pop(ref, None))] = (region, i)


def _pack(t: torch.Tensor) -> Any:
    if _state.recomputing:
        return t
    if _state.recording is not None:
        return _state.recording.hold_internal(t)
    if _state.scopes:
        h = _find_output(t)
        if h is not None:
            return h
    return t


def _unpack(x: Any) -> torch.Tensor:
    return x.get() if isinstance(x, _Holder) else x


def region(fn: Callable, *inputs, register_outputs: bool = True):
    """fn(*inputs), its saved tensors recomputed in backward (see the module docstring). `inputs` are what
    the recompute re-runs fn on: fn may read modules' parameters and buffers, nothing else that changes.
    register_outputs=False (full checkpointing): a later op that saves an output keeps it."""
    if not torch.is_grad_enabled() or _state.recording is not None or _state.recomputing:
        return fn(*inputs)  # no graph, or already inside a region (its saves are the outer region's)
    r = _Region(fn, inputs)
    _state.recording = r
    try:
        with saved_tensors_hooks(_pack, _unpack):
            out = fn(*inputs)
    finally:
        _state.recording = None
    if register_outputs:
        in_bases = [_base(a) for a in inputs if isinstance(a, torch.Tensor)]
        for i, o in enumerate(out if isinstance(out, tuple) else (out,)):
            # an output that aliases an input (x.float() of an fp32 x) is that input, not the region's
            if isinstance(o, torch.Tensor) and not any(torch._C._is_alias_of(o, b) for b in in_bases):
                _register_output(_base(o), r, i)
    return out


def maybe_region(enabled: bool, fn: Callable, *inputs):
    """region(fn, *inputs) if enabled, else fn(*inputs)."""
    return region(fn, *inputs) if enabled else fn(*inputs)


@contextlib.contextmanager
def scope(enabled: bool = True):
    """Inside: a tensor a later op saves that is (a view of) a live region output is recomputed too."""
    if not enabled or not torch.is_grad_enabled():
        yield
        return
    _state.scopes += 1
    try:
        with saved_tensors_hooks(_pack, _unpack):
            yield
    finally:
        _state.scopes -= 1


def policy_of(*modules: nn.Module | None) -> str:
    """The policy apply_recompute set on the first of `modules` that has one ("none" otherwise)."""
    for m in modules:
        p = getattr(m, "recompute", "none") if m is not None else "none"
        if p != "none":
            return p
    return "none"


def apply_recompute(model: nn.Module, policy: str) -> nn.Module:
    """Set the recompute policy on `model` (a Transformer, a Block, an MTPModule, a pipeline stage's model):
    every module that has a `recompute` attribute (model/mla.py RMSNorm and MLA, model/moe.py Gate,
    model/transformer.py Block and MTPModule, Transformer) gets `policy`. In place; returns model."""
    if policy not in POLICIES:
        raise ValueError(f"train.recompute={policy!r} not in {'|'.join(POLICIES)}")
    for m in model.modules():
        if hasattr(type(m), "recompute"):
            m.recompute = policy
    model.recompute = policy
    return model
