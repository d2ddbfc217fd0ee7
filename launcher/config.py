"""Hydra composes conf/; this module turns the result into a frozen JobConfig. No DictConfig gets past here.

Wrong keys and wrong types fail here, before any process group forms, with the key in the message:
the composed tree is merged into a structured schema built from the dataclasses below.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from moeforge.dualpipe.config import ScheduleConfig
from moeforge.fp8.config import Fp8Config
from moeforge.model.args import ModelArgs
from moeforge.parallel.config import ParallelConfig
from moeforge.train.config import CheckpointConfig, DataConfig, LoggingConfig, TrainConfig


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class JobConfig:
    model: ModelArgs = field(default_factory=ModelArgs)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    fp8: Fp8Config = field(default_factory=Fp8Config)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run_dir: str = "outputs/tiny"

    def __post_init__(self):
        if self.train.seq_len > self.model.max_seq_len:
            raise ValueError(f"train.seq_len={self.train.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}")

    def to_dict(self) -> dict:
        return asdict(self)


def compose(overrides: list[str] | None = None):
    """Compose conf/config.yaml with command-line overrides (hydra's compose API: no output dirs)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_module(config_module="moeforge.conf", version_base="1.3"):
            return hydra_compose(config_name="config", overrides=list(overrides or []))
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(f"config: {e}") from None


def to_job_config(cfg) -> JobConfig:
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if "cluster" in cfg:  # an experiment's cluster section is the planner's and the dry run's (launcher/plan.py)
        from omegaconf import open_dict

        cfg = cfg.copy()
        with open_dict(cfg):
            del cfg["cluster"]
    try:
        schema = OmegaConf.structured(JobConfig)
        _writable(schema)  # frozen dataclasses make read-only nodes; the merge only needs to write values
        merged = OmegaConf.merge(schema, cfg)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        # e.g. "Key 'stepz' not in 'TrainConfig'  full_key: train.stepz" or a type error on train.steps
        raise ConfigError(f"config: {e}") from None


def _writable(node) -> None:
    from omegaconf import OmegaConf

    OmegaConf.set_readonly(node, False)
    if node._is_none():  # an optional field left null (train.batch_ramp, data.blend): nothing below it
        return
    for key in node:
        child = node._get_node(key)
        if OmegaConf.is_config(child):
            _writable(child)


def load_job_config(overrides: list[str] | None = None) -> JobConfig:
    return to_job_config(compose(overrides))

