"""What one micro-batch costs a pipeline stage, counted from the real modules: `moeforge plan`'s time terms.

    count_unit(args, "moe", seq_len=4096, micro_batch=1, fp8=Fp8Config(enabled=True))  -> UnitCount
    price_unit(count, cluster, ep=64)                                                   -> {term: seconds}

`count_unit` builds one unit of the model (model/transformer.py's Block for "dense" and "moe", MTPModule with
the shared head and model/loss.py's cross-entropy for "mtp", the final norm + head + loss for "head", the
embedding for "embed") at its real shapes on fake tensors (FakeTensorMode: shapes and dtypes, no data), applies
the job's FP8 swap as train/build.py does, and runs one micro-batch forward and backward under `CostMode`, a
TorchDispatchMode that classifies every aten op:
  - matmul-like (mm, addmm, bmm, ...) -> a GEMM (M, N, K), 2·M·N·K FLOPs, BF16 (or FP32) on cuBLAS;
  - the FP8 calls of fp8/linear.py (its Fp8Ops: act_quant, act_quant_t, act_requant_t, weight_quant, gemm) ->
    one FP8 GEMM per `gemm` (DeepGEMM's shapes) and one memory-bound kernel per quantizer, priced by what a
    fused kernel reads and writes (the emulation's own temporaries are not counted: it runs uncounted);
  - the attention core (SDPA, called as the fused kernel a GPU takes) -> attention FLOPs in FlashAttention's
    convention (causal forward 2·B·H·T²·(d_qk + d_v)/2; backward 2.5x the forward's);
  - everything else -> memory-bound: the bytes its inputs and outputs occupy (a broadcast input once), a
    view or a fresh `empty` nothing.
Each op is filed under the innermost module that ran it (forward: module hooks; backward: the autograd node
that runs it, tagged after each module's forward) as a category: norm, swiglu, router, permute (the MoE
dispatch and combine: sort, gather, scatter-add), attention glue (rope, concat, layout copies), residual,
fp8 quantize, cross-entropy, embedding, grad accumulation, linear (layout copies around a GEMM).

B and W (the zero-bubble split the schedules use) are measured, not assumed: pass 1 runs forward and backward
with the parameters frozen (backward computes input gradients only: B); pass 2 with trainable parameters
(B + W); W = pass 2's backward - pass 1's. Recompute is priced from pass 1's forward: selective (TR §3.2.3)
= the forward of every RMSNorm and of the MLA up-projections wq_b and wkv_b; full = the whole unit's forward
(a block, or the MTP module's block); the plan adds it to B.

The experts run through LocalDispatcher with evenly spread routing (model/host.py's stand-in, the planner's
assumption) and, with FP8, as per-expert Fp8Linears (fp8.grouped_experts off: the same GEMMs and FLOPs as the
grouped call; the grouped Triton path also fuses SwiGLU with its quantization, which this count does not see).
All E experts run here, as all ep ranks' tokens would: token-proportional costs are one rank's exactly; the
costs proportional to the expert weights (weight quantization, gradient accumulation) are filed apart and
divided by ep when priced. An FP8 weight cache (fp8.cache_fp8_weights) quantizes each weight once per step:
those bytes are priced once per step, not per micro-batch.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from collections import Counter
from dataclasses import dataclass, field

KINDS = ("embed", "dense", "moe", "head", "mtp")
PHASES = ("F", "B", "W")
GEMM_OPS = {"mm", "addmm", "bmm", "baddbmm", "_scaled_mm"}
ATTN_FWD = {"_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention",
            "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu"}
NO_BYTES = {"empty", "empty_strided", "new_empty", "new_empty_strided", "empty_like", "_local_scalar_dense",
            "lift_fresh", "detach", "alias", "_unsafe_view", "view", "_reshape_alias", "set_", "resize_"}
FA_BWD_FLOPS = 2.5  # FlashAttention's benchmarks count the backward as 2.5x the forward's FLOPs


@dataclass(eq=False)  # hashed by identity: a cached count prices once per layout
class UnitCount:
    """One unit on one micro-batch. Keys carry the phase: F, B, W, and R_sel / R_full (the forward of what
    selective / full recompute runs again, counted in F's terms)."""
    kind: str
    tokens: int
    gemms: Counter = field(default_factory=Counter)  # (phase, "fp8"|"bf16", M, N, K, grouped) -> calls
    attn: Counter = field(default_factory=Counter)  # phase -> forward-convention FLOPs of the attention run
    mem: Counter = field(default_factory=Counter)  # (phase, category) -> bytes (token-proportional)
    mem_expert: Counter = field(default_factory=Counter)  # (phase, category) -> bytes over all E experts' weights
    weight_quant: Counter = field(default_factory=Counter)  # (phase, "dense"|"expert") -> bytes of weight_quant
    fp8_weights: Counter = field(default_factory=Counter)  # "dense"|"expert" -> bytes of the FP8 weight caches

    def gemm_flops(self, phase: str) -> float:
        return sum(2.0 * m * n * k * c for (p, _, m, n, k, _), c in self.gemms.items() if p == phase)


# ---- classification ---------------------------------------------------------------------------------
def _category(module) -> str:
    from torch import nn

    from moeforge.model.mla import MLA, RMSNorm
    from moeforge.model.moe import MLP, Gate, MoE
    from moeforge.model.transformer import Block, MTPModule

    for cls, cat in ((RMSNorm, "norm"), (Gate, "router"), (MLP, "swiglu"), (MoE, "permute"), (MLA, "attention glue"),
                     (Block, "residual"), (MTPModule, "residual"), (nn.Embedding, "embedding"),
                     (nn.Linear, "linear"), (_Loss, "cross-entropy")):
        if isinstance(module, cls):
            return cat
    return "other"


def _elements(t) -> int:
    """Elements a kernel touches: a broadcast (stride-0) dimension once."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n


def _bytes(tensors) -> int:
    import torch

    return sum(_elements(t) * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


class _Loss:  # marker base for the loss wrapper below (a module class: it needs torch)
    pass


class CostMode:
    """The TorchDispatchMode (built lazily: torch is imported on first use). See the module docstring."""

    def __new__(cls, count: UnitCount, expert_params: set, params: set):
        from torch.utils._python_dispatch import TorchDispatchMode

        class _Mode(TorchDispatchMode):
            def __init__(self):
                super().__init__()
                self.count, self.expert_params, self.params = count, expert_params, params
                self.expert_shapes: set = set()  # shapes of the expert weights (and transposed)
                self.phase = "F"
                self.paused = 0
                self.stack: list = [("other", False, "", 0, 1)]  # (category, in an expert, fqn, seq, multiplier)
                self.node_tag: dict = {}  # autograd node -> (category, expert, fqn, multiplier)
                self.mult = 1  # while the representative expert runs: the experts it stands for
                self.n_experts = 1
                self.fwd_events: list = []  # (fqn, kind, key, value) of phase F, for the recompute terms

            def where(self):
                import torch

                if self.phase == "F":
                    cat, expert, fqn, _, mult = self.stack[-1]
                    return cat, expert, fqn, mult
                node = torch._C._current_autograd_node()
                if node is None:  # the engine itself: summing the gradients of a tensor used twice
                    return ("autograd grad sum", False, "", 1)
                if type(node).__name__ == "AccumulateGrad":
                    if id(node.variable) not in self.params:  # the harness's input
                        return ("harness", False, "", 1)
                    expert = id(node.variable) in self.expert_params
                    return ("grad accumulation", expert, "", self.n_experts if expert else 1)
                return self.node_tag.get(node, ("other", False, "", 1))

            def add(self, kind, key, value, weighty=False):
                if self.paused:
                    return
                cat, expert, fqn, mult = self.where()
                value = value * mult
                c = self.count
                if kind == "gemm":
                    c.gemms[(self.phase, *key, expert)] += value
                elif kind == "attn":
                    c.attn[self.phase] += value
                elif kind == "wq":
                    c.weight_quant[(self.phase, "expert" if expert else "dense")] += value
                elif kind == "mem":
                    cat = key or cat
                    if cat == "harness":
                        return
                    expert_w = expert and (weighty or cat == "grad accumulation")
                    (c.mem_expert if expert_w else c.mem)[(self.phase, cat)] += value
                if self.phase == "F":
                    self.fwd_events.append((fqn, kind, key if kind != "mem" else (key or cat), expert, value))

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                import torch
                from torch.utils._pytree import tree_leaves

                kwargs = kwargs or {}
                if func is torch.ops.aten._local_scalar_dense.default:  # a host read of a fake value
                    t = args[0]
                    return False if t.dtype == torch.bool else (0.0 if t.dtype.is_floating_point else 0)
                out = func(*args, **kwargs)
                if self.paused:
                    return out
                name = func.overloadpacket.__name__
                if name in GEMM_OPS:
                    a, b = (args[1], args[2]) if name in ("addmm", "baddbmm") else (args[0], args[1])
                    batch = a.shape[0] if a.dim() == 3 else 1
                    m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
                    self.add("gemm", ("bf16", m * batch, n, k), 1)
                elif name in ATTN_FWD:
                    q, k_, v = args[:3]
                    B, H, T, dqk = q.shape
                    bound = {**dict(zip((x.name for x in func._schema.arguments), args)), **kwargs}
                    causal = bool(bound.get("is_causal", False))
                    self.add("attn", None, 2.0 * B * H * T * k_.shape[2] * (dqk + v.shape[-1]) * (0.5 if causal else 1))
                elif name.startswith("_scaled_dot_product") and name.endswith("_backward"):
                    bound = {**dict(zip((x.name for x in func._schema.arguments), args)), **kwargs}
                    q, k_, v = bound["query"], bound["key"], bound["value"]
                    B, H, T, dqk = q.shape
                    causal = bool(bound.get("is_causal", False))
                    self.add("attn", None, 2.0 * B * H * T * k_.shape[2] * (dqk + v.shape[-1]) * (0.5 if causal else 1))
                elif not (name in NO_BYTES or func.is_view or func.namespace != "aten"):
                    ins, outs = tree_leaves((args, kwargs)), tree_leaves(out)
                    if name in ("zeros", "ones", "full", "zeros_like", "ones_like", "full_like", "fill_", "zero_"):
                        ins = ()  # a write only
                    moved = _bytes(ins) + _bytes(outs)
                    if moved:  # an op on an expert's weight or its gradient scales with the rank's experts
                        weighty = any(isinstance(t, torch.Tensor) and tuple(t.shape) in self.expert_shapes
                                      for t in (*ins, *outs))
                        self.add("mem", None, moved, weighty)
                return out

        return _Mode()


def _fp8_shapes(name: str, args):
    """The outputs of an Fp8Ops call as empty tensors (fp8/gemm.py's signatures), or None for a call not
    known here (then the backend runs, uncounted)."""
    import torch

    e4m3, f32, cdiv = torch.float8_e4m3fn, torch.float32, lambda a, b: -(-a // b)
    if name == "gemm":
        a_q, b_q, out_dtype = args[0], args[2], args[5] if len(args) > 5 else f32
        return torch.empty(a_q.shape[0], b_q.shape[0], dtype=out_dtype)
    bs = args[2] if name == "act_requant_t" else args[1]
    x = args[0]
    if name == "act_quant":
        return torch.empty(x.shape, dtype=e4m3), torch.empty(*x.shape[:-1], cdiv(x.shape[-1], bs), dtype=f32)
    if name in ("act_quant_t", "act_requant_t"):
        T, C = x.shape
        return torch.empty(C, T, dtype=e4m3), torch.empty(C, cdiv(T, bs), dtype=f32)
    if name == "weight_quant":
        N, K = x.shape
        return torch.empty(N, K, dtype=e4m3), torch.empty(cdiv(N, bs), cdiv(K, bs), dtype=f32)
    return None


def _counting_ops(ops, mode):
    """fp8.gemm.Fp8Ops whose calls are counted as the kernels they stand for. Their outputs are made by shape
    (_fp8_shapes): the emulation's temporaries are not what a GPU kernel moves."""
    from torch.utils._pytree import tree_leaves

    def wrap(name, fn):
        def call(*args, **kwargs):
            mode.paused += 1
            try:
                out = _fp8_shapes(name, args)
                if out is None:
                    out = fn(*args, **kwargs)
            finally:
                mode.paused -= 1
            if name == "gemm":
                a_q, b_q = args[0], args[2]
                mode.add("gemm", ("fp8", a_q.shape[0], b_q.shape[0], a_q.shape[1]), 1)
            else:  # a quantizer: reads its input (and scales), writes the FP8 codes and the scales
                moved = _bytes(tree_leaves(args)) + _bytes(tree_leaves(out))
                if name == "weight_quant":
                    mode.add("wq", None, moved)
                else:
                    mode.add("mem", "fp8 quantize", moved)
            return out
        return call

    return dataclasses.replace(ops, **{f.name: wrap(f.name, getattr(ops, f.name))
                                       for f in dataclasses.fields(ops) if f.name != "name"})


# ---- one unit ---------------------------------------------------------------------------------------
def count_unit(args, kind: str, *, seq_len: int, micro_batch: int = 1, fp8=None) -> UnitCount:
    """One micro-batch of `kind` (KINDS) forward and backward, counted (module docstring). Cached."""
    from moeforge.fp8.config import Fp8Config

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    fp8 = fp8 if fp8 is not None and fp8.enabled else Fp8Config(enabled=False)
    return _count(args, kind, seq_len, micro_batch, fp8)


@functools.lru_cache(maxsize=64)
def _count(args, kind: str, seq_len: int, micro_batch: int, fp8) -> UnitCount:
    import torch

    from moeforge.model.host import uniform_routing
    from moeforge.model.loss import cross_entropy
    from moeforge.model.mla import RMSNorm, yarn_freqs
    from moeforge.model.transformer import DTYPES, Block, MTPModule, is_expert_param

    dtype, B, T, D = DTYPES[args.dtype], micro_batch, seq_len, args.dim
    count = UnitCount(kind, B * T)

    class Loss(torch.nn.Module, _Loss):
        def forward(self, logits, targets):
            return cross_entropy(logits, targets)

    with _fake_mode(), uniform_routing(), torch.device("cpu"), _gpu_kernels()(count) as kernels:
        angles = yarn_freqs(args)[:T]
        targets = torch.zeros(B, T, dtype=torch.long)
        with torch.device("meta"):  # no init: the values do not matter, and 256 experts' init is slow
            unit = torch.nn.ModuleDict()
            if kind in ("dense", "moe"):
                ids = [i for i in range(args.n_layers) if args.is_moe_layer(i) == (kind == "moe")]
                if not ids:
                    return count
                unit["block"] = Block(ids[0], args, dtype=dtype)
            elif kind == "mtp":
                if not args.n_mtp_modules:
                    return count
                unit["mtp"] = MTPModule(args.n_layers, args, dtype=dtype)
                unit["embed"] = torch.nn.Embedding(args.vocab_size, D, dtype=dtype)
                unit["head"] = torch.nn.Linear(D, args.vocab_size, bias=False, dtype=dtype)
                unit["loss"] = Loss()
            elif kind == "head":
                unit["norm"] = RMSNorm(D, args.norm_eps, dtype=dtype)
                unit["head"] = torch.nn.Linear(D, args.vocab_size, bias=False, dtype=dtype)
                unit["loss"] = Loss()
            else:
                unit["embed"] = torch.nn.Embedding(args.vocab_size, D, dtype=dtype)
        _materialize(unit)
        if fp8.enabled:
            from moeforge import fp8 as fp8_pkg

            fp8_pkg.apply_fp8(unit, dataclasses.replace(fp8, backend="emulate", grouped_experts=False))
        unit.train()
        named = dict(unit.named_parameters())
        expert_params = {id(p) for n, p in named.items() if is_expert_param(n)}
        mode = CostMode(count, expert_params, {id(p) for p in named.values()})
        kernels.mode = mode
        for n, p in named.items():
            if is_expert_param(n):
                mode.expert_shapes |= {tuple(p.shape), tuple(p.shape[::-1])}
        from moeforge.fp8.linear import Fp8Linear

        for fqn, m in unit.named_modules():
            if isinstance(m, Fp8Linear):
                m.ops = _counting_ops(m.ops, mode)
                part = "expert" if is_expert_param(fqn + ".weight") else "dense"
                from moeforge.fp8.cache import weight_cache_bytes

                count.fp8_weights[part] += weight_cache_bytes(m.out_features, m.in_features, fp8.weight_block) \
                    if fp8.cache_fp8_weights else 0
        _install_hooks(unit, mode)
        _representative_experts(unit, mode)

        def run(trainable: bool, counted: bool):
            """One forward (counted or not); returns (output, the gradient to start backward with)."""
            mode.phase = "F"
            mode.paused += 1  # the harness's own tensors are not the unit's work
            for p in unit.parameters():
                p.requires_grad_(trainable)
                p.grad = torch.zeros_like(p) if trainable else None  # steady state: grads accumulate
            x = torch.randn(B, T, D, dtype=dtype, requires_grad=True)
            mode.paused -= 1 if counted else 0
            if kind in ("dense", "moe"):
                out = unit["block"](x, angles)
            elif kind == "mtp":
                h = unit["mtp"](x, unit["embed"](targets), angles)
                out = unit["loss"](unit["head"](unit["mtp"].norm(h)), targets)
            elif kind == "head":
                out = unit["loss"](unit["head"](unit["norm"](x)), targets)
            else:
                out = unit["embed"](targets)
            mode.paused += 1 if counted else 0
            grad = torch.ones_like(out) if out.dim() else None
            mode.paused -= 1
            return out, grad

        with mode:
            out, grad = run(False, True)
            mode.phase = "B"
            if out.requires_grad:
                out.backward(grad)
            fwd_events = list(mode.fwd_events)
            out, grad = run(True, False)
            before = _snapshot(count)
            mode.phase = "BW"
            out.backward(grad)
        _split_w(count, before)
        _recompute_terms(count, fwd_events, unit)
    return count


@functools.lru_cache(maxsize=1)
def _fake_mode():
    """One FakeTensorMode per process (fakes of two modes do not mix)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode()


@functools.lru_cache(maxsize=1)
def _gpu_kernels():
    """A TorchFunctionMode class: the two calls a CPU build runs as other kernels than a GPU does.
    F.scaled_dot_product_attention -> the fused memory-efficient kernel (as train/dryrun.py: MLA's head dims
    192/128 rule out FlashAttention in torch), one attention op forward and one backward; F.rms_norm -> one
    fused kernel each way (CUDA's aten._fused_rms_norm), counted by what it reads and writes: forward x, the
    weight, y and a per-row rstd; backward the gradient, x, the weight, rstd, dx and the weight's gradient."""
    import torch
    from torch.overrides import TorchFunctionMode

    from moeforge.train.activations import efficient_sdpa, efficient_sdpa_applies

    class RmsNorm(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, shape, weight, eps, mode):
            dims = tuple(range(-len(shape), 0))
            mode.paused += 1
            try:
                e = torch.finfo(x.dtype).eps if eps is None else eps
                rstd = torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + e)
                y = x * rstd * weight if weight is not None else x * rstd
            finally:
                mode.paused -= 1
            mode.add("mem", None, _bytes((x, weight, y, rstd)))
            ctx.save_for_backward(x, weight, rstd)
            ctx.dims, ctx.mode = dims, mode
            return y

        @staticmethod
        def backward(ctx, g):
            x, weight, rstd = ctx.saved_tensors
            mode = ctx.mode
            mode.paused += 1
            try:
                gw = g * weight if weight is not None else g
                xhat = x * rstd
                dx = rstd * (gw - xhat * (gw * xhat).mean(ctx.dims, keepdim=True))
                dw = (g * xhat).reshape(-1, *weight.shape).sum(0) \
                    if weight is not None and ctx.needs_input_grad[2] else None
            finally:
                mode.paused -= 1
            mode.add("mem", None, _bytes((g, x, weight, rstd, dx, dw)))
            return dx, None, dw, None, None

    class GpuKernels(TorchFunctionMode):
        def __init__(self, count):
            super().__init__()
            self.count = count
            self.mode = None  # the CostMode, set once it exists

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is torch.nn.functional.scaled_dot_product_attention and efficient_sdpa_applies(args, kwargs):
                return efficient_sdpa(*args, **kwargs)
            if func is torch.nn.functional.rms_norm and self.mode is not None:
                b = dict(zip(("input", "normalized_shape", "weight", "eps"), args), **kwargs)
                return RmsNorm.apply(b["input"], tuple(b["normalized_shape"]), b.get("weight"), b.get("eps"),
                                     self.mode)
            return func(*args, **kwargs)

    return GpuKernels


def _materialize(unit) -> None:
    """Meta parameters and buffers -> fresh (fake, under the mode) tensors of the same shapes, in place."""
    import torch

    for m in unit.modules():
        for name, p in list(m._parameters.items()):
            if p is not None:
                m._parameters[name] = torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype), p.requires_grad)
        for name, b in list(m._buffers.items()):
            if b is not None:
                m._buffers[name] = torch.empty(b.shape, dtype=b.dtype)


