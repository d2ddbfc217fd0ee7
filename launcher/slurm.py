"""`moeforge slurm submit`: an sbatch script that runs one torchrun per node and survives preemption.

    job = SlurmJob(nodes=2, gpus_per_node=8, partition="P", time="24:00:00", overrides=("model=16b",), ...)
    text = render(job)            # pure: the script, testable without Slurm
    job_id = submit(job)          # the only side effect: write RUN_DIR/slurm/submit.sbatch, run sbatch

What the script does, in order:
1. `#SBATCH --requeue --signal=B:USR1@<grace> --open-mode=append`: Slurm sends USR1 to the batch shell
   `grace` seconds before the time limit; every attempt appends to the same RUN_DIR/slurm/slurm-<id>.out.
2. Logs the job id, node list and SLURM_RESTART_COUNT (0 first, N after N requeues).
3. Rendezvous host: the first node of `scontrol show hostnames $SLURM_JOB_NODELIST`, at the address
   Slurm itself uses for it (its NodeAddr, which is the hostname unless the admin set one); port
   20000 + SLURM_JOB_ID % 10000 unless --rdzv-port is given; rendezvous id = the job id.
4. `srun --ntasks-per-node=1 python -m torch.distributed.run ... -m moeforge.launcher.cli train OVERRIDES` in the
   background, with torchrun's argv built by launcher/torchrun.py (c10d, --signals-to-handle,
   --shutdown-timeout <grace> where the installed torch has them).
5. Signals. USR1 (the time-limit notice, or `scancel --batch --signal=USR1 JOB`) means "checkpoint and
   come back": the trap forwards USR1 to srun, which relays it to every task; slurmstepd signals each
   task's whole process tree and torchrun's agent forwards its copy too, so every rank sees it
   (train/preempt.py ignores the echo), all ranks finish the step, save it and exit 75. TERM to the
   batch shell means Slurm itself is ending the job (scancel, the hard time limit, `scontrol requeue`,
   preemption): srun turns its own TERM into SIGKILL of the tasks ("forcing job termination"), so no
   save can be promised; the trap still forwards USR1 and the script does not requeue; whatever
   Slurm decides (cancel or its own requeue) stands, and a requeued job resumes from the newest
   interval checkpoint (checkpoint.interval).
6. After srun: exit 0 when training finished. After USR1, `scontrol requeue $SLURM_JOB_ID` (at most
   --max-requeues times: SLURM_RESTART_COUNT counts them). A failure without a signal is counted in
   RUN_DIR/slurm/failures-<id>; it requeues until --max-failures failures, then the job ends with the
   step's exit code. The requeued job runs the same script: training resumes from the newest whole
   checkpoint on its own (checkpoint.resume=auto).

Everything the user types reaches the script quoted: shell words with shlex.quote, #SBATCH values
quoted for Slurm's own directive parser (which knows '...' and "..." but treats a backslash as an
escape, so backslashes and line breaks are refused there). The only unquoted expansions in the script
are variables the script itself sets or Slurm sets.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .torchrun import LaunchOptions, build_torchrun_argv, torchrun_flags

SCRIPT_NAME = "submit.sbatch"
# placeholders for values only the running job knows; rendered as "$var" expansions, never quoted away
_RDZV_ENDPOINT = "\0rdzv_endpoint"
_RDZV_ID = "\0rdzv_id"
_SHELL_VALUES = {_RDZV_ENDPOINT: '"$head_addr:$rdzv_port"', _RDZV_ID: '"$SLURM_JOB_ID"'}
_TIME = re.compile(r"(\d+-)?\d+(:\d+){0,2}|UNLIMITED|INFINITE")


@dataclass(frozen=True)
class SlurmJob:
    nodes: int = 1
    gpus_per_node: int = 0  # 0: no --gpus-per-node (CPU nodes)
    nproc_per_node: int | None = None  # None: gpus_per_node, or 1 without GPUs
    partition: str | None = None
    time: str | None = None  # sbatch --time, e.g. 24:00:00 or 2-00:00:00
    job_name: str = "moeforge"
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    cpus_per_task: int | None = None
    signal_grace_s: int = 120  # USR1 this many seconds before the time limit; also torchrun's --shutdown-timeout
    max_requeues: int = 50  # the script stops requeueing once SLURM_RESTART_COUNT reaches this
    max_failures: int = 3  # attempts that fail without a preemption signal before the job gives up
    rdzv_port: int | None = None  # None: 20000 + SLURM_JOB_ID % 10000
    sbatch_options: tuple[str, ...] = ()  # more #SBATCH lines, verbatim options such as "--mem=0"
    overrides: tuple[str, ...] = ()  # hydra overrides for `moeforge train`
    run_dir: str = "outputs/tiny"  # absolute in practice: the script and the logs go to RUN_DIR/slurm
    workdir: str = "."  # the script cd's here before starting (relative run_dirs resolve against it)
    python: str = sys.executable

    def __post_init__(self):
        def need(ok, msg):
            if not ok:
                raise ValueError(f"slurm: {msg}")

        need(self.nodes >= 1, f"--nodes must be >= 1, got {self.nodes}")
        need(self.gpus_per_node >= 0, f"--gpus-per-node must be >= 0, got {self.gpus_per_node}")
        need(self.nproc_per_node is None or self.nproc_per_node >= 1,
             f"--nproc-per-node must be >= 1, got {self.nproc_per_node}")
        need(self.signal_grace_s >= 1, f"--signal-grace must be >= 1 s, got {self.signal_grace_s}")
        need(self.max_requeues >= 0 and self.max_failures >= 1,
             f"--max-requeues must be >= 0 and --max-failures >= 1, got {self.max_requeues}, {self.max_failures}")
        need(self.time is None or _TIME.fullmatch(self.time) is not None,
             f"--time {self.time!r}: not a Slurm time (MM, MM:SS, HH:MM:SS, D-HH[:MM[:SS]], UNLIMITED)")
        need(self.cpus_per_task is None or self.cpus_per_task >= 1, f"--cpus-per-task must be >= 1, got {self.cpus_per_task}")
        need(self.rdzv_port is None or 0 < self.rdzv_port < 65536, f"--rdzv-port {self.rdzv_port} out of range")
        for name in ("partition", "job_name", "account", "qos", "constraint", "run_dir"):
            _check_directive_value(name, getattr(self, name))
        for opt in self.sbatch_options:
            _check_directive_value("sbatch option", opt)
            need(opt.startswith("-"), f"--sbatch-option {opt!r} must be an sbatch option such as --mem=0")

    @property
    def procs_per_node(self) -> int:
        return self.nproc_per_node or self.gpus_per_node or 1

    @property
    def slurm_dir(self) -> str:
        return os.path.join(self.run_dir, "slurm")


def _check_directive_value(name: str, value: str | None) -> None:
    if value is not None and (not value or any(c in value for c in "\n\r\0\\")):
        raise ValueError(f"slurm: {name} {value!r}: empty, or has a line break or backslash, which an "
                         "#SBATCH line cannot carry")


def sbatch_quote(value: str) -> str:
    """Quote one #SBATCH value for Slurm's directive parser: plain words stay as they are, anything else
    goes in '...' (a ' inside as '"'"'), which Slurm's parser and a shell both read back as the value."""
    if re.fullmatch(r"[A-Za-z0-9_.,:@+=/%-]+", value):
        return value
    return shlex.quote(value)


def _shell_word(arg: str) -> str:
    return _SHELL_VALUES.get(arg) or shlex.quote(arg)


def torchrun_argv(job: SlurmJob) -> list[str]:
    """torchrun's argv for one node (placeholders for the head address and the job id)."""
    extra = ()
    if "--shutdown-timeout" in torchrun_flags():
        extra = ("--shutdown-timeout", str(job.signal_grace_s))
    opts = LaunchOptions(nproc_per_node=str(job.procs_per_node), nnodes=str(job.nodes),
                         rdzv_endpoint=_RDZV_ENDPOINT, rdzv_id=_RDZV_ID, max_restarts=0, extra=extra)
    return build_torchrun_argv(opts, "moeforge.launcher.cli", ["train", *train_overrides(job)])


def train_overrides(job: SlurmJob) -> list[str]:
    """The user's overrides, plus checkpoint.preempt_grace_s = the Slurm grace unless they set it."""
    extra = [] if any("preempt_grace_s=" in o for o in job.overrides) else \
        [f"checkpoint.preempt_grace_s={job.signal_grace_s}"]
    return [*job.overrides, *extra]


def _lines(argv: list[str]) -> list[list[str]]:
    """torchrun's argv as script lines: one option (with its value) per line, `-m MODULE train` on one,
    then one override per line."""
    m = argv.index("-m")
    lines: list[list[str]] = []
    for a in argv[:m]:
        if a.startswith("--") or not lines:
            lines.append([a])
        else:
            lines[-1].append(a)
    return lines + [argv[m:m + 3]] + [[a] for a in argv[m + 3:]]


def render(job: SlurmJob) -> str:
    """The sbatch script for `job` (pure)."""
    directives = [f"--job-name={sbatch_quote(job.job_name)}", f"--nodes={job.nodes}", "--ntasks-per-node=1"]
    if job.gpus_per_node:
        directives.append(f"--gpus-per-node={job.gpus_per_node}")
    if job.cpus_per_task:
        directives.append(f"--cpus-per-task={job.cpus_per_task}")
    for flag, value in (("partition", job.partition), ("time", job.time), ("account", job.account),
                        ("qos", job.qos), ("constraint", job.constraint)):
        if value is not None:
            directives.append(f"--{flag}={sbatch_quote(value)}")
    out_path = os.path.join(job.slurm_dir.replace("%", "%%"), "slurm-%j.out")  # %j: the job id
    directives += [f"--output={sbatch_quote(out_path)}", "--open-mode=append", "--requeue",
                   f"--signal=B:USR1@{job.signal_grace_s}"]
    directives += [sbatch_quote(o) for o in job.sbatch_options]
    rdzv_port = str(job.rdzv_port) if job.rdzv_port else "$((20000 + SLURM_JOB_ID % 10000))"
    srun = ["srun", f"--nodes={job.nodes}", f"--ntasks={job.nodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    command = " \\\n    ".join(" ".join(_shell_word(a) for a in line) for line in
                                  [srun, [job.python, "-m", "torch.distributed.run"], *_lines(torchrun_argv(job))])
    q = shlex.quote
    return f"""#!/bin/bash
# Written by `moeforge slurm submit` (launcher/slurm.py; docs/slurm.md). Every value below that came from
# the command line is quoted; the only expansions are variables this script or Slurm sets.
{chr(10).join('#SBATCH ' + d for d in directives)}

set -u
cd {q(job.workdir)} || exit 1
slurm_dir={q(job.slurm_dir)}
max_requeues={job.max_requeues}
max_failures={job.max_failures}
restarts=${{SLURM_RESTART_COUNT:-0}}
# a fresh rendezvous TCPStore per torchrun attempt (launcher/torchrun.py: pytorch/pytorch#135712)
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
echo "moeforge: job $SLURM_JOB_ID on $SLURM_JOB_NODELIST, SLURM_RESTART_COUNT=$restarts, $(date -u +%FT%TZ)"

# rendezvous on the first node of the allocation, at the address Slurm uses for it
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
head_addr=$(scontrol show node "$head_node" 2>/dev/null | sed -n 's/.*NodeAddr=\\([^ ]*\\).*/\\1/p' | head -n 1)
head_addr=${{head_addr:-$head_node}}
rdzv_port={rdzv_port}
echo "moeforge: rendezvous c10d at $head_addr:$rdzv_port ($head_node), {job.nodes} node(s) x {job.procs_per_node} rank(s)"

# USR1 (the time-limit notice, or scancel --batch --signal=USR1): every rank saves its step, then requeue.
# TERM: Slurm itself is ending the job (scancel, time limit, scontrol requeue): pass it on, no requeue.
srun_pid=""
preempted=0
terminated=0
forward() {{ [ -n "$srun_pid" ] && kill -USR1 "$srun_pid" 2>/dev/null; }}
trap 'preempted=1; echo "moeforge: USR1: forwarding to the job step, checkpoint then requeue"; forward' USR1
trap 'terminated=1; echo "moeforge: TERM: Slurm is ending the job; forwarding as USR1"; forward' TERM

{command} &
srun_pid=$!
[ "$preempted" = 1 ] && forward
while kill -0 "$srun_pid" 2>/dev/null; do wait "$srun_pid"; done  # a trap interrupts wait: wait again
wait "$srun_pid"
rc=$?
echo "moeforge: job step exited with $rc"

if [ "$rc" = 0 ]; then
  exit 0
fi
if [ "$terminated" = 1 ] && [ "$preempted" = 0 ]; then
  echo "moeforge: not requeueing: Slurm ended this job"
  exit "$rc"
fi
if [ "$preempted" = 0 ]; then
  failures_file="$slurm_dir/failures-$SLURM_JOB_ID"
  failures=$(( $(cat "$failures_file" 2>/dev/null || echo 0) + 1 ))
  echo "$failures" > "$failures_file"
  if [ "$failures" -ge "$max_failures" ]; then
    echo "moeforge: failed $failures time(s) (max_failures=$max_failures): not requeueing"
    exit "$rc"
  fi
  echo "moeforge: failure $failures of $max_failures"
fi
if [ "$restarts" -ge "$max_requeues" ]; then
  echo "moeforge: requeued $restarts time(s) already (max_requeues=$max_requeues): not requeueing"
  exit "$rc"
fi
echo "moeforge: requeueing job $SLURM_JOB_ID (SLURM_RESTART_COUNT will be $((restarts + 1)))"
scontrol requeue "$SLURM_JOB_ID"
exit 75
"""


# --------------------------------------------------------------------------------------------------
# side effects


def submit(job: SlurmJob, env: dict[str, str] | None = None) -> str:
    """Write RUN_DIR/slurm/submit.sbatch, sbatch it, print and return the job id."""
    slurm_dir = Path(job.slurm_dir)
    slurm_dir.mkdir(parents=True, exist_ok=True)
    script = slurm_dir / SCRIPT_NAME
    script.write_text(render(job))
    script.chmod(0o755)
    p = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, env=env,
                       cwd=job.workdir, timeout=120)
    if p.returncode:
        raise RuntimeError(f"sbatch {script} failed ({p.returncode}): {p.stderr.strip() or p.stdout.strip()}")
    job_id = p.stdout.strip().split(";")[0]  # "ID" or "ID;cluster"
    with open(slurm_dir / "jobs", "a") as f:
        f.write(job_id + "\n")
    print(f"moeforge: submitted job {job_id}\n  script {script}\n  log    {slurm_dir / f'slurm-{job_id}.out'}\n"
          f"  run    {job.run_dir}  (metrics.jsonl, checkpoints/)", flush=True)
    return job_id


