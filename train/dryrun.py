"""The dry run: one rank of any layout runs real optimizer steps on a fake GPU, on a CPU-only machine.

    moeforge dryrun model=671b parallel.pp=16 parallel.ep=64 cluster.gpu=h800 cluster.nodes=256 --rank 2047

builds the model for that rank (its pipeline stages, its experts, FP8) on fake CUDA tensors
(train/fake_device.py), joins a fake process group of the full world size (torch's "fake" backend:
collectives return at once) and runs `Trainer.train_step`, the code a GPU runs: forward, backward, the
pipeline schedule, EP dispatch/combine on the CUDA comm-stream path, gradient reduction, ZeRO-1,
clipping, the bias update, FP8. Nothing in it knows it is a dry run but two declared seams:

- data: the token batches are zeros of the right shape (`SyntheticBatches`), and routing counts, which
  fake tensors do not have, are those of evenly spread routing (model/host.routing_counts, the
  planner's assumption);
- values: every host read returns a stand-in (0, 0.0, False) and is COUNTED, with its call site.

`DryRunMode` (a TorchDispatchMode above the fake mode) is where the checks live:
- host reads: `.item()`/`.tolist()`/`float(t)` (aten._local_scalar_dense) and `.cpu()` of a device
  tensor, plus `torch.cuda.synchronize` and event/stream synchronizes, counted per step by call site;
- host tensors on device groups: a collective (any c10d op) given a CPU tensor raises
  HostTensorOnDeviceGroup naming the op and the call site. The fake backend does not check devices and
  NCCL rejects CPU tensors, so this is what stops a run that would die at its first step on GPUs. (The
  fake backend is registered for CUDA only, as NCCL is, so `all_gather_object` stages on the device.)
- ops whose output shape depends on values (nonzero, masked_select, unique, bincount): a hidden host
  sync on CUDA and no shape here, so they raise naming the call site.

Memory: torch's MemTracker (torch.distributed._tools.mem_tracker) follows every tensor the step
allocates: parameters, buffers, gradients, activations (forward) and temporaries (backward), and
the optimizer state (ZeRO-1's shards, handed to it); the peak of tensors in flight in collectives is
reported beside them ("of which comm buffers": those bytes are also in the activation/temporary figures).
"""
from __future__ import annotations

import collections
import contextlib
import os
import sys
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.multiprocessing.reductions import StorageWeakRef
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

_PACKAGE = Path(__file__).resolve().parent.parent  # the moeforge package root
# frames that are the dry run's own machinery, or a helper whose caller is the real site
_SKIP = {str(_PACKAGE / p) for p in ("train/dryrun.py", "train/fake_device.py", "comm/fake_streams.py",
                                     "model/host.py")}
_SHAPE_FROM_VALUES = {"nonzero", "masked_select", "unique", "_unique", "_unique2", "unique_consecutive",
                      "unique_dim", "bincount", "repeat_interleave", "nonzero_numpy", "argwhere"}


class HostTensorOnDeviceGroup(RuntimeError):
    """A collective got a CPU tensor on a group whose backend (NCCL on GPUs) only takes device tensors."""


class DryRunError(RuntimeError):
    """Code the dry run cannot run because a GPU would not run it well (a hidden host sync)."""


def call_site(depth: int = 1) -> str:
    """'path:line (function)' of the innermost moeforge frame that is not the dry run's machinery, and of
    its callers up to `depth` frames ('a <- b <- c')."""
    f, sites = sys._getframe(1), []
    while f is not None and len(sites) < depth:
        name = f.f_code.co_filename
        if name.startswith(str(_PACKAGE)) and name not in _SKIP and "/.venv/" not in name:
            sites.append(f"{os.path.relpath(name, _PACKAGE)}:{f.f_lineno} ({f.f_code.co_name})")
        f = f.f_back
    return " <- ".join(sites) or "<outside moeforge>"


@dataclass
class HostSyncs:
    """Host reads per step, by call site."""
    steps: list[collections.Counter] = field(default_factory=list)

    def start_step(self) -> None:
        self.steps.append(collections.Counter())

    def note(self, what: str) -> None:
        if self.steps:
            self.steps[-1][f"{call_site()}  {what}"] += 1

    def per_step(self) -> int:
        """The most host reads any measured step made."""
        return max((sum(c.values()) for c in self.steps), default=0)