def _install_hooks(unit, mode) -> None:
    """Forward: a stack of (category, inside an expert, fqn). After each module's forward, tag the autograd
    nodes it made (those not tagged by an inner module) with its category, for the backward."""
    import torch

    def seq_now() -> int:
        mode.paused += 1
        try:
            return torch.ones((), requires_grad=True).mul(1).grad_fn._sequence_nr()
        finally:
            mode.paused -= 1

    for fqn, m in unit.named_modules():
        if not fqn:
            continue
        tag = (_category(m), ".experts." in f".{fqn}.", fqn)

        def pre(mod, inputs, tag=tag):
            mode.stack.append((*tag, seq_now(), mode.mult))

        def post(mod, inputs, output):
            cat, expert, fqn, start, mult = mode.stack.pop()
            todo, seen = [t.grad_fn for t in _tensors(output) if t.grad_fn is not None], set()
            while todo:  # inner modules tagged their nodes first: walk through them, tag only the rest
                node = todo.pop()
                if node is None or node in seen or type(node).__name__ == "AccumulateGrad":
                    continue
                seen.add(node)
                if node._sequence_nr() < start:
                    continue
                mode.node_tag.setdefault(node, (cat, expert, fqn, mult))
                todo.extend(n for n, _ in node.next_functions)

        m.register_forward_pre_hook(pre)
        m.register_forward_hook(post)


