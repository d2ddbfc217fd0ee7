"""Two hosts (network namespaces joined by a veth pair), one `launch()` per host with --nnodes 2:
torchrun's c10d rendezvous and gloo run over the veth addresses, and parallel.selfcheck checks every
group (pp=2 puts the pp groups across the two hosts). Skips only where namespaces cannot be made."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from netns import NamespacesUnavailable, two_hosts

REPO = Path(__file__).resolve().parents[2]
HARD_LIMIT_S = 150  # outer `timeout -s KILL` per host: a lost peer must never hang CI


@pytest.fixture
def hosts():
    try:
        with two_hosts() as pair:
            yield pair
    except NamespacesUnavailable as e:
        pytest.skip(f"cannot make network namespaces here: {e}")


def launch_cmd(host, rdzv_host, is_host: bool, *selfcheck_args: str) -> list[str]:
    return ["timeout", "-s", "KILL", str(HARD_LIMIT_S), *host.argv([
        sys.executable, "-m", "moeforge.launcher.torchrun", "--nproc-per-node", "2", "--nnodes", "2",
        "--rdzv-endpoint", f"{rdzv_host.addr}:29400", "--rdzv-id", "mf-multinode", "--local-addr", host.addr,
        "--rdzv-conf", f"is_host={'true' if is_host else 'false'}", "--monitor-interval", "0.5",
        "moeforge.parallel.selfcheck", "--pp", "2", "--ep", "2", "--timeout", "60", *selfcheck_args])]


def run_both(a, b, *selfcheck_args):
    procs = []
    for h, is_host in ((a, True), (b, False)):
        env = {**os.environ, **h.env(), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen(launch_cmd(h, a, is_host, *selfcheck_args), cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate()[0] for p in procs]
    return [p.returncode for p in procs], outs


@pytest.mark.slow
@pytest.mark.timeout(HARD_LIMIT_S + 30)
def test_two_hosts_rendezvous_over_veth(hosts):
    a, b = hosts
    rcs, outs = run_both(a, b)
    for h, rc, out in zip((a, b), rcs, outs):
        assert rc == 0, f"{h.hostname} exited {rc}:\n{out}"
    lines = [m.groupdict() for out in outs for m in
             re.finditer(r"selfcheck ok rank=(?P<rank>\d+)/4 host=(?P<host>\S+) node=(?P<node>\d)", out)]
    assert sorted(int(x["rank"]) for x in lines) == [0, 1, 2, 3], outs
    by_host = {}
    for x in lines:
        by_host.setdefault(x["host"], set()).add(int(x["rank"]))
    # two ranks per host, consecutive (one node = ranks_per_node consecutive ranks), on both hosts
    assert set(by_host) == {a.hostname, b.hostname}, by_host
    assert sorted(map(sorted, by_host.values())) == [[0, 1], [2, 3]], by_host
    assert "no NVIDIA GPU; CPU/gloo" in outs[0] or "NVIDIA driver" in outs[0]  # the preflight ran


@pytest.mark.slow
@pytest.mark.timeout(HARD_LIMIT_S + 30)
def test_a_dead_rank_on_one_host_stops_both_hosts(hosts):
    """Rank 3 SIGKILLs itself mid-run: its host's agent reports it, the other host's ranks fail with
    PeerFailure, and both launches exit non-zero well before the outer SIGKILL."""
    a, b = hosts
    rcs, outs = run_both(a, b, "--rounds", "3", "--die-rank", "3", "--die-after", "2")
    assert all(rc not in (0, -9, 137) for rc in rcs), (rcs, outs)
    victim = next(i for i, out in enumerate(outs) if "SIGKILL myself" in out)
    other = outs[1 - victim]
    assert re.search(r"rank\s+: 3 \(local_rank: 1\)\s+exitcode\s+: -9", outs[victim]), outs[victim]
    # the other host's ranks either raise PeerFailure themselves or are stopped by their agent once the
    # rendezvous learns of the failure (a race); either way its launch fails with torchrun's summary
    assert "PeerFailure" in other or "ChildFailedError" in other, other


@pytest.mark.slow
@pytest.mark.timeout(HARD_LIMIT_S + 30)
def test_two_hosts_train_five_steps(hosts, stdlib_data, tmp_path):
    """`moeforge launch --nnodes 2` on each host trains the tiny model 5 steps over the veth link,
    data parallel with experts sharded across the hosts (ep=4: one expert pair per rank)."""
    a, b = hosts
    procs = []
    for h, is_host in ((a, True), (b, False)):
        cmd = ["timeout", "-s", "KILL", str(HARD_LIMIT_S), *h.argv([
            sys.executable, "-m", "moeforge.launcher.cli", "launch", "--nproc-per-node", "2", "--nnodes", "2",
            "--rdzv-endpoint", f"{a.addr}:29401", "--rdzv-id", "mf-train", "--local-addr", h.addr,
            "--rdzv-conf", f"is_host={'true' if is_host else 'false'}", "--monitor-interval", "0.5",
            f"data.dir={stdlib_data}", f"run_dir={tmp_path}", "train.steps=5", "train.seq_len=32",
            "train.global_batch_size=8", "train.micro_batch_size=2", "train.eval_interval=5",
            "train.sample_tokens=0", "logging.progress=false", "parallel.ep=4", "parallel.timeout_s=60"])]
        env = {**os.environ, **h.env(), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outs = [p.communicate()[0] for p in procs]
    for h, p, out in zip((a, b), procs, outs):
        assert p.returncode == 0, f"{h.hostname} exited {p.returncode}:\n{out[-4000:]}"
    import json

    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert records[-1]["ep/dispatch_fwd_inter_bytes"] > 0  # tokens crossed the veth link
