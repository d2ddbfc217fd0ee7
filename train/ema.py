"""EMA of the parameters in host memory, updated in the background (TR §3.2.3).

"During training, we preserve the Exponential Moving Average (EMA) of the model parameters for early
estimation of the model performance after learning rate decay. The EMA parameters are stored in CPU
memory and are updated asynchronously after each training step."

What is kept. Every trainable parameter this rank holds (its pipeline stages, its experts: the rank's
part of `model.named_parameters()`, under the model's own names, so `ema.<fqn>` checkpoint keys carry the
global layer and expert ids the `model.<fqn>` keys do) has an FP32 copy in host memory:

    ema ← decay·ema + (1 − decay)·θ_t          after every optimizer step t that is not skipped

computed as `ema.lerp_(θ_t, 1 − decay)` in FP32. The EMA starts as the parameters themselves (at
initialisation, or those of a checkpoint that has no EMA), the convention of torch.optim.swa_utils'
EMA and timm's ModelEma: it is never biased toward zero, so there is no bias correction, and the decay
is constant (no warmup). Steps the spike guard skips (train/health.py) leave the parameters and the
EMA unchanged. MoE gate biases are buffers, not parameters: export takes them from the live model.

How it stays off the step's critical path. One update is three stages, and only the first runs on the
training thread:

    training thread: [optimizer step] -> issue the copy -> forward/backward of the next step ...
    copy:            params -> staging (device -> host)           (CUDA: a side stream; CPU: the worker)
    worker thread:   wait for the copy -> ema.lerp_(staging, 1 - decay) over every tensor (FP32, CPU)

- CUDA: an event recorded on the compute stream after the optimizer step; a dedicated copy stream waits
  on it and copies every parameter into pinned staging buffers (non_blocking), then records a copy-done
  event; the worker thread synchronizes on that event (only the worker blocks) and updates the EMA. The
  next optimizer step overwrites the parameters, so before it the compute stream waits on the copy-done
  event (`wait_copy`): a device-side wait, no host sync.
- CPU: the worker thread does the copy (into plain host buffers) and the update; `wait_copy` waits on the
  host for the copy only, not for the update.
The difference is isolated in `_CudaCopy` / `_HostCopy`; the rest is one code path. The staging buffers
are overwritten by the next copy, so the next update starts only when the previous one has finished
(the training thread waits for it in `start` only if the CPU falls a whole step behind: `stall_s`).
`wait()` finishes the update in flight: checkpoint saves, loads and exports call it.

The fake-CUDA dry run (train/dryrun.py) runs the training thread's part as a GPU would (the copy stream,
its events and record_stream are checked by comm/fake_streams); its fake tensors have no values and its
fake mode is not thread-safe, so on fake parameters the worker's wait and FP32 update are not run (the
one place this file knows of fake tensors).

Memory (`ema_memory`): 4 bytes per parameter element in (pageable) host memory for the FP32 EMA, plus
one staging copy in the parameter dtype, pinned on CUDA. The EMA itself is not pinned: only the
device -> host copy needs page-locked memory, and pinning 4 bytes per parameter more would lock host
memory the checkpoint stager and the data loader also need. No device memory is used beyond the
copy stream's two events.
"""
from __future__ import annotations

import threading
import time
from typing import Iterable

import torch


def ema_memory(n_params: int, param_bytes: int, cuda: bool) -> dict[str, int]:
    """Host memory the EMA takes on one rank that holds `n_params` parameter elements of `param_bytes`
    bytes each: the FP32 EMA (pageable) and the staging copy (pinned when `cuda`). Pure: the planner's."""
    staging = n_params * param_bytes
    return {"ema_host_bytes": 4 * n_params, "ema_staging_bytes": staging,
            "ema_pinned_bytes": staging if cuda else 0, "ema_total_host_bytes": 4 * n_params + staging}


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(t)


class _Ticket:
    """One update in flight: how the training thread and the worker know the copy is done."""

    def __init__(self, done: "torch.cuda.Event | None" = None):
        self.done = done  # CUDA: recorded on the copy stream after the last copy
        self.copied = threading.Event()  # CPU: set by the worker after the last copy


