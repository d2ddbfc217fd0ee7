"""Everything before the first step: the layout and its batch split, the device, the corpus, the model
(meta build -> FP8 swap -> expert parallelism -> pipeline split -> materialize -> init) and the optimizer.

The batch split. Each optimizer step takes train.global_batch_size sequences; each of the dp replicas
takes global_batch_size / dp of them and runs them in micro-batches of train.micro_batch_size. Left
null (the default), the micro-batch is the largest that splits the replica's share into at least
`least` micro-batches that the pipeline schedule accepts (dualpipe.schedule.validate), where `least` is
2 without a pipeline (gradient accumulation) and with one the micro-batches the schedule needs to keep
every stage busy: pp for 1f1b and zb1p, 2*pp for dualpipe and dualpipev. So 16 sequences give 2 x 8
on one rank, 2 x 4 per rank at dp 2, 2 x 2 at dp 4, and 4 x 2 per rank with DualPipeV over pp 2 x dp 2.
"""
from __future__ import annotations

from pathlib import Path

import torch

from moeforge.comm.counters import ByteCounters
from moeforge.dualpipe.schedule import num_stages, validate
from moeforge import fp8
from moeforge.model.split import build_stages
from moeforge.model.transformer import Transformer
from moeforge.parallel.apply_ep import apply_ep
from moeforge.parallel.dims import ParallelDims
from moeforge.parallel.env import RuntimeEnv
from moeforge.parallel.mesh import Meshes, build_meshes, init_distributed
from moeforge.parallel.zero import ShardedAdamW

from .config import TrainConfig
from .data import load_meta, prepare
from .optim import no_weight_decay


def batch_split(t: TrainConfig, dp: int, pp: int = 1, schedule: str = "1f1b") -> tuple[int, int]:
    """(micro_batch_size, micro-batches per rank) per the rule above; ValueError naming the fields."""
    share, rest = divmod(t.global_batch_size, dp)
    if t.micro_batch_size is not None:
        if rest or share % t.micro_batch_size:
            raise ValueError(f"train.global_batch_size={t.global_batch_size} must be a multiple of "
                             f"train.micro_batch_size*dp = {t.micro_batch_size}*{dp}")
        return t.micro_batch_size, share // t.micro_batch_size
    if rest:
        raise ValueError(f"train.global_batch_size={t.global_batch_size} must be a multiple of dp={dp} "
                         f"(train.micro_batch_size=null derives the micro-batch from the rest)")
    if pp == 1:
        n = next((n for n in range(2, share + 1) if share % n == 0), 1)
        return share // n, n
    least = 2 * pp if schedule in ("dualpipe", "dualpipev") else pp
    for n in range(least, share + 1):
        if share % n == 0 and _accepts(schedule, pp, n):
            return share // n, n
    validate(schedule, pp, least)  # the schedule's own reason when no number of micro-batches would do
    raise ValueError(f"schedule={schedule} with parallel.pp={pp} needs at least {least} micro-batches per rank, but "
                     f"train.global_batch_size={t.global_batch_size} / dp={dp} = {share} sequences per rank do not "
                     f"split into them: raise train.global_batch_size")


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
    the parallel degrees (pp x dp, ep within dp, experts over ep), the batch split into micro-batches and the
    pipeline schedule. Every rank runs it at start-up; `moeforge launch` and `moeforge slurm submit` run it
    before starting anything. Raises ValueError naming the fields."""
    dims = ParallelDims.from_config(cfg.parallel, world_size, procs_per_node, cfg.model.n_routed_experts)
    validate_schedule(cfg, dims.pp, dims.dp)
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


def ensure_data(cfg, log_fn=print) -> dict:
    """Prepare the corpus on first use (the default needs no download)."""
    meta_path = Path(cfg.data.dir) / "meta.json"
    if not meta_path.is_file():
        log_fn(f"data: {cfg.data.dir} not prepared yet; tokenizing {cfg.data.input or 'the Python standard library'}")
        prepare(cfg.data.input, cfg.data.dir, cfg.data.val_fraction, log=log_fn)
    meta = load_meta(cfg.data.dir)
    if meta["vocab_size"] > cfg.model.vocab_size:
        raise ValueError(f"model.vocab_size={cfg.model.vocab_size} < tokenizer vocab {meta['vocab_size']} "
                         f"of {cfg.data.dir}")
    return meta


def build_model(cfg, device: torch.device, meshes: Meshes | None = None, counters: ByteCounters | None = None,
                stage_ids=None) -> Transformer:
    """Meta build -> FP8 module swap -> expert parallelism -> pipeline split -> materialize -> init
    (torchtitan's order). With stage_ids (pp > 1) the model is pruned to those pipeline stages and
    returned with a `.stages` dict {stage id: StageModule}; init_weights seeds each parameter by its
    name, so every layout starts from the single-process model's values."""
    with torch.device("meta"):
        model = Transformer(cfg.model)
    if cfg.fp8.enabled:  # looked up on the package at each call: bench/fp8_ablation.py swaps it
        fp8.apply_fp8(model, cfg.fp8)
    if meshes is not None and meshes.dims.ep > 1:
        apply_ep(model, meshes.ep, meshes.coords.ep, meshes.dims.ep, meshes.dims.ranks_per_node,
                 two_hop=cfg.parallel.two_hop, fp8=cfg.parallel.fp8_dispatch, counters=counters,
                 timeout_s=meshes.timeout_s, device=device)
    stages = None
    if stage_ids is not None:
        stages = build_stages(model, stage_ids, num_stages(cfg.schedule.name, cfg.parallel.pp))
    model.to_empty(device=device)
    model.init_weights(seed=cfg.train.seed)
    model.stages = stages
    return model


def build_optimizer(named_params, t: TrainConfig, meshes: Meshes | None) -> ShardedAdamW:
    """AdamW with ZeRO-1: dense state sharded over dp, routed experts' over edp."""
    groups = {} if meshes is None else dict(dense_group=meshes.dp, expert_group=meshes.edp)
    return ShardedAdamW(named_params, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, weight_decay=t.weight_decay,
                        no_decay=no_weight_decay, moment_dtype=getattr(torch, t.moment_dtype), **groups)
