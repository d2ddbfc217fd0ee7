"""Activation memory measured from the code: the bytes a module keeps alive for its backward.

    with LiveBytes() as live:          # any tensors, real or fake
        x = make_input(); out = block(x, angles); del x
        kept = live.live(exclude=(out,))    # storages made inside that are still alive: what autograd holds
    saved_bytes_per_token(args, seq_len=4096, recompute="selective", fp8=Fp8Config(enabled=True))
        -> {"dense": ..., "moe": ..., "mtp": ..., "head": ...}   bytes per token, measured

`LiveBytes` is a TorchDispatchMode that records every storage an op creates (a weak reference and its
size); what is still alive at the end is what the autograd graph (or the caller) keeps. It counts each
storage once, whatever the views, and it sees through every mechanism that decides what is kept:
saved-tensor hooks, recompute, FP8 caches, custom autograd Functions. Nothing is estimated.

`saved_bytes_per_token` builds the real modules (model/transformer.py's Block and MTPModule, the final
norm and the output head with model/loss.py's cross-entropy) at the model's real shapes on fake tensors
(FakeTensorMode on the CPU: shapes and dtypes, no data, no memory), applies the job's recompute policy
and FP8 swap the way train/build.py does, runs one micro-batch of `seq_len` tokens forward and measures
what stays alive. The planner (launcher/plan.py) prices activations with it, so the plan's activation
memory is the runtime's own by construction. Routing on fake tensors is evenly spread (model/host.py's
stand-in, the planner's assumption); the experts run through LocalDispatcher, as an EP rank's received
rows would (the all-to-all's own buffers are counted by the dry run, not here). The two ops whose CPU
kernels keep other tensors than their CUDA kernels, attention and RMSNorm, keep what CUDA's keep (_AsOnGpu).
"""
from __future__ import annotations

