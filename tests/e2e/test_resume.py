"""Jobs that die and come back continue as if nothing happened.

- Whole or not: partial (no manifest), truncated, corrupted checkpoints and garbage manifests are
  reported and skipped, never loaded; a crafted DCP index is refused by the metadata unpickler.
- Exact resume (CPU, same layout): a single-process run killed with SIGKILL at a random step and run
  again, and one stopped by SIGTERM (it saves that step, exits 75) and run again, reproduce the
  uninterrupted run's per-step metrics and its final checkpoint (model, optimizer, RNG) bit for bit.
- Fault tolerance under `moeforge launch --max-restarts 2`: kill -9 of rank 1 at a random step, and
  later SIGUSR1 to rank 1 alone (every rank agrees, saves the same step, exits 75): torchrun restarts
  the group twice and the job finishes with the uninterrupted 2-rank run's final state, bit for bit.
Every subprocess runs under `timeout -s KILL`, in its own session; whatever it started (torchrun's
workers live in sessions of their own) is tracked through /proc and SIGKILLed at the end of the test.
"""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from moeforge.train import checkpoint as ckpt
from moeforge.train.metrics import read_metrics
from moeforge.train.preempt import EXIT_PREEMPTED, PreemptionWatcher, parse_signals

REPO = Path(__file__).resolve().parents[2]
STEPS = 10
TINY = ["train.seq_len=32", "train.global_batch_size=8", "train.micro_batch_size=2", "train.sample_tokens=0",
        "logging.progress=false", "train.eval_interval=4", "train.eval_batches=1", f"train.steps={STEPS}",
        "parallel.timeout_s=30"]
# One intra-op thread per process (torchrun's own default): tiny GEMMs gain nothing from a second thread,
# and on a loaded 2-core machine spinning OpenMP threads make a run several times slower.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TREE_EVERY_S = 0.5  # how often the job's process tree is rescanned (a /proc walk costs ~5 ms of CPU)
KEYS = ("step", "loss", "mtp_loss", "aux_loss", "lr", "grad_norm", "val_loss", "tokens_seen",
        "expert_load_max_over_mean", "moe_bias_abs_max")


# --------------------------------------------------------------------------------------------------
# whole or not


def _save_three(root):
    return [ckpt.save(root, s, {"model.w": torch.full((1000,), float(s)), "train.step": torch.tensor(s)}, keep=5)
            for s in (1, 2, 3)]


def _flip_last_byte(path):
    with open(path, "r+b") as f:
        f.seek(-1, 2)
        b = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([b[0] ^ 0xFF]))


@pytest.mark.parametrize("damage,reason", [
    ("no_manifest", "no manifest"),
    ("truncated", "truncated"),
    ("corrupted", "checksum mismatch"),
    ("garbage_manifest", "unreadable manifest"),
    ("missing_file", "missing __0_0.distcp"),
])
def test_damaged_checkpoints_are_reported_and_skipped(tmp_path, damage, reason):
    p1, p2, p3 = _save_three(tmp_path)
    data = p3 / "__0_0.distcp"
    if damage == "no_manifest":
        (p3 / ckpt.MANIFEST).unlink()
    elif damage == "truncated":
        os.truncate(data, data.stat().st_size - 7)
    elif damage == "corrupted":
        _flip_last_byte(data)
    elif damage == "garbage_manifest":
        (p3 / ckpt.MANIFEST).write_text('{"format": "moeforge-dcp/1", "files": {')
    else:
        data.unlink()
    msgs = []
    assert ckpt.latest_whole(tmp_path, log=msgs.append) == p2
    assert len(msgs) == 1 and str(p3) in msgs[0] and reason in msgs[0], msgs
    with pytest.raises(ValueError, match="not whole"):
        ckpt.load(p3)
    assert torch.equal(ckpt.load(p2)["model.w"], torch.full((1000,), 2.0))


