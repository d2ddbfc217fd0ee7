"""Comm streams: where the expert-parallel exchanges run, so that compute overlaps them.

An exchange is a *program*: a generator that issues its collectives itself and returns its result
(comm/all_to_all.py writes the four: dispatch, combine and their backwards). It `yield`s exactly
before a step that reads the host (the one `model.host.routing_counts` read per hop, which needs the
count all-to-all it just issued), so an executor may pause it there and let the caller queue other work
first. Programs run without autograd. One interface, two executors:

    job = stream.submit(program, inputs)   # start; `inputs`: the caller's tensors the program reads
    stream.progress()                      # the caller has queued other work: let exchanges advance
    result = stream.wait(job)              # the result, usable on the caller's stream

`ThreadCommStream` (gloo): a Python thread runs the programs one after another in submission order,
as a CUDA stream runs kernels; the collectives block that thread only. `progress()` has nothing to do.
On NCCL a second thread launching collectives while the main thread launches pipeline P2P, in an order
that differs per rank, risks a deadlock, and `Work.wait()` does not block the host, so this executor is
for gloo only: `for_device` (what apply_ep calls) never picks it for a CUDA device.

`CudaCommStream` (NCCL): every program runs on the MAIN thread, in submission order, so every rank
launches its collectives in the same order; its kernels run on a dedicated CUDA stream:
- at submit, the comm stream waits on an event recorded on the caller's (compute) stream, the inputs
  are `record_stream`ed onto the comm stream (the caching allocator must not hand their memory to the
  compute stream while the comm stream still reads them), and the program runs up to its first yield:
  the packing and the count all-to-all are queued; the host does not block;
- the host read after a yield blocks until the comm stream has caught up, so it is deferred to a point
  where the GPU has other work queued: `progress()` resumes every job submitted before the previous
  `progress()` call, one yield each, in submission order. DualPipe's F&B interleave (dualpipe/stage.py)
  calls progress() after every piece it queues, so a job's count read waits behind at least one piece
  of the other micro-batch's compute already queued (the GPU never idles for it), and its payload
  all-to-all is issued right after. The policy depends only on the sequence of submit/progress/wait
  calls, which the schedule fixes identically on every rank of the ep group: deterministic;
- `wait(job)` runs every job up to this one to the end (in order), records a completion event on the
  comm stream, `record_stream`s the result tensors onto the caller's stream and makes that stream wait
  on the event: a stream dependency, no host block.
Rules for both: all ranks of the group submit in the same order; each job is waited exactly once; after
a program fails the stream is broken (later submits and waits raise, no collective is issued that a
peer's other collective could pair with).
"""
from __future__ import annotations

import queue
import threading
import time
import weakref
from collections.abc import Generator, Sequence

import torch

Program = Generator[None, None, object]


class CommStream:
    """The executor interface (see the module docstring). `for_device` picks the implementation."""

    def submit(self, program: Program, inputs: Sequence[torch.Tensor] = ()):
        raise NotImplementedError

    def progress(self) -> None:
        raise NotImplementedError

    def wait(self, job):
        raise NotImplementedError

    @staticmethod
    def for_device(device: torch.device | str | None, timeout_s: float = 1800.0) -> "CommStream":
        """CudaCommStream on a CUDA device, ThreadCommStream elsewhere (CPU, gloo)."""
        device = torch.device(device) if device is not None else torch.device("cpu")
        return CudaCommStream() if device.type == "cuda" else ThreadCommStream(timeout_s=timeout_s)


class _Job:
    def __init__(self, program: Program):
        self.program, self.result, self.error = program, None, None
        self.seconds = 0.0  # time the thread spent running it (bench/overlap_bench.py reads it)
        self.done = threading.Event()

    def run(self, failed: list[BaseException]) -> None:
        """Run the whole program: on the thread the yields do not pause it."""
        t0 = time.perf_counter()
        try:
            if failed:
                raise RuntimeError("an earlier all-to-all exchange on this stream failed") from failed[0]
            with torch.no_grad():
                while True:
                    next(self.program)
        except StopIteration as stop:
            self.result = stop.value
        except BaseException as e:  # noqa: BLE001 -- re-raised on the waiting thread
            self.error = e
            failed.append(e)
        finally:
            self.program = None
            self.seconds = time.perf_counter() - t0
            self.done.set()