def _representative_experts(unit, mode) -> None:
    """Under even routing every expert runs the same rows: run the first one for real, counted once per expert
    (forward and, through its tagged nodes, backward); the others' rows come back as uncounted empties."""
    import torch

    from moeforge.model.moe import MoE

    def run(mlps, xs, counts):
        mode.mult, mode.n_experts = len(mlps), len(mlps)
        try:
            y0 = mlps[0](xs[:counts[0]])
        finally:
            mode.mult = 1
        mode.paused += 1
        rest = torch.empty(xs.size(0) - counts[0], y0.size(-1), dtype=y0.dtype)
        mode.paused -= 1
        return torch.cat([y0, rest])

    for m in unit.modules():
        if isinstance(m, MoE):
            m.experts.run_grouped = run


def _tensors(x):
    import torch
    from torch.utils._pytree import tree_leaves

    return [t for t in tree_leaves(x) if isinstance(t, torch.Tensor)]


def _snapshot(count: UnitCount) -> dict:
    return {k: Counter(getattr(count, k)) for k in ("gemms", "attn", "mem", "mem_expert", "weight_quant")}


def _split_w(count: UnitCount, before: dict) -> None:
    """Phase "BW" (pass 2's backward) -> W = BW - B (pass 1's backward, parameters frozen)."""
    for name in ("gemms", "attn", "mem", "mem_expert", "weight_quant"):
        c = getattr(count, name)
        bw = Counter({k: v for k, v in c.items() if _phase(k) == "BW"})
        for k in bw:
            del c[k]
        for k, v in bw.items():
            rest = _with_phase(k, "B")
            w = v - c.get(rest, 0)
            if w > 0:
                c[_with_phase(k, "W")] += w


