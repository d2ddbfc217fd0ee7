"""Hydra composition -> frozen JobConfig; bad input fails fast and names the field."""
import pytest

from moeforge.launcher.config import ConfigError, load_job_config


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
    from moeforge.launcher.cli import main

    assert main(["train", "train.stepz=5"]) == 2
    assert "stepz" in capsys.readouterr().err