def test_keep_newest_k_and_drop_debris(tmp_path):
    root = tmp_path / "ck"
    (root / "step_00000000").mkdir(parents=True)  # debris of a save that never finished
    for s in (1, 2, 3, 4):
        ckpt.save(root, s, {"x": torch.tensor(s)}, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step_00000003", "step_00000004"]
    ckpt.save(root, 2, {"x": torch.tensor(2)}, keep=2)  # resumed from an older step: newer ones are stale
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step_00000002"]


def test_crafted_metadata_is_refused_even_when_the_manifest_matches(tmp_path):
    import pickle

    (p,) = [ckpt.save(tmp_path, 1, {"x": torch.ones(3)})]

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    (p / ".metadata").write_bytes(pickle.dumps(Evil()))
    manifest = ckpt.read_manifest(p)  # a forger who rewrites the checksums too
    manifest["files"][".metadata"] = {"bytes": (p / ".metadata").stat().st_size,
                                      "sha256": ckpt._sha256(p / ".metadata")}
    (p / ckpt.MANIFEST).write_text(json.dumps(manifest))
    assert ckpt.verify(p) is None
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        ckpt.load(p)
    assert not (tmp_path / "pwned").exists()


def test_async_save_returns_before_the_write_finishes(tmp_path, monkeypatch):
    import threading

    gate = threading.Event()
    real = ckpt._sha256
    monkeypatch.setattr(ckpt, "_sha256", lambda path: gate.wait(30) and real(path))
    c = ckpt.Checkpointer(tmp_path, keep=2, async_save=True)
    x = torch.arange(10.0)
    path = c.save(7, {"x": x}, {"tokens_seen": 1})
    x.add_(1)  # training goes on and changes the live tensor: the staged copy was taken at save()
    assert c.in_flight and not (path / ckpt.MANIFEST).exists()
    gate.set()
    assert c.wait() == path and ckpt.verify(path) is None
    assert torch.equal(ckpt.load(path)["x"], torch.arange(10.0))
    assert ckpt.read_manifest(path)["tokens_seen"] == 1


def test_trim_metrics(tmp_path):
    f = tmp_path / "metrics.jsonl"
    f.write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 8)) + '{"step": 8, "lo')  # cut by a kill
    ckpt.trim_metrics(f, 4)
    assert [r["step"] for r in read_metrics(f)] == [1, 2, 3, 4]
    ckpt.trim_metrics(f, 0)
    assert not f.exists()


def test_preemption_watcher_sets_a_flag_and_restores_handlers():
    before = signal.getsignal(signal.SIGUSR1)
    w = PreemptionWatcher(parse_signals("SIGUSR1,term"), grace_s=5).install()
    assert not w.agreed()
    os.kill(os.getpid(), signal.SIGUSR1)
    time.sleep(0.05)
    assert w.agreed() and w.received == signal.SIGUSR1 and w.elapsed() >= 0
    w.uninstall()
    assert signal.getsignal(signal.SIGUSR1) == before
    with pytest.raises(ValueError, match="SIGNOPE"):
        parse_signals("SIGTERM,NOPE")


# --------------------------------------------------------------------------------------------------
# processes