import functools

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveBytes(TorchDispatchMode):
    """Records the storages ops create under it; `live()` sums the bytes of those still alive."""

    def __init__(self):
        super().__init__()
        self._made: dict[int, tuple[int, StorageWeakRef]] = {}  # storage key -> (bytes, weak ref to the storage)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and _is_fake(args[0]):
            t = args[0]  # a host read of a fake value (routing counts): served a stand-in, as the dry run does
            return False if t.dtype == torch.bool else (0.0 if t.dtype.is_floating_point else 0)
        out = func(*args, **(kwargs or {}))
        # views and in-place results share an input's storage: only new storages are this op's
        inputs = {a.untyped_storage()._cdata for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                s = t.untyped_storage()
                key = s._cdata
                if key in inputs:
                    continue
                if key not in self._made or self._made[key][1].expired():
                    self._made[key] = (s.nbytes(), StorageWeakRef(s))
        return out

    def live(self, exclude=()) -> int:
        """Bytes of the storages made under the mode that are still alive, less those of `exclude` (tensors
        the caller holds itself, e.g. the output). A storage is alive while any tensor on it is."""
        skip = {t.untyped_storage()._cdata for t in exclude}
        total = 0
        for key, (nbytes, ref) in list(self._made.items()):
            if ref.expired():  # every tensor on it is gone (a view autograd saved keeps it alive)
                del self._made[key]
                continue
            if key not in skip:
                total += nbytes
        return total


def _is_fake(t) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


KINDS = ("dense", "moe", "mtp", "head")


def saved_bytes_per_token(args, *, seq_len: int, recompute: str = "none", fp8=None,
                          micro_batch: int = 1) -> dict[str, float]:
    """Bytes per token that one module of each kind keeps for its backward, measured on fake tensors:
    "dense" a dense block, "moe" an MoE block, "mtp" one MTP module (projection, block, its norm, the shared
    head and its loss; 0 without MTP), "head" the final norm, the output head and the loss. The input of a
    block counts where the block keeps it (its RMSNorm saves it), its output does not (the next one's input).
    `fp8`: an fp8.config.Fp8Config (None or disabled: high precision). Cached per arguments."""
    from moeforge.fp8.config import Fp8Config

    fp8 = fp8 if fp8 is not None and fp8.enabled else Fp8Config(enabled=False)
    return dict(_measure(args, seq_len, recompute, fp8, micro_batch))


@functools.lru_cache(maxsize=64)
def _measure(args, seq_len: int, recompute: str, fp8, micro_batch: int) -> tuple:
    from moeforge.model.host import uniform_routing
    from moeforge.model.loss import cross_entropy
    from moeforge.model.mla import RMSNorm, yarn_freqs
    from moeforge.model.transformer import DTYPES, Block, MTPModule

    dtype, B, T, D = DTYPES[args.dtype], micro_batch, seq_len, args.dim
    tokens = B * T
    out = {}
    with _fake_mode(), uniform_routing(), torch.device("cpu"), _AsOnGpu():
        angles = yarn_freqs(args)
        head_norm = RMSNorm(D, args.norm_eps, dtype=dtype)
        head = torch.nn.Linear(D, args.vocab_size, bias=False, dtype=dtype)
        embed = torch.nn.Embedding(args.vocab_size, D, dtype=dtype)
        targets = torch.zeros(B, T, dtype=torch.long)

        leaf = torch.randn(B, T, D, dtype=dtype, requires_grad=True)

        def hidden():
            """A block's input as in a model: an activation (a leaf would be kept by its AccumulateGrad
            node whatever the block saves); made under LiveBytes, it counts only where the block keeps it."""
            return leaf.clone()

        def block_bytes(layer_id: int) -> float:
            block = _prepared(_built(Block, layer_id, args, dtype), recompute, fp8)
            with LiveBytes() as live:
                x = hidden()
                y = block(x, angles)
                del x
                return live.live(exclude=(y, *_weight_caches(block))) / tokens

        moe_ids = [i for i in range(args.n_layers) if args.is_moe_layer(i)]
        dense_ids = [i for i in range(args.n_layers) if not args.is_moe_layer(i)]
        out["dense"] = block_bytes(dense_ids[0]) if dense_ids else 0.0
        out["moe"] = block_bytes(moe_ids[0]) if moe_ids else 0.0

        with LiveBytes() as live:  # final norm + head + loss (model/split.py StageModule.main_loss)
            h = hidden()
            loss = cross_entropy(head(head_norm(h)), targets)
            del h
            out["head"] = live.live(exclude=(loss,)) / tokens
        out["mtp"] = 0.0
        if args.n_mtp_modules:
            module = _prepared(_built(MTPModule, args.n_layers, args, dtype), recompute, fp8)
            h = hidden()  # the main model's last hidden state: the head above counts it where kept
            with LiveBytes() as live:  # StageModule.mtp_input, the block, StageModule.mtp_loss
                x = module.project(h, embed(targets))
                y = module.block(x, angles)
                loss = cross_entropy(head(module.norm(y)), targets)
                del x, y
                out["mtp"] = live.live(exclude=(loss, *_weight_caches(module))) / tokens
    return tuple((k, out[k]) for k in KINDS)


@functools.lru_cache(maxsize=1)
def _fake_mode():
    """One FakeTensorMode for every measurement of the process: constants that code converts once and
    keeps (fp8/reference.py's E4M3 table) become fakes of the first mode, and fakes of two modes do not mix."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode()


class _FusedRmsNorm(torch.autograd.Function):
    """F.rms_norm as CUDA runs it: torch's fused kernel (aten._fused_rms_norm, CUDA and MPS only), whose
    backward node keeps the input, the weight and the per-row rstd. On CPU tensors, real or fake, rms_norm
    is decomposed into ops that also keep the normalised FP32 product. Same forward values, same gradients
    (the textbook formulas), a GPU's saved set."""

    @staticmethod
    def forward(ctx, x, shape, weight, eps):
        dims = tuple(range(-len(shape), 0))
        rstd = torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + (torch.finfo(x.dtype).eps if eps is None else eps))
        ctx.save_for_backward(x, weight, rstd)
        ctx.dims = dims
        y = x * rstd
        return y * weight if weight is not None else y

    @staticmethod
    def backward(ctx, g):
        x, weight, rstd = ctx.saved_tensors
        gw = g * weight if weight is not None else g
        xhat = x * rstd
        dx = rstd * (gw - xhat * (gw * xhat).mean(ctx.dims, keepdim=True))
        dw = None
        if weight is not None and ctx.needs_input_grad[2]:
            dw = (g * xhat).reshape(-1, *weight.shape).sum(0)
        return dx, None, dw, None


def efficient_sdpa_applies(args, kwargs) -> bool:
    """Whether an F.scaled_dot_product_attention call is one the memory-efficient kernel computes as is."""
    return (len(args) == 3 and kwargs.get("attn_mask") is None and not kwargs.get("dropout_p")
            and not kwargs.get("enable_gqa"))


def efficient_sdpa(q, k, v, is_causal: bool = False, scale=None, **_) -> torch.Tensor:
    """F.scaled_dot_product_attention through the memory-efficient kernel a Hopper GPU takes for MLA (head dims
    192/128 rule out FlashAttention): output + a log-sum-exp per row kept, never [T, T] scores."""
    return torch.ops.aten._scaled_dot_product_efficient_attention(
        q, k, v, None, q.requires_grad or k.requires_grad or v.requires_grad, is_causal=is_causal, scale=scale)[0]


