"""launcher/slurm.py without Slurm: the rendered sbatch script, run by bash with fake `srun` and
`scontrol` on PATH that record what they are given.

- Hostile values (spaces, quotes, `$(...)`, backticks, `;`, `&`, newlines in overrides) reach srun
  as exactly the argv they were, and nothing they contain runs.
- torchrun's part of that argv parses with torch.distributed.run's own parser: c10d at the head
  node's NodeAddr, the job id as rendezvous id, --signals-to-handle, --shutdown-timeout = the grace.
- The requeue rules: done -> exit 0; USR1 -> forwarded to srun, then `scontrol requeue`; TERM -> no
  requeue; failures requeue until --max-failures; nothing requeues past --max-requeues.
- #SBATCH values: quoted so Slurm's directive parser and a shell read the same string; line breaks
  and backslashes refused. A duplicate preemption signal (Slurm's echo) does not kill a rank.
"""
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from torch.distributed.run import get_args_parser

from moeforge.launcher.slurm import SlurmJob, parse_show_job, render, sbatch_quote, torchrun_argv, train_overrides

HOSTILE = ["model=tiny", "run_dir=/tmp/a b", "x=$(touch {m}/p1)", "y=`touch {m}/p2`", "z=1; touch {m}/p3",
           "q=it's \"quoted\"", "n=line1\nline2", "amp=a & touch {m}/p4 | cat > {m}/p5", "d=$HOME ${{PATH}}",
           "glob=*", "bang=!1"]

FAKE_SRUN = """#!/bin/bash
{python} -c 'import json, sys; json.dump(sys.argv[1:], open("{calls}/srun.json", "w"))' "$@"
case "${{FAKE_SRUN:-ok}}" in
  ok) exit 0 ;;
  fail) exit 3 ;;
  wait-usr1)
    trap 'echo USR1 >> {calls}/srun.signals; exit 143' USR1
    touch {calls}/srun.started
    for i in $(seq 300); do sleep 0.1; done; exit 9 ;;
esac
"""
FAKE_SCONTROL = """#!/bin/bash
echo "$*" >> {calls}/scontrol.calls
case "$1 $2" in
  "show hostnames") echo n7; echo n8 ;;
  "show node") echo "NodeName=$3 Arch=x86_64"; echo "   NodeAddr=10.9.8.7 NodeHostName=$3 Version=22.05" ;;
esac
"""


@pytest.fixture
def fake(tmp_path):
    calls = tmp_path / "calls"
    bin_ = tmp_path / "bin"
    marks = tmp_path / "marks"
    for d in (calls, bin_, marks):
        d.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_ / name).write_text(text.format(calls=calls, python=sys.executable))
        (bin_ / name).chmod(0o755)
    return tmp_path


def make_job(fake, **kw) -> SlurmJob:
    m = fake / "marks"
    overrides = tuple(o.format(m=m) for o in HOSTILE)
    kw.setdefault("overrides", overrides)
    return SlurmJob(nodes=2, run_dir=str(fake / "run dir $(touch x)"), workdir=str(fake), python="/opt/py/bin/python",
                    **kw)