def _phase(key) -> str:
    return key if isinstance(key, str) else key[0]


def _with_phase(key, phase):
    return phase if isinstance(key, str) else (phase, *key[1:])


def _recompute_terms(count: UnitCount, fwd_events: list, unit) -> None:
    """R_sel: the forward of the RMSNorms and the MLA up-projections (wq_b, wkv_b); R_full: the forward of the
    unit's block (dense/moe: all of it; mtp: its block), both from pass 1's forward events."""
    from moeforge.model.mla import RMSNorm

    norms = {fqn for fqn, m in unit.named_modules() if isinstance(m, RMSNorm)}
    ups = {fqn for fqn, _ in unit.named_modules() if fqn.split(".")[-1] in ("wq_b", "wkv_b")}

    def inside(fqn: str, roots) -> bool:
        return any(fqn == r or fqn.startswith(r + ".") for r in roots)

    blocks = {"block"} if count.kind in ("dense", "moe") else {"mtp.block"} if count.kind == "mtp" else set()
    for phase, roots in (("R_sel", norms | ups), ("R_full", blocks)):
        for fqn, kind, key, expert, value in fwd_events:
            if not inside(fqn, roots):
                continue
            if kind == "gemm":
                count.gemms[(phase, *key, expert)] += value
            elif kind == "attn":
                count.attn[phase] += value
            elif kind == "mem":
                count.mem[(phase, key)] += value
            elif kind == "wq":
                count.weight_quant[(phase, "expert" if expert else "dense")] += value