def job_from_args(ns: argparse.Namespace) -> SlurmJob:
    """Validate the training config (and the layout) here, before anything is queued."""
    from .config import load_job_config

    overrides = tuple(ns.overrides)
    cfg = load_job_config(train_overrides(SlurmJob(signal_grace_s=ns.signal_grace, overrides=overrides)))
    job = SlurmJob(nodes=ns.nodes, gpus_per_node=ns.gpus_per_node, nproc_per_node=ns.nproc_per_node,
                   partition=ns.partition, time=ns.time, job_name=ns.job_name or f"moeforge-{cfg.model.name}",
                   account=ns.account, qos=ns.qos, constraint=ns.constraint, cpus_per_task=ns.cpus_per_task,
                   signal_grace_s=ns.signal_grace, max_requeues=ns.max_requeues, max_failures=ns.max_failures,
                   rdzv_port=ns.rdzv_port, sbatch_options=tuple(ns.sbatch_option or ()), overrides=overrides,
                   run_dir=os.path.abspath(cfg.run_dir), workdir=os.getcwd())
    from moeforge.train.build import check_layout

    check_layout(cfg, job.procs_per_node * job.nodes, job.procs_per_node)
    return job


def parse_show_job(text: str) -> dict[str, str]:
    """`scontrol show job` (multi-line) as a dict. Paths and names may hold spaces: the lines that carry
    one (JobName, Command, WorkDir, StdOut, ...) are read whole, the others as KEY=VALUE words."""
    info: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        key = line.split("=", 1)[0]
        if key in ("Command", "WorkDir", "StdErr", "StdIn", "StdOut", "Comment"):
            info[key] = line.split("=", 1)[1]
        elif key == "JobId" and " JobName=" in line:
            head, name = line.split(" JobName=", 1)
            info.update(re.findall(r"(\w+)=(\S*)", head), JobName=name)
        else:
            info.update(re.findall(r"(\w+)=(\S*)", line))
    return info


