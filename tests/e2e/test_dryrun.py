"""The fake-CUDA dry run (train/dryrun.py): one rank of a layout runs real optimizer steps on a fake GPU.

Each case runs `moeforge dryrun` as a user would (its own process: the fake CUDA library loads before
torch). They fail on a host tensor reaching a device group (HostTensorOnDeviceGroup), on an op whose
shape depends on values (a hidden host sync), on a cross-stream use without an event or record_stream
(comm/fake_streams.py), and when a step makes more host syncs than its layout's budget (README).
"""
import re
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.timeout(600)

# (args, host syncs per step at most): the budget the README states, per layout. Each is what the layout
# needs: one routing-count read per all-to-all hop (per MoE layer and micro-batch), one read of the step's
# losses and grad norm, one of the MoE statistics, the step timer's event sync and, with a pipeline, the
# bubble timer's.
LAYOUTS = {
    "one-rank": (["--world-size", "1", "--steps", "1"], 11),  # 2 micro-batches x 4 MoE layers + 3
    # recompute (model/recompute.py) reads nothing from the host, nor does the EMA's copy into pinned memory
    # (train/ema.py): the same budget as without
    "one-rank-selective-recompute-ema": (["--world-size", "1", "--steps", "1", "train.recompute=selective",
                                          "train.ema_decay=0.999"], 11),
    "cpu4-rank0": (["--world-size", "4", "experiment=cpu4"], 8),
    "pp2-ep4-two-hop-fp8-rank5": (["--world-size", "8", "--rank", "5", "parallel.pp=2", "parallel.ep=4",
                                   "parallel.ranks_per_node=2", "parallel.two_hop=true", "schedule=1f1b",
                                   "parallel.fp8_dispatch=true", "fp8=blockwise", "--steps", "1"], 12),
    "671b-report-layout-rank2047": (["model=671b", "parallel.pp=16", "parallel.ep=64", "cluster.gpu=h800",
                                     "cluster.nodes=256", "schedule=dualpipev", "train.seq_len=4096",
                                     "train.global_batch_size=4096", "train.micro_batch_size=1", "--rank", "2047",
                                     "--steps", "1"], 132),  # 32 micro-batches x 4 MoE layers + 4
}

def dryrun(*args: str, timeout: float = 540) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moeforge.launcher.cli", "dryrun", *args], capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_dryrun_layout(name):
    args, budget = LAYOUTS[name]
    out = dryrun(*args, "--max-syncs", str(budget), "--plan")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    text = out.stdout
    syncs = int(re.search(r"host syncs per step: (\d+)", text).group(1))
    assert 0 < syncs <= budget, text
    assert "plan: pp rank" in text, text
    mem = {k.strip(): float(v) for k, v in re.findall(r"^    ([a-z][a-z ]+?)\s+([\d.]+)", text, re.M)}
    for key in ("parameters", "optimizer state", "activations", "total"):  # gradients: 0 if the peak is
        assert mem.get(key, 0) > 0, (key, text)                             # before the first backward
    assert "gradients" in mem, text
    assert re.search(r"routing_counts|comm/|model/moe.py", text), text  # the dispatch's one read is attributed


def test_host_tensor_on_a_device_group_fails_naming_the_call_site(tmp_path):
    """What the dry run stops: today's NCCL groups reject a CPU tensor; the fake backend would not."""
    script = tmp_path / "host_tensor.py"
    script.write_text(textwrap.dedent("""
        from moeforge.launcher.dryrun import preload
        preload()
        import torch, torch.distributed as dist
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.testing._internal.distributed.fake_pg import FakeStore
        from moeforge.train.dryrun import DryRunMode, HostSyncs, HostTensorOnDeviceGroup
        from moeforge.train.dryrun import init_fake_process_group
        init_fake_process_group(1, 4)
        with FakeTensorMode(allow_non_fake_inputs=True), DryRunMode(HostSyncs()):
            dist.all_reduce(torch.ones(3, device="cuda"))  # a device tensor: fine
            try:
                dist.all_reduce(torch.tensor([1.0, 2.0]))  # what train/reduce.py did before issue 18
            except HostTensorOnDeviceGroup as e:
                print("REJECTED", e)
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert "REJECTED" in out.stdout and "allreduce_ got a cpu tensor" in out.stdout, out.stdout + out.stderr[-3000:]


def test_bad_rank_is_refused_before_anything_runs():
    out = dryrun("--world-size", "4", "--rank", "4", "experiment=cpu4", timeout=300)
    assert out.returncode != 0 and "--rank 4 not in [0, 4)" in out.stderr