class ThreadCommStream(CommStream):
    """A thread that runs programs one at a time, in submission order (gloo only: module docstring).
    `inputs` need no bookkeeping: the thread reads them where the caller left them."""

    def __init__(self, name: str = "moeforge-ep", timeout_s: float = 1800.0):
        self.timeout_s = timeout_s
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._failed: list[BaseException] = []  # shared with the thread, which holds no reference to self
        threading.Thread(target=_serve, args=(self._queue, self._failed), name=name, daemon=True).start()
        weakref.finalize(self, self._queue.put, None)  # the thread ends with its stream

    def submit(self, program: Program, inputs: Sequence[torch.Tensor] = ()) -> _Job:
        if self._failed:
            raise RuntimeError("an earlier all-to-all exchange on this stream failed") from self._failed[0]
        job = _Job(program)
        self._queue.put(job)
        return job

    def progress(self) -> None:
        """Nothing to do: the thread runs every job as soon as the previous one is done."""

    def wait(self, job: _Job):
        """Block until `job` has run; its result, or its exception re-raised here."""
        if not job.done.wait(self.timeout_s):
            raise TimeoutError(f"all-to-all exchange not finished after {self.timeout_s:g}s "
                               "(a peer of the ep group is gone or started its exchanges in another order)")
        result, error, job.result, job.error = job.result, job.error, None, None  # hold nothing once waited
        if error is not None:
            raise error
        return result


def _serve(q: queue.SimpleQueue, failed: list[BaseException]) -> None:
    while True:
        job = q.get()
        if job is None:
            return
        job.run(failed)
        job = None  # keep nothing alive while blocked in get()


class _CudaJob:
    __slots__ = ("program", "epoch", "result", "done")

    def __init__(self, program: Program, epoch: int):
        self.program, self.epoch, self.result, self.done = program, epoch, None, False


class CudaCommStream(CommStream):
    """Programs on the main thread, their kernels on one CUDA stream ordered by events (module docstring).
    Uses only the public torch.cuda stream API, so comm.fake_streams can stand in for it without a GPU."""

    def __init__(self, stream: "torch.cuda.Stream | None" = None):
        self.stream = stream if stream is not None else torch.cuda.Stream()
        self._jobs: list[_CudaJob] = []  # submitted, not yet run to the end; submission order
        self._epoch = 0
        self._failed: BaseException | None = None

    def submit(self, program: Program, inputs: Sequence[torch.Tensor] = ()) -> _CudaJob:
        self._check()
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream())
        self.stream.wait_event(ready)
        for t in inputs:
            t.record_stream(self.stream)
        job = _CudaJob(program, self._epoch)
        self._jobs.append(job)
        self._resume(job)
        return job

    def progress(self) -> None:
        for job in [j for j in self._jobs if j.epoch < self._epoch]:
            self._resume(job)
        self._epoch += 1

    def wait(self, job: _CudaJob):
        self._check()
        assert job.done or job in self._jobs, "CudaCommStream.wait: not a pending job of this stream"
        while not job.done:
            self._resume(self._jobs[0])
        finished = torch.cuda.Event()
        finished.record(self.stream)
        consumer = torch.cuda.current_stream()
        result, job.result = job.result, None
        for t in _tensors(result):
            t.record_stream(consumer)
        consumer.wait_event(finished)
        return result

    def _resume(self, job: _CudaJob) -> None:
        """Run `job` to its next yield (or its end) with the comm stream current, without autograd."""
        self._check()
        try:
            with torch.no_grad(), torch.cuda.stream(self.stream):
                next(job.program)
        except StopIteration as stop:
            job.result, job.done, job.program = stop.value, True, None
            self._jobs.remove(job)
        except BaseException as e:
            self._failed = e
            self._jobs.clear()
            raise

    def _check(self) -> None:
        if self._failed is not None:
            raise RuntimeError("an earlier all-to-all exchange on this stream failed") from self._failed


def _tensors(x) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for item in x for t in _tensors(item)]
    return []