class HostReads(TorchFunctionMode):
    """Counts each Python-level read of a device tensor's values (`.item()`, `.tolist()`, `float(t)`, `int(t)`,
    `bool(t)`) once, at its call site. Below this level a `.tolist()` is one scalar read per element, and
    it reaches no torch function of its own: it is wrapped while the mode is active."""

    READS = {torch.Tensor.item: ".item()", torch.Tensor.__float__: "float()", torch.Tensor.__int__: "int()",
             torch.Tensor.__bool__: "bool()", torch.Tensor.__index__: "index"}

    def __init__(self, syncs: HostSyncs):
        super().__init__()
        self.syncs = syncs
        self.inside = 0  # > 0 while a read runs (its element reads are not reads of their own)
        self._tolist = None

    def _read(self, what: str, fn, t: torch.Tensor, *args, **kwargs):
        if t.device.type != "cuda":
            return fn(t, *args, **kwargs)
        if not self.inside:
            self.syncs.note(f"host read ({what})")
        self.inside += 1
        try:
            return fn(t, *args, **kwargs)
        finally:
            self.inside -= 1

    def __enter__(self):
        from torch._subclasses.fake_tensor import FakeTensor

        orig = self._tolist = FakeTensor.tolist  # the dry run's tensors are FakeTensors, which define their own
        FakeTensor.tolist = lambda t: self._read(".tolist()", orig, t)
        return super().__enter__()

    def __exit__(self, *exc):
        from torch._subclasses.fake_tensor import FakeTensor

        FakeTensor.tolist = self._tolist
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            return _gpu_attention(func, args, kwargs)
        what = self.READS.get(func)
        if what is None or not isinstance(args[0], torch.Tensor):
            return func(*args, **kwargs)
        return self._read(what, func, *args, **kwargs)


def _gpu_attention(sdpa, args, kwargs):
    """F.scaled_dot_product_attention on CUDA tensors as a Hopper GPU runs it (HostReads routes it here: one
    function mode, not two, on every torch call). Which fused kernel SDPA takes is decided in C++ by a
    per-device stub that a CPU build does not have for CUDA, so under fake tensors it falls back to the
    math path, whose [heads, T, T] scores a GPU never holds (8.6 GB per layer and micro-batch at the 671b
    shapes). Here it calls the memory-efficient kernel: MLA's q/k and v head dims differ (192, 128), which
    FlashAttention does not take."""
    from .activations import efficient_sdpa, efficient_sdpa_applies

    if args[0].device.type != "cuda" or not efficient_sdpa_applies(args, kwargs):
        return sdpa(*args, **kwargs)
    return efficient_sdpa(*args, **kwargs)


class DryRunMode(TorchDispatchMode):
    """Serves host reads their stand-in values (HostReads counts them), counts device -> host copies,
    rejects host tensors in collectives and ops whose output shape depends on values."""

    def __init__(self, syncs: HostSyncs):
        super().__init__()
        self.syncs = syncs
        self.comm_live: dict[int, tuple] = {}  # storage -> (bytes, weakref to a tensor on it) handed to collectives
        self.comm_peak = 0
        self.pinned: dict[int, StorageWeakRef] = {}  # host storages made with pin_memory=True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if func.namespace == "c10d":
            self._check_collective(func, args, kwargs)
        elif func is torch.ops.aten._local_scalar_dense.default:
            t = args[0]
            return False if t.dtype == torch.bool else (0 if not t.dtype.is_floating_point else 0.0)
        elif name in ("_to_copy", "copy_") and self._device_to_host(func, args, kwargs):
            self.syncs.note("device -> host copy (.cpu)")
        elif kwargs.get("pin_memory"):  # fake host tensors cannot be pinned: remember which were asked to be
            out = func(*args, **kwargs)
            self.pinned[out.untyped_storage()._cdata] = StorageWeakRef(out.untyped_storage())
            return out
        elif name in _SHAPE_FROM_VALUES and kwargs.get("output_size") is None and any(isinstance(a, torch.Tensor) and a.device.type == "cuda"
                                                for a in tree_leaves((args, kwargs))):
            raise DryRunError(f"{call_site(3)}: aten.{name} on a CUDA tensor: its output shape depends on the "
                              "values, a hidden host sync on a GPU (and no shape in the dry run); use a "
                              "static-shape form (scatter_add_ counts, a sort and a host-known length)")
        return func(*args, **kwargs)

    def _device_to_host(self, func, args, kwargs) -> bool:
        if func.overloadpacket.__name__ == "copy_":
            # a non_blocking copy into pinned memory is queued on a stream, not a host wait (the EMA's)
            queued = kwargs.get("non_blocking", len(args) > 2 and args[2]) and self._pinned(args[0])
            return args[0].device.type == "cpu" and args[1].device.type == "cuda" and not queued
        dev = kwargs.get("device")
        return args[0].device.type == "cuda" and dev is not None and torch.device(dev).type == "cpu"

    def _pinned(self, t: torch.Tensor) -> bool:
        ref = self.pinned.get(t.untyped_storage()._cdata)
        return ref is not None and not ref.expired()

    def _check_collective(self, func, args, kwargs) -> None:
        tensors = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        host = [t for t in tensors if t.device.type != "cuda"]
        if host:
            raise HostTensorOnDeviceGroup(
                f"{call_site(3)}: {func.overloadpacket.__name__} got a {host[0].device.type} tensor "
                f"{tuple(host[0].shape)} {host[0].dtype}, but the group's backend takes device tensors only "
                "(a GPU's does): move the values to the device, or reduce them over a CPU group")
        for t in tensors:  # the buffers in flight: held (weakly) until their owner drops them
            self.comm_live[t.untyped_storage()._cdata] = (t.untyped_storage().nbytes(), weakref.ref(t))
        self.comm_live = {k: v for k, v in self.comm_live.items() if v[1]() is not None}
        self.comm_peak = max(self.comm_peak, sum(n for n, _ in self.comm_live.values()))

    def end_step(self) -> None:
        self.comm_live.clear()