def _job_ids(target: str) -> list[str]:
    """A job id, or a run dir whose slurm/jobs lists the jobs submitted from it (newest last)."""
    if target.isdigit():
        return [target]
    jobs = Path(target) / "slurm" / "jobs"
    if not jobs.is_file():
        raise ValueError(f"slurm: {target!r} is neither a job id nor a run dir with slurm/jobs")
    return [line.strip() for line in jobs.read_text().splitlines() if line.strip()]


def _friendly(fn):
    """Bad values, sbatch refusing, no Slurm installed: one line on stderr and exit code 2."""
    def run(ns) -> int:
        try:
            return fn(ns)
        except (ValueError, RuntimeError, OSError, subprocess.SubprocessError) as e:
            print(f"moeforge: {e}", file=sys.stderr)
            return 2
    return run


@_friendly
def _submit_cmd(ns) -> int:
    job = job_from_args(ns)
    if ns.dry_run:
        sys.stdout.write(render(job))
    else:
        submit(job)
    return 0


@_friendly
def _status_cmd(ns) -> int:
    rc = 0
    run_dir = None if ns.target.isdigit() else Path(ns.target)
    for job_id in _job_ids(ns.target)[-1:]:
        p = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, timeout=60)
        if p.returncode:
            print(f"job {job_id}: {p.stderr.strip() or 'unknown'}")
            rc = 1
            continue
        info = parse_show_job(p.stdout)
        keys = ("JobState", "Reason", "Restarts", "NodeList", "RunTime", "TimeLimit", "ExitCode")
        # the log path as written, not scontrol's rendering of it (which turns a literal %%j into %<id>)
        log = run_dir / "slurm" / f"slurm-{job_id}.out" if run_dir else info.get("StdOut")
        print(f"job {job_id}: " + " ".join(f"{k}={info.get(k, '?')}" for k in keys) + f"\n  log {log}")
    return rc


