"""Everything before the first step: the layout and its batch split, the device, the corpus, the model
(meta build -> expert parallelism -> FP8 swap -> pipeline split -> materialize -> init) and the optimizer.
The corpus is train/data.py's (ensure_data); here only the tokenizer's vocabulary is checked against the model.

The batch split. Each optimizer step takes train.global_batch_size sequences; each of the dp replicas
takes global_batch_size / dp of them and runs them in micro-batches of train.micro_batch_size. Left
null (the default), the micro-batch is the largest that splits the replica's share into at least
`least` micro-batches that the pipeline schedule accepts (dualpipe.schedule.validate), where `least` is
2 without a pipeline (gradient accumulation) and with one the micro-batches the schedule needs to keep
every stage busy: pp for 1f1b and zb1p, 2*pp for dualpipe and dualpipev. So 16 sequences give 2 x 8
on one rank, 2 x 4 per rank at dp 2, 2 x 2 at dp 4, and 4 x 2 per rank with DualPipeV over pp 2 x dp 2.
With train.batch_ramp the micro-batch stays fixed and the number of micro-batches follows the step's
global batch; every batch of the ramp must split that way, checked before any process starts.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from moeforge.comm.counters import ByteCounters
from moeforge.dualpipe.schedule import num_stages, validate
from moeforge import fp8
from moeforge.model.recompute import apply_recompute
from moeforge.model.split import build_stages
from moeforge.model.transformer import Transformer
from moeforge.parallel.apply_ep import apply_ep
from moeforge.parallel.dims import ParallelDims
from moeforge.parallel.env import RuntimeEnv
from moeforge.parallel.mesh import Meshes, build_meshes, init_distributed
from moeforge.parallel.zero import ShardedAdamW

from .batches import BatchSchedule
from .config import TrainConfig
from .optim import no_weight_decay
from .tokenizer import check_vocab, load_tokenizer


def batch_split(t: TrainConfig, dp: int, pp: int = 1, schedule: str = "1f1b") -> tuple[int, int]:
    """(micro_batch_size, micro-batches per rank at train.global_batch_size) per the rule above; with
    train.batch_ramp the one micro-batch size must split every global batch of the run's ramp by the same
    rule (micro-batches per rank = that step's batch / dp / micro_batch_size). ValueError naming the fields."""
    sizes = BatchSchedule.of(t).sizes(t.steps)  # [global_batch_size] without a ramp
    ramp = len(sizes) > 1
    bad = [b for b in sizes if b % dp or (t.micro_batch_size and b // dp % t.micro_batch_size)]
    if bad:
        need = f"train.micro_batch_size*dp = {t.micro_batch_size}*{dp}" if t.micro_batch_size else \
            f"dp={dp} (train.micro_batch_size=null derives the micro-batch from the rest)"
        what = f"train.batch_ramp: the global batch {bad[0]} (of {sizes})" if ramp else \
            f"train.global_batch_size={bad[0]}"
        raise ValueError(f"{what} must be a multiple of {need}")
    shares = [b // dp for b in sizes]
    least = 2 * pp if schedule in ("dualpipe", "dualpipev") else pp
    if t.micro_batch_size is not None:
        mbs = t.micro_batch_size
    else:  # the largest micro-batch giving every share >= 2 micro-batches (or 1 for 1 sequence) the schedule accepts
        mbs = next((m for m in range(min(shares), 0, -1) if all(
            s % m == 0 and (s // m >= min(2, s) if pp == 1 else s // m >= least and _accepts(schedule, pp, s // m))
            for s in shares)), None)
        if mbs is None:
            validate(schedule, pp, least)  # the schedule's own reason when no number of micro-batches would do
            what, knob = (f"train.batch_ramp {sizes}", "train.batch_ramp.start") if ramp else \
                (f"train.global_batch_size={sizes[0]}", "train.global_batch_size")
            raise ValueError(f"schedule={schedule} with parallel.pp={pp} needs at least {least} micro-batches per "
                             f"rank, but {what} / dp={dp} = {shares if ramp else shares[0]} sequences per rank do not "
                             f"split into them: raise {knob}")
    if pp > 1 and ramp:
        for s in shares:
            try:
                validate(schedule, pp, s // mbs)
            except ValueError as e:
                raise ValueError(f"train.batch_ramp: the global batch {s * dp} gives {s // mbs} micro-batches per rank "
                                 f"(/ dp={dp} / micro-batch {mbs}), which schedule={schedule} with parallel.pp={pp} "
                                 f"does not accept: {e}") from None
    return mbs, t.global_batch_size // dp // mbs


def micro_batches(global_batch: int, dp: int, micro_batch_size: int) -> int:
    """Micro-batches per rank of a step of `global_batch` sequences (batch_split checked the whole ramp)."""
    n, rest = divmod(global_batch, dp * micro_batch_size)
    if rest or not n:
        raise ValueError(f"train.batch_ramp: a global batch of {global_batch} does not split over dp={dp} "
                         f"x micro-batch {micro_batch_size} (a checkpoint consumed samples off this ramp?)")
    return n


def _accepts(schedule: str, pp: int, n_micro: int) -> bool:
    try:
        validate(schedule, pp, n_micro)
    except ValueError:
        return False
    return True


def validate_schedule(cfg, pp: int, dp: int) -> tuple[int, int]:
    """The batch split (batch_split) and, with parallel.pp > 1, the schedule for it; raises naming the fields."""
    mbs, n_micro = batch_split(cfg.train, dp, pp, cfg.schedule.name)
    if pp == 1:
        return mbs, n_micro
    try:
        validate(cfg.schedule.name, pp, n_micro)
    except ValueError as e:
        raise ValueError(f"schedule={cfg.schedule.name} with parallel.pp={pp}: {n_micro} micro-batches per rank "
                         f"(train.global_batch_size / dp / train.micro_batch_size = {cfg.train.global_batch_size}"
                         f"/{dp}/{mbs}): {e}") from None
    n_stages = num_stages(cfg.schedule.name, pp)
    if n_stages > 2 and cfg.model.n_layers < n_stages - 2:
        raise ValueError(f"schedule={cfg.schedule.name} with parallel.pp={pp} has {n_stages} stages: needs "
                         f"model.n_layers >= {n_stages - 2} (no empty middle stage), got {cfg.model.n_layers}")
    return mbs, n_micro


def check_layout(cfg, world_size: int, procs_per_node: int) -> ParallelDims:
    """Everything about a job that can be wrong for its world size, checked before any process group forms:
    the parallel degrees (pp x dp, ep within dp, experts over ep), the batch split into micro-batches (every
    batch of train.batch_ramp) and the pipeline schedule; and, not of the world size but as cheap, that the
    model's vocabulary holds data.tokenizer's ids. Every rank runs it at start-up; `moeforge launch` and
    `moeforge slurm submit` run it before starting anything. Raises ValueError naming the fields."""
    dims = ParallelDims.from_config(cfg.parallel, world_size, procs_per_node, cfg.model.n_routed_experts)
    validate_schedule(cfg, dims.pp, dims.dp)
    check_vocab(load_tokenizer(cfg.data.tokenizer), cfg.model.vocab_size)
    return dims


def setup_distributed(cfg) -> tuple[RuntimeEnv, Meshes | None]:
    """(env, meshes): meshes is None for a single process. Validates the layout before any group forms."""
    env = RuntimeEnv.from_env()
    dims = check_layout(cfg, env.world_size, env.local_world_size)
    if env.world_size == 1:
        return env, None
    backend = init_distributed(env, cfg.parallel.backend, cfg.parallel.timeout_s)
    meshes = build_meshes(dims, device_type="cuda" if backend == "nccl" else "cpu", timeout_s=cfg.parallel.timeout_s)
    if env.rank == 0:
        print(f"moeforge: layout {dims}", flush=True)
    return env, meshes


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device=cuda but torch sees no CUDA device")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device("cuda", local_rank) if name == "cuda" else torch.device(name)


def build_model(cfg, device: torch.device, meshes: Meshes | None = None, counters: ByteCounters | None = None,
                stage_ids=None) -> Transformer:
    """Meta build -> expert parallelism -> FP8 module swap -> recompute policy -> pipeline split -> materialize
    -> init.
    With stage_ids (pp > 1) the model is pruned to those pipeline stages and
    returned with a `.stages` dict {stage id: StageModule}; init_weights seeds each parameter by its
    name, so every layout starts from the single-process model's values."""
    with torch.device("meta"), _no_default_init():
        model = Transformer(cfg.model)
    if meshes is not None and meshes.dims.ep > 1:  # first: the FP8 swap then touches this rank's experts only
        apply_ep(model, meshes.ep, meshes.coords.ep, meshes.dims.ep, meshes.dims.ranks_per_node,
                 two_hop=cfg.parallel.two_hop, fp8=cfg.parallel.fp8_dispatch, counters=counters,
                 timeout_s=meshes.timeout_s, device=device)
    if cfg.fp8.enabled:  # looked up on the package at each call: bench/fp8_ablation.py swaps it
        fp8.apply_fp8(model, cfg.fp8)
    apply_recompute(model, cfg.train.recompute)  # model/recompute.py: none | selective | full
    stages = None
    if stage_ids is not None:
        stages = build_stages(model, stage_ids, num_stages(cfg.schedule.name, cfg.parallel.pp))
    materialize_(model, device)
    model.init_weights(seed=cfg.train.seed)
    model.stages = stages
    return model


@contextlib.contextmanager
def _no_default_init():
    """nn.Linear's own init draws nothing on meta tensors but still costs Python time per module (12 of the
    25 s of the 671b model's meta build): init_weights sets every parameter after materialization."""
    reset = nn.Linear.reset_parameters
    nn.Linear.reset_parameters = lambda self: None
    try:
        yield
    finally:
        nn.Linear.reset_parameters = reset


@torch.no_grad()
def materialize_(model: torch.nn.Module, device: torch.device) -> None:
    """Module.to_empty, in one memoized pass that gives every parameter and buffer fresh storage on
    `device` (a tensor two modules share stays shared). to_empty would swap each Parameter in place, which
    fails for the fake ones of the dry run (train/dryrun.py); nothing holds a parameter before this."""
    new: dict[int, torch.Tensor] = {}
    for m in model.modules():
        for table in (m._parameters, m._buffers):
            for k, t in table.items():
                if t is not None and id(t) not in new:
                    e = torch.empty_like(t, device=device)
                    new[id(t)] = nn.Parameter(e, t.requires_grad) if isinstance(t, nn.Parameter) else e
                if t is not None:
                    table[k] = new[id(t)]


def build_optimizer(named_params, t: TrainConfig, meshes: Meshes | None) -> ShardedAdamW:
    """AdamW with ZeRO-1: dense state sharded over dp, routed experts' over edp."""
    groups = {} if meshes is None else dict(dense_group=meshes.dp, expert_group=meshes.edp)
    return ShardedAdamW(named_params, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, weight_decay=t.weight_decay,
                        no_decay=no_weight_decay, moment_dtype=getattr(torch, t.moment_dtype), **groups)
