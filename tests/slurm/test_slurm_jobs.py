"""`moeforge slurm submit` against a real Slurm (two slurmd on localhost as nodes n1, n2; conftest.py).

- A 2-node job (one torchrun per node, c10d rendezvous on n1, gloo) trains the tiny model and writes
  metrics. Its run dir, job name, an sbatch option and an override value are hostile (spaces, quotes,
  `$(...)`, backticks, `;`, `%j`, `#`): nothing they contain runs, and each arrives verbatim.
- Preemption: `scancel --batch --signal=USR1` mid-run; every rank saves the same step, the batch
  script requeues the job, the requeued job (SLURM_RESTART_COUNT=1) resumes and ends with the very
  losses of the uninterrupted job above, step for step.
- A job that keeps failing is requeued until --max-failures, then left failed.
Each job has a Slurm time limit and each test a pytest timeout; teardown cancels whatever is left.
"""
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from moeforge.launcher.slurm import SlurmJob, submit
from slurm_cluster import free_port

REPO = Path(__file__).resolve().parents[2]
STEPS = 20
TINY = ["model=tiny", "train.seq_len=32", "train.global_batch_size=8", "train.micro_batch_size=2",
        "train.sample_tokens=0", "logging.progress=false", "train.eval_interval=4", f"train.steps={STEPS}",
        "parallel.timeout_s=60", "parallel.ep=2"]
JOB_LIMIT_S = 420  # one attempt of a tiny 2-node job takes ~90 s on a loaded 2-core machine
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def hydra_str(s: str) -> str:
    """A hydra override value in double quotes (the grammar's escapes: \\ and \")."""
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def losses(run_dir: Path) -> list[tuple[int, float]]:
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "loss" in r:
            out.append((r["step"], r["loss"]))
    return out


def steps_logged(run_dir: Path) -> int:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return 0
    steps = [0]
    for line in lines:
        try:
            steps.append(json.loads(line)["step"])
        except (ValueError, KeyError):  # a line being written
            pass
    return max(steps)


@dataclass
class Ran:
    run_dir: Path
    job_id: str
    info: dict
    log: str
    seconds: float


def slurm_job(run_dir: Path, data: str, **kw) -> SlurmJob:
    overrides = (*TINY, f"data.dir={data}", f"run_dir={hydra_str(str(run_dir))}", *kw.pop("overrides", ()))
    # a free rendezvous port: the default (20000 + job id % 10000) would collide with another test
    # cluster on this machine, whose job ids also start at 1
    return SlurmJob(nodes=2, time="15", signal_grace_s=30, overrides=overrides, run_dir=str(run_dir),
                    workdir=str(REPO), rdzv_port=free_port(), **kw)


def log_of(run_dir: Path, job_id: str) -> str:
    p = run_dir / "slurm" / f"slurm-{job_id}.out"
    return p.read_text(errors="replace") if p.exists() else f"(no {p})"


def finish(slurm, run_dir: Path, job_id: str, t0: float, limit_s: float = JOB_LIMIT_S) -> Ran:
    try:
        info = slurm.wait_state(job_id, ENDED, limit_s)
    except TimeoutError as e:
        raise AssertionError(f"{e}\n---- job log ----\n{log_of(run_dir, job_id)[-6000:]}") from None
    finally:
        if slurm.job(job_id).get("JobState") not in ENDED:
            slurm.run(["scancel", job_id], check=False)
    return Ran(run_dir, job_id, info, log_of(run_dir, job_id), time.monotonic() - t0)


# --------------------------------------------------------------------------------------------------
# the uninterrupted 2-node job, with hostile values everywhere the user can type one


@pytest.fixture(scope="module")
def marks(tmp_path_factory):
    return tmp_path_factory.mktemp("marks")  # an injected `touch` would leave a file here


@pytest.fixture(scope="module")
def hostile(marks):
    m = str(marks)
    return {
        "dir": f"run dir $(touch {m}/p1) `touch {m}/p2`; touch {m}/p3; it's \"q\" %j & #x",
        "job_name": f"mf $(touch {m}/p4) 'q' \"d\" ; touch {m}/p5 #1",
        "comment": f"c $(touch {m}/p6); touch {m}/p7 'x'",
        "project": f"x'; touch {m}/p8; echo '$(touch {m}/p9)",
    }