# ---- prices -----------------------------------------------------------------------------------------
def _nearest(rows, point):
    """The table row nearest `point` in log space (rows: (*shape, value)); returns (row, value)."""
    def dist(r):
        return sum(abs(math.log2(a) - math.log2(b)) for a, b in zip(r[:-1], point))
    row = min(rows, key=dist)
    return row, row[-1]


def gemm_tflops(cluster, kind: str, m: int, n: int, k: int, grouped_m: int | None = None) -> tuple[float, str]:
    """(TFLOP/s, where it comes from) of one GEMM on `cluster`. FP8: DeepGEMM's published H800 table, the
    nearest published shape in log space (grouped: the m-grouped contiguous table at `grouped_m` rows per
    expert); BF16: the cluster's cuBLAS figure. cluster.efficiency (a user override) replaces both by
    peak x efficiency."""
    if cluster.efficiency is not None:
        peak = cluster.fp8_tflops if kind == "fp8" else cluster.bf16_tflops
        return peak * cluster.efficiency, f"{cluster.efficiency:g} x peak (cluster.efficiency)"
    if kind != "fp8":
        return cluster.bf16_gemm_tflops, "cuBLAS BF16"
    if grouped_m is not None and cluster.fp8_grouped_gemm:
        row, v = _nearest([r[1:] for r in cluster.fp8_grouped_gemm], (grouped_m, n, k))
        return v, f"DeepGEMM grouped {row[0]}x{row[1]}x{row[2]}"
    row, v = _nearest(cluster.fp8_gemm, (m, n, k))
    return v, f"DeepGEMM {row[0]}x{row[1]}x{row[2]}"


