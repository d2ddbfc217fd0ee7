"""Preemption: a signal asks for a checkpoint, and every rank saves the same step before exiting.

Schedulers announce the end of an allocation with a signal some time before they kill the job:
Slurm sends SIGUSR1 (`--signal=USR1@120`) or SIGTERM on `scancel`/preemption, torchrun's agent sends
SIGTERM (or the signal it received, with `--signals-to-handle`) to the workers and SIGKILLs them
`--shutdown-timeout` (30) seconds later. The handler here only sets a flag: a Python signal handler
runs between bytecodes, so nothing can be saved safely from inside it. The trainer asks
`PreemptionWatcher.agreed(group)` after every step; the ranks all-reduce (MAX) the flag, so one rank
that got the signal is enough, and every rank then saves the same step and exits with
EXIT_PREEMPTED. A second signal of the same kind restores the default action and re-raises it, so an
impatient second SIGTERM still kills at once, unless it comes within DUPLICATE_WINDOW_S of the first:
under Slurm one notice arrives twice (slurmstepd signals every process of the step, workers included,
and torchrun's agent forwards the copy it got), and that echo must not kill the rank mid-save.
"""
from __future__ import annotations

import signal
import sys
import time

import torch
import torch.distributed as dist

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "temporary failure, the user is invited to retry"
DUPLICATE_WINDOW_S = 5.0  # a repeat of the first signal this soon is the launcher's echo, not a second request


def parse_signals(spec: str) -> list[signal.Signals]:
    """"SIGTERM,SIGUSR1" -> [Signals.SIGTERM, Signals.SIGUSR1]; "" -> []."""
    out = []
    for name in (s.strip().upper() for s in spec.split(",") if s.strip()):
        name = name if name.startswith("SIG") else "SIG" + name
        if not hasattr(signal.Signals, name):
            raise ValueError(f"checkpoint.preempt_signals: unknown signal {name!r}")
        out.append(signal.Signals[name])
    return out


class PreemptionWatcher:
    """Signal handlers that set a flag; install() in the main thread, uninstall() restores the old ones."""

    def __init__(self, signals: list[signal.Signals], grace_s: float):
        self.signals = list(signals)
        self.grace_s = grace_s
        self.received: signal.Signals | None = None
        self.received_at: float | None = None  # time.monotonic() of the first signal
        self._previous: dict[signal.Signals, object] = {}
        self._agreed_at: float | None = None  # when the ranks agreed, and how long ago the first signal was then
        self._elapsed_at_agreement = 0.0

    def install(self) -> "PreemptionWatcher":
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, prev in self._previous.items():
            if signal.getsignal(sig) == self._handle:
                signal.signal(sig, prev)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        sig = signal.Signals(signum)
        if self.received == sig and time.monotonic() - self.received_at < DUPLICATE_WINDOW_S:
            return  # the same notice relayed by another process (torchrun's agent, srun): already noted
        if self.received == sig:  # the second one: do what the signal would have done
            signal.signal(sig, signal.SIG_DFL)
            signal.raise_signal(sig)
            return
        if self.received is None:
            self.received, self.received_at = sig, time.monotonic()
            print(f"moeforge: {sig.name} received: checkpointing after this step and exiting "
                  f"(grace {self.grace_s:g}s)", file=sys.stderr, flush=True)

    def elapsed(self) -> float:
        """Seconds since the first signal, on whichever rank got it first (as of the last agreed())."""
        if self._agreed_at is None:
            return 0.0 if self.received_at is None else time.monotonic() - self.received_at
        return self._elapsed_at_agreement + time.monotonic() - self._agreed_at

    def agreed(self, group=None, device=None) -> bool:
        """Collective over `group` (None: this process only): did any rank get a signal?"""
        mine = -1.0 if self.received_at is None else time.monotonic() - self.received_at
        if group is not None:
            t = torch.tensor([mine], dtype=torch.float64, device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
            mine = float(t.item())
        if mine < 0:
            return False
        self._agreed_at, self._elapsed_at_agreement = time.monotonic(), mine
        return True