@pytest.fixture(scope="module")
def reference(slurm, stdlib_data, tmp_path_factory, hostile):
    run_dir = tmp_path_factory.mktemp("ref") / hostile["dir"]
    job = slurm_job(run_dir, stdlib_data, job_name=hostile["job_name"],
                    sbatch_options=(f"--comment={hostile['comment']}",),
                    overrides=(f"logging.wandb_project={hydra_str(hostile['project'])}",))
    t0 = time.monotonic()
    job_id = submit(job, env=slurm.env)
    return finish(slurm, run_dir, job_id, t0)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_node_job_trains_and_writes_metrics(reference, slurm):
    r = reference
    assert r.info["JobState"] == "COMPLETED", r.log[-6000:]
    assert r.info["NodeList"] == "n[1-2]" and r.info["NumNodes"] == "2", r.info
    assert f"moeforge: job {r.job_id} on n[1-2], SLURM_RESTART_COUNT=0" in r.log
    assert "rendezvous c10d at 127.0.0.1:" in r.log, r.log[-4000:]  # n1's NodeAddr
    assert "layout world=2 pp=1 dp=2 (edp=1 × ep=2) ranks_per_node=1" in r.log, r.log[-4000:]
    assert "moeforge: job step exited with 0" in r.log
    steps = [s for s, _ in losses(r.run_dir)]
    assert steps == list(range(1, STEPS + 1))
    assert (r.run_dir / "checkpoints" / f"step_{STEPS:08d}" / "manifest.json").is_file()
    print(f"\n2-node job {r.job_id}: {r.seconds:.0f}s, final loss {losses(r.run_dir)[-1][1]!r}")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_hostile_values_run_nothing_and_arrive_verbatim(reference, slurm, marks, hostile):
    r = reference
    assert r.info["JobState"] == "COMPLETED", r.log[-6000:]
    assert sorted(p.name for p in marks.iterdir()) == []  # no injected command ran, anywhere
    # the #SBATCH values came through Slurm's directive parser intact
    q = slurm.run(["squeue", "-h", "--states=all", "-j", r.job_id, "-o", "%j|%k"]).stdout.rstrip("\n")
    assert q == f"{hostile['job_name']}|{hostile['comment']}"
    assert (r.run_dir / "slurm" / f"slurm-{r.job_id}.out").is_file()  # --output: the literal dir, %j kept
    # the overrides reached every rank's hydra verbatim
    cfg = (r.run_dir / "config.yaml").read_text()
    from omegaconf import OmegaConf

    c = OmegaConf.create(cfg)
    assert c.run_dir == str(r.run_dir) and c.logging.wandb_project == hostile["project"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_status_reads_the_run_dirs_job(reference, slurm, monkeypatch, capsys):
    from moeforge.launcher.cli import main

    monkeypatch.setenv("SLURM_CONF", slurm.env["SLURM_CONF"])
    assert main(["slurm", "status", str(reference.run_dir)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"job {reference.job_id}: JobState=COMPLETED Reason=None Restarts=0 NodeList=n[1-2]"), out
    assert f"\n  log {reference.run_dir}/slurm/slurm-{reference.job_id}.out\n" in out, out


# --------------------------------------------------------------------------------------------------
# preemption: USR1 -> checkpoint -> requeue -> resume, the same losses as the uninterrupted job


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_usr1_checkpoints_requeues_and_resumes_to_the_same_loss(reference, slurm, stdlib_data, tmp_path):
    run_dir = tmp_path / "run"
    t0 = time.monotonic()
    job_id = submit(slurm_job(run_dir, stdlib_data), env=slurm.env)  # no interval saves: only the preemption's
    try:
        deadline = time.monotonic() + JOB_LIMIT_S
        while steps_logged(run_dir) < 3:
            state = slurm.job(job_id).get("JobState")
            assert state in ("PENDING", "CONFIGURING", "RUNNING"), f"{state}:\n{log_of(run_dir, job_id)[-4000:]}"
            assert time.monotonic() < deadline, log_of(run_dir, job_id)[-4000:]
            time.sleep(0.1)
        signalled_at = steps_logged(run_dir)
        slurm.run(["scancel", "--batch", "--signal=USR1", job_id])
    except BaseException:
        slurm.run(["scancel", job_id], check=False)
        raise
    r = finish(slurm, run_dir, job_id, t0, limit_s=2 * JOB_LIMIT_S)
    log = r.log
    assert r.info["JobState"] == "COMPLETED" and r.info["Restarts"] == "1", (r.info, log[-6000:])
    saved = re.search(r"preempted \(SIGUSR1\): step (\d+) saved", log)
    assert saved and signalled_at <= int(saved.group(1)) < STEPS, log[-6000:]
    for line in ("moeforge: USR1: forwarding to the job step", f"requeueing job {job_id} (SLURM_RESTART_COUNT will be 1)",
                 f"moeforge: job {job_id} on n[1-2], SLURM_RESTART_COUNT=1",
                 f"resumed from {run_dir}/checkpoints/step_{int(saved.group(1)):08d}"):
        assert line in log, f"{line!r} missing:\n{log[-6000:]}"
    assert losses(run_dir) == losses(reference.run_dir)  # every step, bit for bit
    print(f"\nSlurm held the requeued job until {slurm.holds} (released after a few seconds)")
    print(f"\npreempted at step {saved.group(1)}, requeued, resumed: {r.seconds:.0f}s; final loss "
          f"{losses(run_dir)[-1][1]!r} (uninterrupted: {losses(reference.run_dir)[-1][1]!r})")


# --------------------------------------------------------------------------------------------------
# failures: requeued until --max-failures


@pytest.mark.timeout(300)
def test_a_failing_job_stops_requeueing_after_max_failures(slurm, tmp_path):
    run_dir = tmp_path / "run"
    job = SlurmJob(nodes=2, time="5", max_failures=2, python="/bin/false", run_dir=str(run_dir), workdir=str(REPO))
    t0 = time.monotonic()
    job_id = submit(job, env=slurm.env)
    r = finish(slurm, run_dir, job_id, t0, limit_s=240)
    assert r.info["JobState"] == "FAILED" and r.info["Restarts"] == "1", (r.info, r.log)
    assert "moeforge: failure 1 of 2" in r.log and "failed 2 time(s) (max_failures=2): not requeueing" in r.log, r.log
    assert (run_dir / "slurm" / f"failures-{job_id}").read_text().strip() == "2"