@dataclass
class DryRunReport:
    rank: int
    layout: str
    coords: str
    params: int  # this rank's parameter elements
    step_s: list[float]  # wall seconds of each step
    seconds: float  # build + steps
    memory: dict[str, int]  # category -> peak bytes
    comm_peak: int
    syncs: HostSyncs
    plan: dict[str, float] | None = None  # the planner's GiB for the same rank, by category
    plan_rank: str = ""

    def render(self) -> str:
        gib = 2 ** 30
        lines = [f"dry run: rank {self.rank} of {self.layout}  {self.coords}",
                 f"  {self.params / 1e9:.3f} B parameters on this rank; {self.seconds:.1f} s, of which steps "
                 + ", ".join(f"{s:.1f}" for s in self.step_s)]
        lines.append("  peak memory (MemTracker, GiB)" + ("          plan" if self.plan else ""))
        if self.plan_rank:
            lines.append(f"    ({self.plan_rank})")
        for k, v in self.memory.items():
            p = f"   {self.plan[k]:10.3f}" if self.plan and k in self.plan else ""
            lines.append(f"    {k:<24}{v / gib:10.3f}{p}")
        lines.append(f"    {'of which comm buffers':<24}{self.comm_peak / gib:10.3f}")
        last = self.syncs.steps[-1] if self.syncs.steps else collections.Counter()
        lines.append(f"  host syncs per step: {self.syncs.per_step()} (last step, by call site:)")
        for site, n in sorted(last.items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"    {n:5d}  {site}")
        return "\n".join(lines)