class _AsOnGpu(TorchFunctionMode):
    """The two ops whose kernel, and so whose saved tensors, a CPU build picks differently from a GPU:
    F.scaled_dot_product_attention takes a fused kernel (the memory-efficient one, as the dry run does:
    MLA's head dims 192/128 rule out FlashAttention) that keeps the output and a log-sum-exp per row,
    where fake CPU tensors would take the math path and keep [heads, T, T] scores; F.rms_norm keeps what
    the fused CUDA kernel's backward node keeps (_FusedRmsNorm)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention and efficient_sdpa_applies(args, kwargs):
            return efficient_sdpa(*args, **kwargs)
        if func is torch.nn.functional.rms_norm:
            bound = dict(zip(("input", "normalized_shape", "weight", "eps"), args), **kwargs)
            return _FusedRmsNorm.apply(bound["input"], tuple(bound["normalized_shape"]), bound.get("weight"),
                                       bound.get("eps"))
        return func(*args, **kwargs)


def _prepared(module: torch.nn.Module, recompute: str, fp8) -> torch.nn.Module:
    """The job's FP8 swap and recompute policy on one module, as train/build.py applies them to the model."""
    if fp8.enabled:
        from moeforge import fp8 as fp8_pkg

        fp8_pkg.apply_fp8(module, fp8)
        _shape_only_gemms(module)
    if recompute != "none":
        from moeforge.model.recompute import apply_recompute

        apply_recompute(module, recompute)
    return module.train()


def _built(cls, layer_id: int, args, dtype) -> torch.nn.Module:
    """cls(layer_id, args) with fresh fake parameters, built on meta first: nn.Linear's own init costs Python
    time per module (768 of them in a 671b MoE block) and its values are never read here."""
    from .build import _no_default_init

    with torch.device("meta"), _no_default_init():
        module = cls(layer_id, args, dtype=dtype)
    for m in module.modules():
        for table in (m._parameters, m._buffers):
            for k, t in table.items():
                if t is not None:
                    e = torch.empty(t.shape, dtype=t.dtype, device="cpu")
                    table[k] = torch.nn.Parameter(e, t.requires_grad) if isinstance(t, torch.nn.Parameter) else e
    return module


def _weight_caches(module: torch.nn.Module) -> list[torch.Tensor]:
    """The FP8 weight copies a module's caches hold (fp8/cache.py): per weight version, not per micro-batch,
    so not activations (the planner prices them as their own category)."""
    from moeforge.fp8.cache import Fp8WeightCache

    out = []
    for m in module.modules():
        for owner in (m, getattr(m, "run_grouped", None)):
            cache = getattr(owner, "weight_cache", None)
            if isinstance(cache, Fp8WeightCache):
                out += [t for _, _, value in cache._entries.values() for t in value]
    return out


def _shape_only_gemms(module: torch.nn.Module) -> None:
    """FP8 GEMMs as outputs of the right shape and dtype, not computed: a GEMM keeps nothing for backward
    (its caller's autograd Function decides what is saved, and the quantizers still run), and the emulate
    backend's per-128-block loop over 256 experts would take minutes of fake dispatch."""
    import dataclasses

    from moeforge.fp8.grouped import GroupedExperts
    from moeforge.fp8.linear import Fp8Linear

    def gemm(a_q, a_s, b_q, b_s, block, out_dtype=torch.float32):
        return torch.empty(a_q.shape[0], b_q.shape[0], dtype=out_dtype, device=a_q.device)

    def grouped_gemm(a_q, a_s, b_q, b_s, layout, block, out_dtype=torch.float32):
        return torch.empty(a_q.shape[0], b_q.shape[1], dtype=out_dtype, device=a_q.device)

    def grouped_weight_quant(ws, block, p2):
        G, (N, K) = len(ws), ws[0].shape
        cdiv = lambda a, b: -(-a // b)  # noqa: E731
        return (torch.empty(G, N, K, dtype=torch.float8_e4m3fn, device=ws[0].device),
                torch.empty(G, cdiv(N, block), cdiv(K, block), dtype=torch.float32, device=ws[0].device))

    for m in module.modules():
        if isinstance(m, Fp8Linear):
            m.ops = dataclasses.replace(m.ops, gemm=gemm)
        runner = getattr(m, "run_grouped", None)
        if isinstance(runner, GroupedExperts):
            runner._weight_quant = grouped_weight_quant
            ops = dataclasses.replace(runner.ops, gemm=grouped_gemm, dense=dataclasses.replace(runner.ops.dense, gemm=gemm))
            if runner.weight_cache is None:
                ops = dataclasses.replace(ops, weight_quant=grouped_weight_quant)
            runner.ops = ops
