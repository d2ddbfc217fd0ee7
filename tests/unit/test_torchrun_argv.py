"""Launch options -> torchrun argv (pure), checked against torch.distributed.run's own parser; and
RuntimeEnv detection for torchrun, Slurm and a single process."""
import argparse

import pytest
from torch.distributed.run import get_args_parser

from moeforge.parallel.env import RuntimeEnv, first_host
from moeforge.launcher.torchrun import (LaunchOptions, add_launch_arguments, build_torchrun_argv, launch,
                               options_from_args, torchrun_flags)


def parse(argv: list[str], environ=None) -> LaunchOptions:
    p = add_launch_arguments(argparse.ArgumentParser())
    p.add_argument("overrides", nargs="*")
    return options_from_args(p.parse_args(argv), environ={} if environ is None else environ)


def torchrun_parse(argv):
    return get_args_parser().parse_args(argv)


def test_single_node_is_standalone():
    argv = build_torchrun_argv(parse(["--nproc-per-node", "4"]), "moeforge.launcher.cli", ["train", "train.steps=5"])
    ns = torchrun_parse(argv)
    assert ns.standalone and ns.nproc_per_node == "4" and ns.nnodes == "1" and ns.max_restarts == 0
    assert ns.module and ns.training_script == "moeforge.launcher.cli" and ns.training_script_args == ["train", "train.steps=5"]


def test_multi_node_uses_c10d_rendezvous_and_passes_everything_through():
    opts = parse(["--nproc-per-node", "2", "--nnodes", "2", "--rdzv-endpoint", "10.231.7.1:29400",
                  "--rdzv-id", "job7", "--rdzv-conf", "is_host=true", "--max-restarts", "3",
                  "--local-addr", "10.231.7.1", "--monitor-interval", "0.5", "parallel.pp=2"])
    argv = build_torchrun_argv(opts, "moeforge.launcher.cli", ["train", "parallel.pp=2"])
    ns = torchrun_parse(argv)
    assert not ns.standalone and ns.nnodes == "2" and ns.rdzv_backend == "c10d"
    assert (ns.rdzv_endpoint, ns.rdzv_id, ns.rdzv_conf) == ("10.231.7.1:29400", "job7", "is_host=true")
    assert (ns.max_restarts, ns.local_addr, ns.monitor_interval) == (3, "10.231.7.1", 0.5)
    assert ns.training_script_args == ["train", "parallel.pp=2"]


def test_signals_to_handle_when_torch_supports_it():
    argv = build_torchrun_argv(LaunchOptions(), "m", [])
    if "--signals-to-handle" in torchrun_flags():
        assert torchrun_parse(argv).signals_to_handle == "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
    else:
        assert "--signals-to-handle" not in argv


def test_multi_node_without_endpoint_fails_with_the_values():
    with pytest.raises(ValueError, match="--nnodes 2 needs --rdzv-endpoint"):
        build_torchrun_argv(parse(["--nnodes", "2"]), "m", [])


def test_slurm_allocation_fills_nodes_and_rendezvous():
    env = {"SLURM_NNODES": "2", "SLURM_NODEID": "1", "SLURM_JOB_ID": "4242", "MASTER_ADDR": "n1"}
    opts = parse(["--nproc-per-node", "2"], environ=env)
    assert (opts.nnodes, opts.node_rank, opts.rdzv_endpoint, opts.rdzv_id) == ("2", 1, "n1:29400", "4242")
    # explicit flags win
    opts = parse(["--nnodes", "1"], environ=env)
    assert opts.nnodes == "1" and opts.rdzv_endpoint is None


def test_launch_stops_on_preflight_problems(monkeypatch, capsys):
    from moeforge.launcher import doctor
    from moeforge.launcher.doctor import GpuReport

    monkeypatch.setattr(doctor, "gpu_report", lambda nvml=None, nproc_per_node=None, xid_wait_ms=0: GpuReport(
        available=True, driver="x", nproc_per_node=nproc_per_node, problems=["--nproc-per-node 8 > 4 GPU(s)"]))
    assert launch(LaunchOptions(nproc_per_node="8"), "moeforge.parallel.selfcheck", []) == 1
    assert "preflight found problems" in capsys.readouterr().err


# ---- RuntimeEnv ----

def test_env_single():
    e = RuntimeEnv.from_env({})
    assert (e.rank, e.world_size, e.local_world_size, e.launcher) == (0, 1, 1, "single")


def test_env_torchrun():
    e = RuntimeEnv.from_env({"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4",
                             "GROUP_RANK": "1", "MASTER_ADDR": "h0", "MASTER_PORT": "29501",
                             "SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0"})
    assert (e.rank, e.local_rank, e.world_size, e.local_world_size, e.node_rank) == (5, 1, 8, 4, 1)
    assert (e.master_addr, e.master_port, e.launcher) == ("h0", 29501, "torchrun")


def test_env_slurm_srun_task():
    env = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_NTASKS_PER_NODE": "2",
           "SLURM_NODEID": "1", "SLURM_STEP_ID": "0", "SLURM_JOB_ID": "20017", "MASTER_ADDR": "n1"}
    e = RuntimeEnv.from_env(env)
    assert (e.rank, e.local_rank, e.world_size, e.local_world_size, e.node_rank) == (3, 1, 4, 2, 1)
    assert (e.master_addr, e.master_port, e.launcher) == ("n1", 20017, "slurm")
    e = RuntimeEnv.from_env({**env, "MASTER_PORT": "1234", "SLURM_NTASKS_PER_NODE": ""} |
                            {"SLURM_TASKS_PER_NODE": "2(x2)"})
    assert (e.master_port, e.local_world_size) == (1234, 2)


def test_env_slurm_master_from_nodelist_without_scontrol(monkeypatch):
    import moeforge.parallel.env as env_mod

    def no_scontrol(*a, **k):
        raise FileNotFoundError("scontrol")
    monkeypatch.setattr(env_mod.subprocess, "run", no_scontrol)
    e = RuntimeEnv.from_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0",
                             "SLURM_JOB_NODELIST": "gpu[07-08]"})
    assert e.master_addr == "gpu07" and e.launcher == "slurm"


def test_env_slurm_batch_shell_is_not_a_rank():
    e = RuntimeEnv.from_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "1"})
    assert e.launcher == "single" and e.world_size == 1


@pytest.mark.parametrize("nodelist, host", [("n1", "n1"), ("n[03-05,7],m1", "n03"), ("a-b[1,2]", "a-b1"),
                                            ("x1,x2", "x1")])
def test_first_host(nodelist, host):
    assert first_host(nodelist) == host