class _NoModules:
    """Stands in for MemTracker's ModTracker. Its module hooks refuse a root module called twice (every
    micro-batch calls the model; MTP calls the head again) and its multi-grad hooks fail under the
    autograd.grad calls of DualPipe's split backward. Only the peak by category is used here, and the one
    thing MemTracker asks of it, whether backward is running, autograd says itself."""

    parents = frozenset({"Global"})

    @property
    def is_bw(self) -> bool:
        return torch._C._current_graph_task_id() != -1

    def register_user_hooks(self, *hooks) -> None:
        pass

    def clear_user_hooks(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def step_mem_tracker(model: torch.nn.Module, optimizer_state: dict[str, torch.Tensor], grad_buffers=()):
    """A MemTracker over whole optimizer steps: the model's parameters, buffers and gradients (hooks on each
    parameter), the optimizer's state (ZeRO-1's flat shards: not a torch Optimizer), and every tensor the
    step allocates (activations in forward, temporaries in backward)."""
    from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

    tracker = MemTracker()
    tracker._mod_tracker = _NoModules()
    tracker._track_module_params_and_buffers(model, install_grad_hooks=True)
    for state in optimizer_state.values():
        tracker._update_and_maybe_create_winfos(state, _MemRefType.OPT)
    for g in grad_buffers:  # ZeRO-1's FP32 grad buffer (parallel/zero.py): allocated with the optimizer, held all step
        tracker._update_and_maybe_create_winfos(g, _MemRefType.GRAD)
    return tracker


@contextlib.contextmanager
def assigned_grads_typed(tracker):
    """MemTracker types a gradient by the hooks autograd runs when it accumulates one. DualPipe's split
    backward accumulates its own (`p.grad = g.clone()`, dualpipe/stage.py): type those as gradients when
    they are assigned."""
    from torch.distributed._tools.mem_tracker import _MemRefType

    base = torch._C.TensorBase.grad

    def set_grad(p, g):
        base.__set__(p, g)
        if g is not None:
            tracker._update_and_maybe_create_winfos(g, _MemRefType.GRAD)

    torch.nn.Parameter.grad = property(base.__get__, set_grad, base.__delete__)
    try:
        yield
    finally:
        del torch.nn.Parameter.grad


def init_fake_process_group(rank: int, world_size: int) -> None:
    """torch's fake process group (collectives return at once) registered as a CUDA-only backend, as NCCL
    is: object collectives then stage their bytes on the device, as they do on NCCL."""
    from torch.testing._internal.distributed.fake_pg import FakeStore, _create_fake_pg

    if not hasattr(dist.Backend, "FAKECUDA"):
        dist.Backend.register_backend("fakecuda", _create_fake_pg, extended_api=True, devices=["cuda"])
    dist.init_process_group("fakecuda", store=FakeStore(), rank=rank, world_size=world_size)


class SyntheticBatches:
    """The data seam: this rank's [global_batch / dp, seq_len + 1 + D] token rows, zeros on the host, where
    the sampler (train/data.py SampleStream) would read them from the corpus."""

    def __init__(self, window: int, dp_size: int):
        self.window, self.dp_size = window, dp_size

    def rows(self, first: int, global_batch: int) -> torch.Tensor:
        return torch.zeros(global_batch // self.dp_size, self.window, dtype=torch.int64)


def dry_run(cfg, world_size: int, rank: int, procs_per_node: int, steps: int = 2,
            memory_bytes: int = 80 * 2 ** 30) -> DryRunReport:
    """Run `steps` optimizer steps of `rank` in a world of `world_size` on a fake GPU (this process's
    torch.distributed and torch.cuda are taken over: run it in its own process)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import _MemRefType
    from moeforge.model.host import uniform_routing
    from moeforge.parallel.env import RuntimeEnv
    from moeforge.parallel.mesh import build_meshes

    from .build import check_layout
    from .fake_device import fake_cuda_runtime
    from .trainer import Trainer

    if not 0 <= rank < world_size:
        raise ValueError(f"--rank {rank} not in [0, {world_size})")
    dims = check_layout(cfg, world_size, procs_per_node)
    if torch._C._get_accelerator().type != "cuda":
        raise RuntimeError("no fake CUDA device in this process: run the dry run as `moeforge dryrun` "
                           "(launcher/dryrun.py loads it before torch)")
    env = RuntimeEnv(rank=rank, local_rank=rank % procs_per_node, world_size=world_size,
                     local_world_size=procs_per_node, node_rank=rank // procs_per_node, launcher="single")
    if not dist.is_initialized():
        init_fake_process_group(rank, world_size)
    meshes = build_meshes(dims, device_type="cuda", timeout_s=cfg.parallel.timeout_s)
    syncs, step_s = HostSyncs(), []
    # meta -> fake cuda: new Parameters rather than a swap (fake mode keeps weak references to the meta ones)
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    t0 = time.perf_counter()
    class FakeCudaTensorMode(FakeTensorMode):
        # fake_cuda_runtime says CUDA is available, but there is no device to run a constant's op on
        avoid_device_init = True

    with FakeCudaTensorMode(allow_non_fake_inputs=True), \
            fake_cuda_runtime(procs_per_node, memory_bytes, syncs.note), \
            DryRunMode(syncs) as mode, HostReads(syncs), uniform_routing():
        t = cfg.train
        window = t.seq_len + 1 + cfg.model.n_mtp_modules
        data = (SyntheticBatches(window, dims.dp), SyntheticBatches(window, dims.dp))
        trainer = Trainer(cfg, env, meshes, data=data)
        tracker = step_mem_tracker(trainer.model, trainer.optimizer.state_tensors(), trainer.optimizer.grad_buffers())
        with tracker, assigned_grads_typed(tracker):
            for _ in range(steps):
                syncs.start_step()
                t_step = time.perf_counter()
                trainer.train_step()
                step_s.append(time.perf_counter() - t_step)
                mode.end_step()
        peak = tracker.get_tracker_snapshot("peak")
    snap = next((v for d, v in peak.items() if torch.device(d).type == "cuda"), {})
    names = {_MemRefType.PARAM: "parameters", _MemRefType.BUFFER: "buffers", _MemRefType.GRAD: "gradients",
             _MemRefType.OPT: "optimizer state", _MemRefType.ACT: "activations",
             _MemRefType.TEMP: "backward temporaries", _MemRefType.OTH: "other", "Total": "total"}
    memory = {names.get(k, str(k)): v for k, v in snap.items()}
    n_params = sum(p.numel() for _, p in trainer.named_params)
    return DryRunReport(rank, str(dims), str(meshes.coords), n_params, step_s, time.perf_counter() - t0,
                        memory, mode.comm_peak, syncs)

