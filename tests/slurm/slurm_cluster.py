"""A real Slurm on this machine: munged, slurmctld and two slurmd on localhost acting as nodes n1, n2.

    with SlurmCluster.start(tmp_dir) as c:          # raises SlurmUnavailable (tests skip) where it cannot
        job = c.sbatch(["script.sh"]); c.wait_state(job, {"COMPLETED"})

Everything lives under one temp dir: the munge key and socket, slurm.conf, state, spool, logs, pid
files. Ports are picked free at start. Daemons run in the foreground as our children (`-D`/`-F`), so
they are stopped by PID. Clients (sbatch, scontrol, ...) find this cluster through SLURM_CONF, which
`env` sets; jobs inherit it (sbatch exports the submitting environment). Each node is `CPUs=1`, no
accounting daemon (`accounting_storage/none`, `jobcomp/filetxt`), `proctrack/linuxproc`, `task/none`.
Teardown cancels the jobs, stops the daemons and SIGKILLs any process left that carries this
cluster's marker variable in its environment (slurmstepd inherits it from slurmd, job processes from
sbatch): nothing of ours outlives the fixture, and nothing else is touched.

`python tests/slurm/slurm_cluster.py DIR` starts one and prints the `export SLURM_CONF=...` line
(Ctrl-C stops it): handy for poking at it by hand.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "sinfo", "scancel")
NODES = ("n1", "n2")
RELEASE_AFTER_S = 5
MARKER = "MOEFORGE_TEST_SLURM"  # set in the daemons' and clients' environment; value: the cluster dir


class SlurmUnavailable(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SLURM_CONF = """\
ClusterName=moeforge-test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={d}/munge/munge.socket
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd-%n.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={d}/log/jobcomp.txt
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
KillWait=10
InactiveLimit=0
MinJobAge=600
SlurmdTimeout=60
PlugStackConfig={d}/plugstack.conf
{nodes}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