class _CudaCopy:
    """Device -> pinned host copies on a stream of their own, ordered by events."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.recorded: set[int] = set()  # ids of the parameters already record_stream'ed onto the copy stream

    def issue(self, params: list[torch.Tensor], staging: list[torch.Tensor]) -> _Ticket:
        if len(self.recorded) < len(params):  # once: the allocator must not reuse a parameter's memory while
            for p in params:                  # the copy stream reads it (parameters live on: a formality)
                if id(p) not in self.recorded:
                    p.record_stream(self.stream)
                    self.recorded.add(id(p))
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(self.device))  # after the optimizer step (and its all-gather)
        self.stream.wait_event(ready)
        with torch.cuda.stream(self.stream):
            for p, s in zip(params, staging):
                s.copy_(p.detach(), non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        return _Ticket(done=done)

    def copy_in_worker(self, ticket: _Ticket, params, staging) -> None:
        ticket.done.synchronize()  # blocks the worker thread only

    def before_mutation(self, ticket: _Ticket) -> None:
        torch.cuda.current_stream(self.device).wait_event(ticket.done)  # device-side: no host sync


class _HostCopy:
    """CPU parameters: the worker copies them; the training thread waits for that copy, not the update."""

    def issue(self, params, staging) -> _Ticket:
        return _Ticket()

    def copy_in_worker(self, ticket: _Ticket, params, staging) -> None:
        try:
            for p, s in zip(params, staging):
                s.copy_(p.detach())
        finally:
            ticket.copied.set()  # on a failure too: the error is raised on the training thread

    def before_mutation(self, ticket: _Ticket) -> None:
        ticket.copied.wait()


class ParamEMA:
    """FP32 EMA of `named_params` (name -> parameter) in host memory; see the module docstring.

        ema = ParamEMA(model.named_parameters(), decay=0.999, device=device)
        ema.wait_copy(); optimizer.step(); ema.start()      # each step that is not skipped
        ema.wait(); ema.state_dict()                          # name -> FP32 CPU tensor
    """

    def __init__(self, named_params: Iterable[tuple[str, torch.Tensor]], decay: float, device: torch.device):
        if not 0 < decay < 1:
            raise ValueError(f"train.ema_decay must be in (0, 1) for an EMA, got {decay}")
        self.decay = float(decay)
        named = [(n, p) for n, p in named_params if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        device = torch.device(device)
        cuda = device.type == "cuda"
        pin = cuda  # (the dry run's fake CUDA says not available; it tracks what asks to be pinned)
        self.ema = {n: torch.empty(p.shape, dtype=torch.float32, device="cpu") for n, p in named}
        self.staging = [torch.empty(p.shape, dtype=p.dtype, device="cpu", pin_memory=pin) for p in self.params]
        # FP32 scratch for a staged parameter in another dtype (BF16): upcast once, lerp in FP32
        low = [p.numel() for p in self.params if p.dtype != torch.float32]
        self._scratch = torch.empty(max(low), dtype=torch.float32) if low else None
        self._copy = _CudaCopy(device) if cuda else _HostCopy()
        self._fake = bool(self.params) and _is_fake(self.params[0])  # the dry run: no values to fold in
        self._thread: threading.Thread | None = None
        self._ticket: _Ticket | None = None  # the copy the next parameter write must wait for
        self._error: BaseException | None = None
        self.updates = 0  # updates applied since the EMA was (re)started from the parameters
        self.stall_s = 0.0  # training-thread time spent waiting for a previous update in `start`
        self.update_s = 0.0  # worker time of the updates (copy wait + lerp), summed
        self.reset()

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.params)

    def memory(self) -> dict[str, int]:
        elem = max((p.element_size() for p in self.params), default=4)
        return ema_memory(self.n_params, elem, isinstance(self._copy, _CudaCopy))

    def reset(self) -> None:
        """Start the EMA from the parameters as they are now (a synchronous copy)."""
        self.wait()
        with torch.no_grad():
            for n, p in zip(self.names, self.params):
                self.ema[n].copy_(p.detach())
        self.updates = 0

    def start(self) -> None:
        """After an optimizer step: issue the copy of the new parameters; the worker folds them in."""
        t0 = time.perf_counter()
        self._join()  # the previous update reads the staging buffers this copy overwrites
        self.stall_s += time.perf_counter() - t0
        ticket = self._copy.issue(self.params, self.staging)
        self._ticket = ticket
        if self._fake:
            return
        self._thread = threading.Thread(target=self._update, args=(ticket,), name="moeforge-ema", daemon=True)
        self._thread.start()

    def wait_copy(self) -> None:
        """Before anything overwrites the parameters (the next optimizer step): the copy must be done.
        CUDA: the compute stream waits on the copy-done event; CPU: the host waits for the copy."""
        if self._ticket is not None:
            self._copy.before_mutation(self._ticket)
            self._ticket = None
        self._raise()

    def wait(self) -> None:
        """Finish the update in flight (host wait); re-raise its failure here."""
        self._join()
        self._ticket = None

    def state_dict(self) -> dict[str, torch.Tensor]:
        """name -> FP32 CPU tensor, after the update in flight (the live tensors: copy to keep them)."""
        self.wait()
        return self.ema

    def _join(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise RuntimeError(f"EMA update failed in the background: {type(err).__name__}: {err}") from err

    def _update(self, ticket: _Ticket) -> None:
        t0 = time.perf_counter()
        try:
            self._copy.copy_in_worker(ticket, self.params, self.staging)
            w = 1.0 - self.decay
            with torch.no_grad():
                for n, s in zip(self.names, self.staging):
                    e = self.ema[n]
                    if s.dtype != torch.float32:
                        s = self._scratch[:s.numel()].view(s.shape).copy_(s)
                    e.lerp_(s, w)  # decay·ema + (1 − decay)·θ
            self.updates += 1
        except BaseException as e:  # noqa: BLE001 - re-raised on the training thread by wait/start
            self._error = e
        self.update_s += time.perf_counter() - t0