def start(fake, job: SlurmJob, restart_count: int = 0, srun: str = "ok") -> subprocess.Popen:
    script = fake / "job.sbatch"
    script.write_text(render(job))
    Path(job.slurm_dir).mkdir(parents=True, exist_ok=True)
    env = {"PATH": f"{fake / 'bin'}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "n[7-8]",
           "SLURM_RESTART_COUNT": str(restart_count), "FAKE_SRUN": srun, "HOME": str(fake)}
    return subprocess.Popen(["bash", str(script)], env=env, cwd=fake, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def run(fake, job, **kw) -> tuple[int, str]:
    p = start(fake, job, **kw)
    out = p.communicate(timeout=60)[0]
    return p.returncode, out


def scontrol_calls(fake) -> list[str]:
    f = fake / "calls" / "scontrol.calls"
    return f.read_text().splitlines() if f.exists() else []


def test_hostile_overrides_reach_srun_verbatim_and_run_nothing(fake):
    job = make_job(fake)
    rc, out = run(fake, job)
    assert rc == 0, out
    argv = json.loads((fake / "calls" / "srun.json").read_text())
    assert argv == ["--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
                    "/opt/py/bin/python", "-m", "torch.distributed.run",
                    *[{"\0rdzv_endpoint": "10.9.8.7:24242", "\0rdzv_id": "4242"}.get(a, a) for a in torchrun_argv(job)]]
    assert argv[-len(HOSTILE) - 1:-1] == list(job.overrides)  # then the grace override the script adds
    assert argv[-1] == f"checkpoint.preempt_grace_s={job.signal_grace_s}"
    assert list((fake / "marks").iterdir()) == []
    assert not (fake / "x").exists()
    assert "SLURM_RESTART_COUNT=0" in out and "rendezvous c10d at 10.9.8.7:24242 (n7)" in out, out
    assert scontrol_calls(fake) == ["show hostnames n[7-8]", "show node n7"]  # no requeue: it finished


def test_torchrun_part_parses_with_torchs_own_parser(fake):
    job = make_job(fake, gpus_per_node=8, signal_grace_s=90, overrides=("model=16b",))
    argv = [{"\0rdzv_endpoint": "n1:20001", "\0rdzv_id": "1"}.get(a, a) for a in torchrun_argv(job)]
    ns = get_args_parser().parse_args(argv)
    assert (ns.nproc_per_node, ns.nnodes, ns.rdzv_backend, ns.rdzv_endpoint, ns.rdzv_id) == ("8", "2", "c10d",
                                                                                            "n1:20001", "1")
    assert ns.max_restarts == 0 and ns.module and ns.training_script == "moeforge.launcher.cli"
    assert ns.training_script_args == ["train", "model=16b", "checkpoint.preempt_grace_s=90"]
    if hasattr(ns, "signals_to_handle"):
        assert "SIGUSR1" in ns.signals_to_handle
    if hasattr(ns, "shutdown_timeout"):
        assert int(ns.shutdown_timeout) == 90


def test_user_grace_override_is_kept():
    job = SlurmJob(overrides=("checkpoint.preempt_grace_s=7",))
    assert train_overrides(job) == ["checkpoint.preempt_grace_s=7"]


def test_directives():
    job = SlurmJob(nodes=4, gpus_per_node=8, partition="hopper", time="1-00:00:00", job_name="my job's",
                   account="acct", cpus_per_task=96, signal_grace_s=180, run_dir="/runs/a%b c",
                   sbatch_options=("--mem=0", "--comment=x y"))
    lines = [line[len("#SBATCH "):] for line in render(job).splitlines() if line.startswith("#SBATCH ")]
    assert lines == ["--job-name='my job'\"'\"'s'", "--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=8",
                     "--cpus-per-task=96", "--partition=hopper", "--time=1-00:00:00", "--account=acct",
                     "--output='/runs/a%%b c/slurm/slurm-%j.out'", "--open-mode=append", "--requeue",
                     "--signal=B:USR1@180", "--mem=0", "'--comment=x y'"]
    # what a shell reads back is the value (Slurm's directive parser reads '...' and "..." the same way)
    assert shlex.split(lines[0]) == ["--job-name=my job's"]
    assert "#SBATCH --gpus-per-node" not in render(SlurmJob())  # CPU nodes: no GPU request


@pytest.mark.parametrize("kw,match", [
    ({"job_name": "a\nsrun evil"}, "line break or backslash"),
    ({"partition": "p\\"}, "line break or backslash"),
    ({"run_dir": "/r\n#SBATCH --x"}, "line break or backslash"),
    ({"sbatch_options": ("mem=0",)}, "must be an sbatch option"),
    ({"time": "24h"}, "not a Slurm time"),
    ({"nodes": 0}, "--nodes"),
    ({"max_failures": 0}, "--max-failures"),
])
def test_bad_values_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        SlurmJob(**kw)


@pytest.mark.parametrize("value", ["plain", "a b", "it's", 'say "hi"', "$(x) `y` ;z &", "%j", "#1"])
def test_sbatch_quote_reads_back(value):
    assert shlex.split(sbatch_quote(value)) == [value]


def test_usr1_is_forwarded_then_the_job_requeues_itself(fake):
    p = start(fake, make_job(fake), srun="wait-usr1")
    deadline = time.monotonic() + 30
    while not (fake / "calls" / "srun.started").exists():
        assert p.poll() is None and time.monotonic() < deadline, p.communicate()[0]
        time.sleep(0.05)
    p.send_signal(signal.SIGUSR1)
    out = p.communicate(timeout=30)[0]
    assert (fake / "calls" / "srun.signals").read_text().split() == ["USR1"], out
    assert p.returncode == 75, out
    assert scontrol_calls(fake)[-1] == "requeue 4242", out
    assert "SLURM_RESTART_COUNT will be 1" in out


def test_term_is_forwarded_but_slurm_decides(fake):
    p = start(fake, make_job(fake), srun="wait-usr1")
    deadline = time.monotonic() + 30
    while not (fake / "calls" / "srun.started").exists():
        assert p.poll() is None and time.monotonic() < deadline, p.communicate()[0]
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    out = p.communicate(timeout=30)[0]
    assert (fake / "calls" / "srun.signals").read_text().split() == ["USR1"], out
    assert "not requeueing: Slurm ended this job" in out and p.returncode == 143, out
    assert not any(c.startswith("requeue") for c in scontrol_calls(fake))


def test_failures_requeue_until_max_failures(fake):
    job = make_job(fake, max_failures=2)
    rc, out = run(fake, job, srun="fail")
    assert rc == 75 and scontrol_calls(fake)[-1] == "requeue 4242" and "failure 1 of 2" in out, out
    rc, out = run(fake, job, restart_count=1, srun="fail")
    assert rc == 3 and "failed 2 time(s) (max_failures=2): not requeueing" in out, out
    assert scontrol_calls(fake).count("requeue 4242") == 1
    assert (Path(job.slurm_dir) / "failures-4242").read_text().strip() == "2"


def test_no_requeue_past_max_requeues(fake):
    job = make_job(fake, max_requeues=2, max_failures=10)
    rc, out = run(fake, job, restart_count=2, srun="fail")
    assert rc == 3 and "max_requeues=2" in out and "requeue 4242" not in scontrol_calls(fake), out


def test_dry_run_prints_the_script_and_checks_the_layout(capsys, tmp_path, monkeypatch):
    from moeforge.launcher.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["slurm", "submit", "--dry-run", "--nodes", "2", "--gpus-per-node", "8", "--partition", "P",
                 "--time", "24:00:00", "model=tiny", "parallel.ep=2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("#!/bin/bash\n") and "#SBATCH --partition=P\n" in out and "#SBATCH --nodes=2\n" in out
    assert f"--output={tmp_path}/outputs/tiny/slurm/slurm-%j.out" in out
    assert not (tmp_path / "outputs").exists()  # a dry run writes nothing
    # 16 ranks cannot split the tiny model's 8 experts 3 ways: refused before anything is queued
    assert main(["slurm", "submit", "--dry-run", "--nodes", "2", "--gpus-per-node", "8", "model=tiny",
                 "parallel.ep=3"]) == 2
    assert "ep" in capsys.readouterr().err
    # and the batch split: 16 sequences over dp 16 in micro-batches of 8 do not divide
    assert main(["slurm", "submit", "--dry-run", "--nodes", "2", "--gpus-per-node", "8", "model=tiny",
                 "train.micro_batch_size=8"]) == 2
    assert "train.micro_batch_size" in capsys.readouterr().err


def test_a_relayed_copy_of_the_signal_does_not_kill_the_rank():
    """Under Slurm each rank gets the notice twice (slurmstepd signals the whole step; torchrun's agent
    forwards its copy): the second, within DUPLICATE_WINDOW_S, is ignored instead of killing the rank."""
    code = ("import os, signal, time\n"
            "from moeforge.train.preempt import PreemptionWatcher\n"
            "w = PreemptionWatcher([signal.SIGUSR1], 5).install()\n"
            "os.kill(os.getpid(), signal.SIGUSR1); os.kill(os.getpid(), signal.SIGUSR1)\n"
            "time.sleep(0.1)\n"
            "print('alive', w.agreed())\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       cwd=Path(__file__).resolve().parents[2])
    assert p.returncode == 0 and "alive True" in p.stdout, p.stdout + p.stderr


SHOW_JOB = """JobId=7 JobName=mf $(x) 'q' #1
   UserId=root(0) GroupId=root(0) MCS_label=N/A
   JobState=RUNNING Reason=None Dependency=(null)
   Requeue=1 Restarts=2 BatchFlag=1 Reboot=0 ExitCode=0:0
   NodeList=n[1-2]
   Command=/runs/a b/slurm/submit.sbatch
   StdOut=/runs/a b/slurm/slurm-7.out
"""


def test_parse_show_job_keeps_spaces_in_names_and_paths():
    info = parse_show_job(SHOW_JOB)
    assert info["JobName"] == "mf $(x) 'q' #1" and info["JobState"] == "RUNNING" and info["Restarts"] == "2"
    assert info["StdOut"] == "/runs/a b/slurm/slurm-7.out" and info["NodeList"] == "n[1-2]"


def test_cancel_takes_the_newest_job_of_a_run_dir(fake, monkeypatch, capsys):
    from moeforge.launcher.cli import main

    (fake / "bin" / "scancel").write_text(f"#!/bin/bash\necho \"$*\" >> {fake}/calls/scancel.calls\n")
    (fake / "bin" / "scancel").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake / 'bin'}:{os.environ['PATH']}")
    run_dir = fake / "run"
    (run_dir / "slurm").mkdir(parents=True)
    (run_dir / "slurm" / "jobs").write_text("11\n12\n")
    assert main(["slurm", "cancel", str(run_dir)]) == 0
    assert main(["slurm", "cancel", "99"]) == 0
    assert (fake / "calls" / "scancel.calls").read_text().split() == ["12", "99"]
