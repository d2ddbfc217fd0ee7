"""RuntimeEnv: who this process is, read once from the launcher's environment variables.

Three launchers are recognised, in this order:
- torchrun (torch.distributed.run, also under srun): RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE,
  GROUP_RANK, MASTER_ADDR, MASTER_PORT are set by the elastic agent;
- Slurm without torchrun (`srun python -m moeforge.launcher.cli train`, one task per rank): SLURM_PROCID,
  SLURM_NTASKS, SLURM_LOCALID, SLURM_NTASKS_PER_NODE (or SLURM_TASKS_PER_NODE), SLURM_NODEID; the
  master is MASTER_ADDR, else the first host of SLURM_JOB_NODELIST (`scontrol show hostnames`); the
  port is MASTER_PORT, else 20000 + SLURM_JOB_ID % 20000. Only inside a job step (SLURM_STEP_ID set):
  a batch script's own shell is not a rank;
- single: one process, rank 0 of 1.
"""
from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from typing import Literal, Mapping

Launcher = Literal["torchrun", "slurm", "single"]


@dataclass(frozen=True)
class RuntimeEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    node_rank: int = 0
    launcher: Launcher = "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "RuntimeEnv":
        e = os.environ if environ is None else environ
        if "RANK" in e and "WORLD_SIZE" in e and "LOCAL_RANK" in e:
            rank, world = int(e["RANK"]), int(e["WORLD_SIZE"])
            local_world = int(e.get("LOCAL_WORLD_SIZE", world))
            return cls(rank=rank, local_rank=int(e["LOCAL_RANK"]), world_size=world, local_world_size=local_world,
                       master_addr=e.get("MASTER_ADDR", "127.0.0.1"), master_port=int(e.get("MASTER_PORT", 29500)),
                       node_rank=int(e.get("GROUP_RANK", rank // max(local_world, 1))), launcher="torchrun")
        if "SLURM_PROCID" in e and "SLURM_NTASKS" in e and ("SLURM_STEP_ID" in e or "SLURM_STEPID" in e):
            rank, world = int(e["SLURM_PROCID"]), int(e["SLURM_NTASKS"])
            per_node = e.get("SLURM_NTASKS_PER_NODE") or e.get("SLURM_TASKS_PER_NODE") or str(world)
            local_world = int(re.match(r"\d+", per_node).group())  # "4(x2),3" -> 4 (this node may differ)
            port = int(e["MASTER_PORT"]) if "MASTER_PORT" in e else 20000 + int(e.get("SLURM_JOB_ID", 0)) % 20000
            return cls(rank=rank, local_rank=int(e.get("SLURM_LOCALID", 0)), world_size=world,
                       local_world_size=local_world, master_addr=slurm_master_addr(e), master_port=port,
                       node_rank=int(e.get("SLURM_NODEID", 0)), launcher="slurm")
        return cls()


def slurm_master_addr(environ: Mapping[str, str]) -> str:
    """MASTER_ADDR if set, else the first host of SLURM_JOB_NODELIST (SLURM_NODELIST)."""
    if environ.get("MASTER_ADDR"):
        return environ["MASTER_ADDR"]
    nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    if not nodelist:
        raise ValueError("Slurm rank without MASTER_ADDR or SLURM_JOB_NODELIST: cannot find the master host")
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=30, check=True).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return first_host(nodelist)


def first_host(nodelist: str) -> str:
    """First host of a Slurm node list without scontrol: "n[03-05,7],m1" -> "n03"."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise ValueError(f"cannot parse SLURM_JOB_NODELIST={nodelist!r}")
    prefix, ranges = m.group(1), m.group(2)
    return prefix if ranges is None else prefix + ranges.split(",")[0].split("-")[0]