def _ppid_map() -> dict[int, int]:
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    out[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    return out


def _environ(pid: int) -> dict[str, str]:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            items = f.read().split(b"\0")
    except OSError:
        return {}
    return dict(i.decode(errors="replace").split("=", 1) for i in items if b"=" in i)


class Job:
    """A `moeforge` subprocess under `timeout -s KILL`; every process it starts is tracked and killed at close."""

    def __init__(self, args: list[str], run_dir: Path, limit_s: int):
        self.run_dir = run_dir
        self.log = open(run_dir.parent / f"{run_dir.name}.log", "a")
        self.proc = subprocess.Popen(["timeout", "-s", "KILL", str(limit_s), sys.executable, "-m", "moeforge.launcher.cli", *args],
                                     cwd=REPO, env=ENV, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.seen: set[int] = set()
        self.scanned = 0.0
        self.deadline = time.monotonic() + limit_s + 10

    def watch(self) -> None:
        """tree(), at most every TREE_EVERY_S: polling loops call this, so the workers are tracked cheaply."""
        if time.monotonic() - self.scanned >= TREE_EVERY_S:
            self.tree()

    def tree(self) -> set[int]:
        self.scanned = time.monotonic()
        kids, ppids = {self.proc.pid}, _ppid_map()
        grew = True
        while grew:
            new = {p for p, pp in ppids.items() if pp in kids} - kids
            kids |= new
            grew = bool(new)
        self.seen |= kids
        return kids

    def rank_pid(self, rank: int, attempt: int) -> int:
        """The worker process of `rank` in torchrun's `attempt` (0 first, 1 after one restart, ...)."""
        while True:
            for pid in sorted(self.tree()):
                env = _environ(pid)
                if env.get("RANK") == str(rank) and env.get("TORCHELASTIC_RESTART_COUNT") == str(attempt):
                    return pid
            assert self.proc.poll() is None and time.monotonic() < self.deadline, self.output()[-3000:]
            time.sleep(0.05)

    def child(self) -> int:
        """The process `timeout` runs: the trainer (`train`) or the launcher (`launch`)."""
        ppids = _ppid_map()
        return next(p for p, pp in ppids.items() if pp == self.proc.pid)

    def steps_logged(self) -> int:
        try:
            lines = (self.run_dir / "metrics.jsonl").read_text().splitlines()
        except OSError:
            return 0
        steps = [0]
        for line in lines:
            try:
                steps.append(json.loads(line)["step"])
            except (json.JSONDecodeError, KeyError):  # a line being written, or cut by a kill
                pass
        return max(steps)

    def wait_for_step(self, step: int) -> None:
        while self.steps_logged() < step:
            self.watch()
            assert self.proc.poll() is None, f"job ended (rc {self.proc.returncode}) before step {step}:\n{self.output()}"
            assert time.monotonic() < self.deadline, f"no step {step} in time:\n{self.output()}"
            time.sleep(0.05)

    def wait_for_checkpoint(self) -> None:
        """Until a whole checkpoint exists: a kill before the first async save has finished would test a
        fresh start, not a resume."""
        while ckpt.latest_whole(self.run_dir / "checkpoints", log=lambda msg: None) is None:
            self.watch()
            assert self.proc.poll() is None, f"job ended (rc {self.proc.returncode}), no checkpoint:\n{self.output()}"
            assert time.monotonic() < self.deadline, f"no whole checkpoint in time:\n{self.output()}"
            time.sleep(0.05)

    def wait(self) -> int:
        while self.proc.poll() is None:
            self.watch()
            time.sleep(0.2)
        return self.proc.returncode

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return Path(self.log.name).read_text()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.tree()
        for pid in self.seen:  # only ours: a pid seen earlier may belong to someone else by now
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if str(self.run_dir).encode() in f.read():
                        os.kill(pid, signal.SIGKILL)
            except (OSError, ProcessLookupError):
                pass
        self.proc.wait()
        self.log.close()


def run_job(args, run_dir, limit_s=300) -> str:
    job = Job(args, run_dir, limit_s)
    try:
        rc = job.wait()
        assert rc == 0, job.output()[-4000:]
        return job.output()
    finally:
        job.close()


def train_args(run_dir, data, *extra):
    return ["train", f"data.dir={data}", f"run_dir={run_dir}", *TINY, *extra]


def launch_args(run_dir, data, *extra, restarts=2):
    return ["launch", "--nproc-per-node", "2", "--max-restarts", str(restarts), "--monitor-interval", "0.2",
            f"data.dir={data}", f"run_dir={run_dir}", *TINY, "parallel.ep=2", *extra]


def assert_same_run(ref_dir: Path, run_dir: Path):
    """Per-step metrics and the final checkpoint (every tensor: model, optimizer, RNG) bit for bit."""
    a, b = read_metrics(ref_dir / "metrics.jsonl"), read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in b] == list(range(1, STEPS + 1))
    assert [[r.get(k) for k in KEYS] for r in a] == [[r.get(k) for k in KEYS] for r in b]
    final = f"checkpoints/step_{STEPS:08d}"
    sa, sb = ckpt.load(ref_dir / final), ckpt.load(run_dir / final)
    assert sa.keys() == sb.keys()
    differ = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not differ, differ[:10]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, stdlib_data):
    """The uninterrupted single-process run (a subprocess, like the runs it is compared with). It saves
    only at the end: interval saves leave the training state alone (the SIGTERM run has none)."""
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    run_dir.mkdir()
    run_job(train_args(run_dir, stdlib_data), run_dir)
    return run_dir


