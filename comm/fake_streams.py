"""fake_cuda_streams(): torch.cuda's stream/event API without a GPU, checking the cross-stream rules.

comm.streams.CudaCommStream (and the pipeline runtime's device timers) call the real API:
torch.cuda.Stream, Event (record, wait, elapsed_time), current_stream, stream(...), Stream.wait_event
and Tensor.record_stream. This machine and CI have no GPU, so inside this context manager those
names are recording fakes, and a TorchDispatchMode follows every op to check the two rules a GPU
would break silently:

1. ordering: a tensor last written on stream A and read on stream B != A needs B to have waited on an
   event that A recorded after that write (tracked with one vector clock per stream: an op advances
   its stream's own entry, Event.record snapshots the clock, Stream.wait_event merges the snapshot);
   waiting on an event that was never recorded is an error too (CUDA ignores it);
2. lifetime: a tensor allocated on stream A and used on stream B != A must have been
   `record_stream(B)`ed first, or the caching allocator may hand its memory to A's next allocation
   while B still reads it. (CUDA only needs the call before the free; asking for it before the use
   is stricter, and decidable at the use.)
Either raises StreamOrderError naming the op, the streams and the fix. Tensors are tracked per
storage on the devices in `devices` ("cuda" for the dry run's fake tensors; tests pass "cpu" to run
CudaCommStream on real CPU tensors); a tensor made before the context (a parameter, a module
constant) has no allocating stream and is exempt from rule 2: its owner keeps it alive. c10d collectives are logged with the stream they were issued on (their schemas do not
mark their output as written: the first tensor argument is taken as the output).

    with fake_cuda_streams(devices=("cpu",)) as log:
        ...
    log.collectives()   # [(stream name, op name)] in issue order
    log.entries         # every stream API call, collective and host read, in order

Use it inside a FakeTensorMode (enter FakeTensorMode first): the checking mode then sees the fake
tensors. Streams and events are plain Python objects; `Event.elapsed_time` returns 0.0 (there is no
device time to measure) and is logged.
"""
from __future__ import annotations

import contextlib
import itertools
import weakref
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class StreamOrderError(RuntimeError):
    """A cross-stream use that a GPU would run unordered or on reused memory."""