@_friendly
def _cancel_cmd(ns) -> int:
    argv = ["scancel", *_job_ids(ns.target)[-1:]]
    print("moeforge: " + " ".join(argv), flush=True)
    return subprocess.run(argv, timeout=60).returncode


def add_slurm_parser(sub) -> None:
    s = sub.add_parser("slurm", help="submit / inspect / cancel Slurm jobs running `moeforge train`")
    ssub = s.add_subparsers(dest="slurm_command", required=True)
    p = ssub.add_parser("submit", help="write RUN_DIR/slurm/submit.sbatch (srun + torchrun per node) and sbatch it")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node (0: CPU nodes, no --gpus-per-node)")
    p.add_argument("--nproc-per-node", type=int, default=None, help="ranks per node (default: --gpus-per-node, or 1)")
    p.add_argument("--partition", default=None)
    p.add_argument("--time", default=None, help="time limit, e.g. 24:00:00")
    p.add_argument("--job-name", default=None, help="default moeforge-<model>")
    p.add_argument("--account", default=None)
    p.add_argument("--qos", default=None)
    p.add_argument("--constraint", default=None)
    p.add_argument("--cpus-per-task", type=int, default=None, help="CPUs for each node's torchrun (all its ranks)")
    p.add_argument("--signal-grace", type=int, default=120,
                   help="USR1 this many seconds before the time limit: save and requeue (default 120)")
    p.add_argument("--max-requeues", type=int, default=50, help="stop requeueing after this many (default 50)")
    p.add_argument("--max-failures", type=int, default=3,
                   help="attempts failing without a preemption signal before giving up (default 3)")
    p.add_argument("--rdzv-port", type=int, default=None, help="c10d port on the first node (default 20000 + "
                   "job id %% 10000)")
    p.add_argument("--sbatch-option", action="append", help="another #SBATCH option, e.g. --mem=0 (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print the script; write and submit nothing")
    p.add_argument("overrides", nargs="*", help="hydra overrides for every rank, e.g. model=16b train.steps=1000")
    p.set_defaults(fn=_submit_cmd)
    st = ssub.add_parser("status", help="state, restarts and log of a job (JOB_ID, or RUN_DIR: its newest job)")
    st.add_argument("target")
    st.set_defaults(fn=_status_cmd)
    c = ssub.add_parser("cancel", help="scancel a job (JOB_ID, or RUN_DIR: its newest job); checkpoints on "
                        "disk stay, and a new submit with the same overrides resumes from them")
    c.add_argument("target")
    c.set_defaults(fn=_cancel_cmd)
