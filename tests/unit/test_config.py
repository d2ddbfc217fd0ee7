"""Hydra composition -> frozen JobConfig; bad input fails fast and names the field."""
import pytest

from moeforge.launcher.cli import main
from moeforge.launcher.config import ConfigError, load_job_config
from moeforge.train.build import check_layout
from moeforge.train.build import batch_split


def test_defaults_compose_into_typed_config():
    cfg = load_job_config([])
    assert cfg.model.name == "tiny" and cfg.train.steps > 0 and cfg.run_dir == "outputs/tiny"
    assert cfg.fp8.enabled is False and cfg.parallel.pp == 1


def test_overrides_and_groups():
    cfg = load_job_config(["model=16b", "train.steps=7", "train.lr=1e-4", "parallel.ep=2", "fp8=blockwise",
                           "logging=wandb", "train.seq_len=64"])
    assert (cfg.model.name, cfg.train.steps, cfg.train.lr, cfg.parallel.ep) == ("16b", 7, 1e-4, 2)
    assert cfg.fp8.enabled and cfg.logging.backend == "wandb" and cfg.run_dir == "outputs/16b"
    with pytest.raises(Exception):  # frozen
        cfg.train.steps = 3


@pytest.mark.parametrize("override, needle", [
    (["train.stepz=5"], "stepz"),
    (["train.steps=abc"], "train.steps"),
    (["model=huge"], "model"),
    (["train.global_batch_size=10", "train.micro_batch_size=4"], "train.global_batch_size"),
    (["train.micro_batch_size=0"], "train.micro_batch_size"),
    (["train.lr=-1"], "train.lr"),
    (["parallel.pp=0"], "parallel.pp"),
    (["model.n_limited_groups=9"], "model.n_limited_groups"),
    (["train.seq_len=4096"], "train.seq_len"),
    (["train.moment_dtype=float16"], "train.moment_dtype"),
    (["fp8.backend=magic"], "fp8.backend"),
])
def test_bad_config_names_the_field(override, needle):
    with pytest.raises((ConfigError, ValueError), match=needle):
        load_job_config(override)


def test_cli_reports_config_error_without_traceback(capsys):
    assert main(["train", "train.stepz=5"]) == 2
    assert "stepz" in capsys.readouterr().err


@pytest.mark.parametrize("world, overrides, split", [
    (1, [], (8, 2)),  # 16 sequences: 2 micro-batches of 8
    (2, [], (4, 2)),
    (4, [], (2, 2)),  # `moeforge launch --nproc-per-node 4 model=tiny`
    (4, ["parallel.ep=2"], (2, 2)),  # ep is carved out of dp: still dp 4
    (2, ["parallel.pp=2"], (8, 2)),  # 1f1b: at least pp micro-batches
    (4, ["parallel.pp=4"], (4, 4)),
    (4, ["parallel.pp=2", "schedule=dualpipev"], (2, 4)),  # at least 2*pp
    (4, ["parallel.pp=4", "schedule=dualpipe"], (2, 8)),
    (4, ["experiment=cpu4"], (2, 4)),
    (4, ["train.global_batch_size=24"], (3, 2)),
    (2, ["train.micro_batch_size=8"], (8, 1)),  # an explicit value is used as given
])
def test_default_batch_split_at_1_2_and_4_ranks(world, overrides, split):
    """train.micro_batch_size=null: the largest micro-batch giving each rank >= 2 micro-batches (with a
    pipeline, as many as the schedule needs)."""
    cfg = load_job_config(overrides)
    dims = check_layout(cfg, world, world)
    assert batch_split(cfg.train, dims.dp, dims.pp, cfg.schedule.name) == split
    assert split[0] * split[1] * dims.dp == cfg.train.global_batch_size


@pytest.mark.parametrize("world, overrides, needles", [
    (4, ["train.micro_batch_size=8"], ["train.global_batch_size=16", "train.micro_batch_size*dp = 8*4"]),
    (4, ["train.global_batch_size=6"], ["train.global_batch_size=6", "dp=4"]),
    (4, ["parallel.pp=2", "schedule=dualpipev", "train.global_batch_size=4"],
     ["schedule=dualpipev", "parallel.pp=2", "train.global_batch_size=4", "at least 4"]),
    (4, ["parallel.pp=2", "schedule=dualpipev", "train.micro_batch_size=8"],
     ["schedule=dualpipev", "train.micro_batch_size"]),
])
def test_a_batch_that_does_not_split_names_the_fields(world, overrides, needles):
    cfg = load_job_config(overrides)
    with pytest.raises(ValueError) as e:
        check_layout(cfg, world, world)
    assert all(n in str(e.value) for n in needles), str(e.value)