class StreamLog:
    """What happened inside fake_cuda_streams: the streams, the log, the per-storage tracking."""

    def __init__(self, devices: tuple[str, ...]):
        self.devices = set(devices)
        self.entries: list[tuple] = []
        self.streams: list[FakeStream] = []
        self._seq = itertools.count(1)
        self.default = FakeStream(log=self, name="default")
        self.current = self.default
        self._writer: dict[int, tuple[FakeStream, int, str]] = {}  # storage -> (stream, clock, op) of its last write
        self._alloc: dict[int, FakeStream] = {}  # storage -> stream it was allocated on
        self._recorded: dict[int, set[int]] = {}  # storage -> ids of streams it was record_stream'ed onto
        self._live: set[int] = set()  # storages seen, alive

    def collectives(self) -> list[tuple[str, str]]:
        return [(s, op) for kind, s, op in (e[:3] for e in self.entries) if kind == "collective"]

    # ---- the checks (called by _Checker for every op) -------------------------------------------------
    def _key(self, t: torch.Tensor) -> int | None:
        """The tensor's storage (views share it), tracked until that storage dies."""
        if t.device.type not in self.devices:
            return None
        storage = t.untyped_storage()  # one Python object per storage for its whole life
        key = id(storage)
        if key not in self._live:
            self._live.add(key)
            weakref.finalize(storage, self._forget, key)
        return key

    def _forget(self, key: int) -> None:
        for table in (self._live, self._writer, self._alloc, self._recorded):
            table.discard(key) if isinstance(table, set) else table.pop(key, None)

    def _read(self, t: torch.Tensor, s: "FakeStream", op: str) -> None:
        key = self._key(t)
        if key is None:
            return
        alloc = self._alloc.get(key)
        if alloc is not None and alloc is not s and s.id not in self._recorded.get(key, ()):
            raise StreamOrderError(
                f"{op} on stream {s.name} uses a tensor {tuple(t.shape)} allocated on stream {alloc.name} that was "
                f"not record_stream'ed onto {s.name}: call t.record_stream(<{s.name}>) before the use, or the "
                f"caching allocator may reuse its memory while {s.name} still reads it")
        w = self._writer.get(key)
        if w is not None and w[0] is not s and s.clock.get(w[0].id, 0) < w[1]:
            raise StreamOrderError(
                f"{op} on stream {s.name} reads a tensor {tuple(t.shape)} written by {w[2]} on stream {w[0].name} "
                f"without waiting for it: record an Event on {w[0].name} after the write and "
                f"{s.name}.wait_event(it) before the read")

    def _op(self, func, args, kwargs, run):
        s, name = self.current, str(func)
        schema = func._schema
        values = list(args) + [kwargs.get(a.name) for a in schema.arguments[len(args):]]
        tensors = [(a, [t for t in tree_leaves(v) if isinstance(t, torch.Tensor)])
                   for a, v in zip(schema.arguments, values)]
        for _, ts in tensors:
            for t in ts:
                self._read(t, s, name)
        out = run()
        s.clock[s.id] += 1
        stamp = (s, s.clock[s.id], name)
        collective = func.namespace == "c10d"
        written = [t for i, (a, ts) in enumerate(tensors) for t in ts
                   if (a.alias_info is not None and a.alias_info.is_write) or (collective and i == 0)]
        for r, o in zip(schema.returns, out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(o, torch.Tensor) and (key := self._key(o)) is not None and r.alias_info is None:
                self._alloc[key], self._writer[key] = s, stamp  # a fresh tensor: allocated here
        for t in written:
            if (key := self._key(t)) is not None:
                self._writer[key] = stamp
        if collective:
            self.entries.append(("collective", s.name, name))
        elif func is torch.ops.aten._local_scalar_dense.default:
            self.entries.append(("host_read", s.name, name))
        return out


class FakeStream:
    """torch.cuda.Stream stand-in: an id, a name, a vector clock."""

    def __init__(self, device=None, priority: int = 0, *, log: StreamLog | None = None, name: str | None = None):
        self.log = log if log is not None else _active()
        self.id = len(self.log.streams)
        self.name = name or f"stream{self.id}"
        self.clock: dict[int, int] = {self.id: 0}
        self.log.streams.append(self)

    def wait_event(self, event: "FakeEvent") -> None:
        if event.snapshot is None:
            raise StreamOrderError(f"stream {self.name} waits on event {event.id}, which was never recorded "
                                   "(CUDA would not wait at all)")
        for k, v in event.snapshot.items():
            self.clock[k] = max(self.clock.get(k, 0), v)
        self.log.entries.append(("wait_event", self.name, event.id))

    def wait_stream(self, other: "FakeStream") -> None:
        self.wait_event(other.record_event())

    def record_event(self, event: "FakeEvent | None" = None) -> "FakeEvent":
        event = event if event is not None else FakeEvent()
        event.record(self)
        return event

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        self.log.entries.append(("host_sync", self.name, "Stream.synchronize"))

    def __repr__(self) -> str:
        return f"FakeStream({self.name})"


class FakeEvent:
    """torch.cuda.Event stand-in: remembers the stream that recorded it and that stream's clock."""

    _ids = itertools.count()

    def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False):
        self.log = _active()
        self.id = next(FakeEvent._ids)
        self.enable_timing = enable_timing
        self.stream: FakeStream | None = None
        self.snapshot: dict[int, int] | None = None

    def record(self, stream: FakeStream | None = None) -> None:
        stream = stream if stream is not None else self.log.current
        self.stream, self.snapshot = stream, dict(stream.clock)
        self.log.entries.append(("record", stream.name, self.id))

    def wait(self, stream: FakeStream | None = None) -> None:
        (stream if stream is not None else self.log.current).wait_event(self)

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        self._recorded("synchronize")
        self.log.entries.append(("host_sync", self.stream.name, "Event.synchronize"))

    def elapsed_time(self, end: "FakeEvent") -> float:
        for e in (self, end):
            e._recorded("elapsed_time")
            if not e.enable_timing:
                raise StreamOrderError(f"event {e.id}: elapsed_time needs Event(enable_timing=True)")
        self.log.entries.append(("elapsed_time", self.stream.name, (self.id, end.id)))
        return 0.0

    def _recorded(self, what: str) -> None:
        if self.snapshot is None:
            raise StreamOrderError(f"event {self.id}: {what} before record()")


class _Checker(TorchDispatchMode):
    def __init__(self, log: StreamLog):
        super().__init__()
        self.log = log

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        return self.log._op(func, args, kwargs, lambda: func(*args, **kwargs))


_logs: list[StreamLog] = []


def _active() -> StreamLog:
    if not _logs:
        raise RuntimeError("a fake CUDA stream or event outside fake_cuda_streams()")
    return _logs[-1]


@contextlib.contextmanager
def fake_cuda_streams(devices: tuple[str, ...] = ("cuda",)):
    """Inside: torch.cuda's stream/event API and Tensor.record_stream are the checking fakes above;
    yields the StreamLog."""
    log = StreamLog(devices)

    @contextlib.contextmanager
    def stream(s: FakeStream | None):
        if s is None:
            yield
            return
        before, log.current = log.current, s
        try:
            yield
        finally:
            log.current = before

    def set_stream(s: FakeStream) -> None:
        log.current = s

    def record_stream(t: torch.Tensor, s: FakeStream) -> None:
        if (key := log._key(t)) is not None:
            log._recorded.setdefault(key, set()).add(s.id)
        log.entries.append(("record_stream", s.name, tuple(t.shape)))

    patches = {"Stream": FakeStream, "Event": FakeEvent, "stream": stream, "set_stream": set_stream,
               "current_stream": lambda device=None: log.current, "default_stream": lambda device=None: log.default}
    _logs.append(log)
    try:
        with contextlib.ExitStack() as stack:
            for name, fake in patches.items():
                stack.enter_context(mock.patch.object(torch.cuda, name, fake))
            stack.enter_context(mock.patch.object(torch.Tensor, "record_stream", record_stream))
            stack.enter_context(_Checker(log))
            yield log
    finally:
        _logs.remove(log)