@pytest.mark.timeout(600)
def test_kill9_then_rerun_reproduces_the_uninterrupted_run(reference, tmp_path, stdlib_data):
    k = random.randint(3, 7)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    args = train_args(run_dir, stdlib_data, "checkpoint.interval=2")
    job = Job(args, run_dir, 300)
    try:
        job.wait_for_step(k)
        job.wait_for_checkpoint()
        os.kill(job.child(), signal.SIGKILL)
        assert job.wait() in (-signal.SIGKILL, 128 + signal.SIGKILL)
    finally:
        job.close()
    killed_at = job.steps_logged()
    assert k <= killed_at < STEPS, (k, killed_at)
    out = run_job(args, run_dir)
    assert "moeforge: resumed from" in out, out[-3000:]
    assert_same_run(reference, run_dir)


@pytest.mark.timeout(600)
def test_sigterm_saves_the_step_exits_75_and_resumes(reference, tmp_path, stdlib_data):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    args = train_args(run_dir, stdlib_data)  # no interval saves: the preemption save is the only one
    job = Job(args, run_dir, 300)
    try:
        job.wait_for_step(3)
        os.kill(job.child(), signal.SIGTERM)
        rc = job.wait()
    finally:
        job.close()
    out = job.output()
    assert rc == EXIT_PREEMPTED, out[-3000:]
    assert "preempted (SIGTERM)" in out
    saved = ckpt.latest_whole(run_dir / "checkpoints")
    assert saved is not None and ckpt.step_of(saved) == job.steps_logged() >= 3
    out = run_job(args, run_dir)
    assert f"resumed from {saved}" in out
    assert_same_run(reference, run_dir)


@pytest.fixture(scope="module")
def launch_reference(tmp_path_factory, stdlib_data):
    run_dir = tmp_path_factory.mktemp("launch_ref") / "run"
    run_dir.mkdir()
    run_job(launch_args(run_dir, stdlib_data, restarts=0), run_dir)  # saves at the end only, as `reference`
    return run_dir


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_launch_survives_kill9_and_a_preemption_signal_on_one_rank(launch_reference, tmp_path, stdlib_data):
    """One job, two failures: rank 1 is SIGKILLed at a random step (torchrun restarts the group, which
    resumes from the newest whole checkpoint); later rank 1 alone gets SIGUSR1 (every rank agrees,
    saves that step and exits 75; torchrun restarts again). It ends with the uninterrupted run's state."""
    k1 = random.randint(3, 6)
    k2 = k1 + 2
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    job = Job(launch_args(run_dir, stdlib_data, "checkpoint.interval=2", restarts=2), run_dir, 360)
    try:
        job.wait_for_step(k1)
        job.wait_for_checkpoint()
        os.kill(job.rank_pid(1, attempt=0), signal.SIGKILL)
        job.wait_for_step(k2)  # logged by the restarted group (metrics were trimmed to its checkpoint)
        os.kill(job.rank_pid(1, attempt=1), signal.SIGUSR1)
        rc = job.wait()
    finally:
        job.close()
    out = job.output()
    assert rc == 0, f"kill at step {k1}, signal at {k2}:\n{out[-4000:]}"
    for line in ("(torchrun restart 1)", "preempted (a signal on another rank)", "(torchrun restart 2)"):
        assert line in out, f"{line!r} missing; kill at step {k1}, signal at {k2}:\n{out[-4000:]}"
    assert_same_run(launch_reference, run_dir)