class SlurmCluster:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.conf = self.root / "slurm.conf"
        self.procs: dict[str, subprocess.Popen] = {}
        self.holds: list[str] = []  # EligibleTime of each requeued job as Slurm set it
        self.env = {**os.environ, "SLURM_CONF": str(self.conf), MARKER: str(self.root)}
        for k in [k for k in self.env if k.startswith(("SLURM_", "SBATCH_", "SRUN_")) and k != "SLURM_CONF"]:
            del self.env[k]  # a test run inside a Slurm job must not leak that job into ours

    # ---- start / stop ----

    @classmethod
    def start(cls, root: Path, timeout_s: float = 30) -> "SlurmCluster":
        missing = [b for b in DAEMONS if shutil.which(b) is None]
        if missing:
            raise SlurmUnavailable(f"not installed: {', '.join(missing)} (apt-get install slurm-wlm munge)")
        if os.geteuid() != 0:
            raise SlurmUnavailable("slurmd must run as root to start jobs (this test runs as uid "
                                   f"{os.geteuid()})")
        c = cls(root)
        try:
            c._start(timeout_s)
        except BaseException:
            c.stop()
            raise
        return c

    def _start(self, timeout_s: float) -> None:
        d = self.root
        for sub in ("state", "log", "spool/n1", "spool/n2", "munge"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o755)  # munged wants its socket's directory reachable by everyone (not writable)
        (d / "munge").chmod(0o755)
        key = d / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        (d / "plugstack.conf").write_text("")
        ports = [free_port() for _ in range(1 + len(NODES))]
        nodes = "\n".join(f"NodeName={n} NodeHostname=localhost NodeAddr=127.0.0.1 Port={p} CPUs=1 State=UNKNOWN"
                          for n, p in zip(NODES, ports[1:]))
        self.conf.write_text(SLURM_CONF.format(d=d, ctld_port=ports[0], nodes=nodes))

        self._spawn("munged", ["munged", "-F", "--force", f"--socket={d}/munge/munge.socket",
                               f"--key-file={key}", f"--pid-file={d}/munged.pid", f"--log-file={d}/log/munged.log",
                               f"--seed-file={d}/munged.seed"])
        self._wait(lambda: (d / "munge/munge.socket").exists(), timeout_s, "munged socket")
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        self._wait(lambda: self._ping(), timeout_s, "slurmctld to answer `scontrol ping`")
        for n in NODES:
            self._spawn(f"slurmd-{n}", ["slurmd", "-D", "-N", n, "-f", str(self.conf)])
        self._wait(self._nodes_idle, timeout_s, "both nodes idle")

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.stderr", "ab")
        self.procs[name] = subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()

    def _wait(self, ok, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise SlurmUnavailable(f"{name} exited with {p.returncode} while waiting for {what}:\n"
                                           f"{self.logs(name)}")
            if ok():
                return
            time.sleep(0.2)
        raise SlurmUnavailable(f"timed out after {timeout_s:g}s waiting for {what}:\n{self.logs()}")

    def _ping(self) -> bool:
        p = self.run(["scontrol", "ping"], check=False)
        return p.returncode == 0 and "UP" in p.stdout

    def _nodes_idle(self) -> bool:
        p = self.run(["sinfo", "-h", "-N", "-o", "%N %T"], check=False)
        states = dict(line.split() for line in p.stdout.splitlines() if line.strip())
        return all(states.get(n, "").rstrip("*") == "idle" for n in NODES)

    def stop(self) -> None:
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.run(["scancel", "--full", "--quiet", "--user", "root"], check=False)  # every job of this cluster
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and self.jobs_alive():
                time.sleep(0.3)
        for name in reversed(list(self.procs)):
            p = self.procs[name]
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        for pid in marked_pids(str(self.root)):  # slurmstepd and job processes that outlived their daemon
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def __enter__(self) -> "SlurmCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- clients ----

    def version(self) -> str:
        p = self.run(["sinfo", "--version"], check=False)
        return p.stdout.strip() or "slurm (version unknown)"

    def run(self, argv: list[str], check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        p = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and p.returncode:
            raise RuntimeError(f"{' '.join(argv)} exited {p.returncode}:\n{p.stdout}{p.stderr}")
        return p

    def jobs_alive(self) -> list[str]:
        p = self.run(["squeue", "-h", "-o", "%i %T"], check=False)
        return [line.split()[0] for line in p.stdout.splitlines() if line.strip()]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job -o` as a dict (JobState, RestartCnt, ExitCode, Reason, ...); {} once forgotten."""
        p = self.run(["scontrol", "show", "job", "-o", str(job_id)], check=False)
        return dict(re.findall(r"(\w+)=(\S*)", p.stdout)) if p.returncode == 0 else {}

    def wait_state(self, job_id: str, states: set[str], timeout_s: float, release: bool = True) -> dict:
        """Poll until the job is in one of `states`. Slurm holds a requeued job back (Reason=BeginTime,
        EligibleTime about 2 minutes on); with release=True it is made eligible RELEASE_AFTER_S seconds
        into the hold. Not at once: the nodes revoke the old run's credential when it is requeued, and
        a restart within the same second is refused for good ("Job credential revoked": FAILED)."""
        deadline = time.monotonic() + timeout_s
        info: dict = {}
        held_since = None
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            if release and info.get("JobState") == "PENDING" and info.get("Reason") == "BeginTime":
                if held_since is None:
                    held_since = time.monotonic()
                    self.holds.append(info.get("EligibleTime", "?"))
                elif time.monotonic() - held_since >= RELEASE_AFTER_S:
                    self.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=False)
                    held_since = None
            time.sleep(0.3)
        raise TimeoutError(f"job {job_id} not in {sorted(states)} after {timeout_s:g}s: {info}\n{self.logs()}")

    def logs(self, *names: str, tail: int = 3000) -> str:
        out = []
        for f in sorted((self.root / "log").glob("*")):
            if names and not any(n in f.name for n in names):
                continue
            try:
                text = f.read_text(errors="replace")
            except OSError:
                continue
            out.append(f"---- {f.name} ----\n{text[-tail:]}")
        return "\n".join(out)


def marked_pids(root: str) -> list[int]:
    """PIDs whose environment carries MARKER=root (not our own process)."""
    want = f"{MARKER}={root}".encode()
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            with open(f"/proc/{d}/environ", "rb") as f:
                if want in f.read().split(b"\0"):
                    pids.append(int(d))
        except OSError:
            pass
    return pids


if __name__ == "__main__":
    import sys

    root = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/moeforge-slurm").resolve()
    root.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # `kill PID` stops the cluster too
    with SlurmCluster.start(root) as c:
        print(f"export SLURM_CONF={c.conf} {MARKER}={root}", flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