def attention_tflops(cluster, head_dim: float, seq_len: int, backward: bool) -> float:
    """FlashAttention-3's published BF16 throughput (cluster.attn_fwd / attn_bwd: (head dim, seq, TFLOP/s)),
    linear in log2(seq) between the published lengths and linear in head dim between the published head dims,
    clamped at the ends (no extrapolation)."""
    if cluster.efficiency is not None:
        return cluster.bf16_tflops * cluster.efficiency
    table = cluster.attn_bwd if backward else cluster.attn_fwd
    dims = sorted({r[0] for r in table})

    def at_dim(d):
        pts = sorted((r[1], r[2]) for r in table if r[0] == d)
        s = min(max(seq_len, pts[0][0]), pts[-1][0])
        for (s0, v0), (s1, v1) in zip(pts, pts[1:]):
            if s0 <= s <= s1:
                f = (math.log2(s) - math.log2(s0)) / (math.log2(s1) - math.log2(s0))
                return v0 + f * (v1 - v0)
        return pts[0][1]

    hd = min(max(head_dim, dims[0]), dims[-1])
    for d0, d1 in zip(dims, dims[1:]):
        if d0 <= hd <= d1:
            return at_dim(d0) + (hd - d0) / (d1 - d0) * (at_dim(d1) - at_dim(d0))
    return at_dim(dims[0])


def price_unit(count: UnitCount, cluster, args, seq_len: int, ep: int = 1, weight_cache: bool = False) -> dict:
    """Seconds of one micro-batch of this unit on one rank, per (phase, term): phases F, B, W, R_sel, R_full;
    terms "gemm fp8", "gemm bf16", "attention", "memory-bound". Per step (not per micro-batch): "wq step",
    the FP8 weight-cache refresh when `weight_cache`."""
    out: Counter = Counter()
    hbm = cluster.hbm_gbps * 1e9
    rows = count.tokens * args.n_activated_experts * ep / max(args.n_routed_experts, 1)  # per local expert
    for (phase, kind, m, n, k, grouped), calls in count.gemms.items():
        tf, _ = gemm_tflops(cluster, kind, m, n, k, grouped_m=rows if grouped else None)
        out[(phase, f"gemm {kind}")] += calls * 2.0 * m * n * k / (tf * 1e12)
    hd = (args.qk_head_dim + args.v_head_dim) / 2
    for phase, flops in count.attn.items():
        bwd = phase in ("B", "W")
        tf = attention_tflops(cluster, hd, seq_len, bwd)
        out[(phase, "attention")] += flops * (FA_BWD_FLOPS if bwd else 1.0) / (tf * 1e12)
    for (phase, _), b in count.mem.items():
        out[(phase, "memory-bound")] += b / hbm
    for (phase, _), b in count.mem_expert.items():
        out[(phase, "memory-bound")] += b / ep / hbm
    for (phase, part), b in count.weight_quant.items():
        t = b / (ep if part == "expert" else 1) / hbm
        out[("step", "fp8 weight cache") if weight_cache and phase in ("F", "B") else (phase, "memory-bound")] += t
    return out


def mem_by_category(count: UnitCount, ep: int = 1) -> Counter:
    """Bytes per (phase, category) on one rank (expert-weight terms / ep; weight quantization included)."""
    out = Counter(count.mem)
    for k, v in count.mem_expert.items():
        out[k] += v / ep
    for (phase, part), b in count.weight_quant.items():
        out[(phase, "fp8 quantize (weights)")] += b / (ep if part == "expert" else 1)
    return out
