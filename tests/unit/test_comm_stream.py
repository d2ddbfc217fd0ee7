"""comm.streams without a process group: programs are generators that yield before a host read and return
a result. ThreadCommStream runs them in submission order on its own thread; CudaCommStream runs them on
the caller's thread under comm.fake_streams (the torch.cuda stream API faked on CPU), pausing each at its
yields until progress() says the caller queued other work. Both refuse to run more after one fails, so
no later collective can pair with a peer's other one. The fakes themselves raise on unordered or
unrecorded cross-stream uses."""
import threading

import pytest
import torch

from moeforge.comm.fake_streams import StreamOrderError, fake_cuda_streams
from moeforge.comm.streams import CommStream, CudaCommStream, ThreadCommStream

pytestmark = pytest.mark.timeout(60)


def _exchange(log, name, value, gate=None):
    log.append(f"{name}.counts")
    yield  # a host read next
    if gate is not None:
        assert gate.wait(10), "gate never opened"
    log.append(f"{name}.payload")
    return value, torch.is_grad_enabled(), threading.current_thread().name


def test_thread_runs_in_submission_order_off_the_callers_thread():
    stream, log, gate = ThreadCommStream(name="test-stream", timeout_s=10), [], threading.Event()
    a = stream.submit(_exchange(log, "a", 1, gate))  # blocks on the gate: submit must not
    b = stream.submit(_exchange(log, "b", 2))
    stream.progress()  # nothing to do for a thread
    gate.set()
    assert stream.wait(b) == (2, False, "test-stream")  # b waits for a (FIFO), runs without autograd
    assert stream.wait(a)[0] == 1
    assert log == ["a.counts", "a.payload", "b.counts", "b.payload"]
    assert a.result is None and b.result is None  # the stream holds nothing once waited


def _failing(log):
    log.append("bad.counts")
    yield
    raise ValueError("peer sent garbage")


@pytest.mark.parametrize("kind", ["thread", "cuda"])
def test_a_failed_exchange_breaks_the_stream(kind):
    with fake_cuda_streams(devices=("cpu",)):
        stream, log = (ThreadCommStream(timeout_s=10) if kind == "thread" else CudaCommStream()), []
        bad = stream.submit(_failing(log))
        queued = stream.submit(_exchange(log, "after", 3))  # queued before the failure is known
        with pytest.raises(ValueError, match="garbage"):
            stream.wait(bad)
        with pytest.raises(RuntimeError, match="earlier all-to-all exchange on this stream failed"):
            stream.wait(queued)
        assert "after.payload" not in log  # the queued exchange issued nothing after the failure
        with pytest.raises(RuntimeError, match="earlier all-to-all exchange"):
            stream.submit(_exchange(log, "later", 4))


def test_thread_wait_times_out_with_a_clear_error():
    stream, gate = ThreadCommStream(timeout_s=0.2), threading.Event()
    job = stream.submit(_exchange([], "stuck", 0, gate))
    with pytest.raises(TimeoutError, match="not finished after 0.2s"):
        stream.wait(job)
    gate.set()


def test_cuda_host_reads_wait_for_one_more_progress_in_submission_order():
    """A job's host read (after its first yield) runs at the second progress() after its submit: by then
    the caller has queued other work behind it. Deterministic: only the call sequence decides."""
    with fake_cuda_streams(devices=("cpu",)) as flog:
        stream, log = CudaCommStream(), []
        a = stream.submit(_exchange(log, "a", 1))
        assert log == ["a.counts"]  # count exchange queued at submit, on the caller's thread
        stream.progress()
        b = stream.submit(_exchange(log, "b", 2))
        assert log == ["a.counts", "b.counts"]
        stream.progress()  # a is one progress old: its host read + payload; b waits
        assert log == ["a.counts", "b.counts", "a.payload"]
        assert stream.wait(b) == (2, False, threading.current_thread().name)
        assert stream.wait(a)[0] == 1
        assert log == ["a.counts", "b.counts", "a.payload", "b.payload"]
        # per submit the comm stream waits on the caller's stream; per wait the caller's on the comm stream
        waits = [e[1] for e in flog.entries if e[0] == "wait_event"]
        assert waits == [stream.stream.name] * 2 + ["default"] * 2


def test_cuda_stream_orders_inputs_and_results_across_streams():
    with fake_cuda_streams(devices=("cpu",)) as flog:
        stream = CudaCommStream()
        x = torch.arange(6.0) + 1  # made on the default stream

        def double(x):
            y = x * 2  # on the comm stream: needs the submit's event and record_stream
            yield
            return y

        out = stream.wait(stream.submit(double(x), (x,)))
        assert torch.equal(out + 0, (torch.arange(6.0) + 1) * 2)  # read on the default stream: ordered
        names = [(e[0], e[1]) for e in flog.entries]
        comm = stream.stream.name
        assert names == [("record", "default"), ("wait_event", comm), ("record_stream", comm),
                         ("record", comm), ("record_stream", "default"), ("wait_event", "default")]


def test_fakes_reject_unordered_and_unrecorded_cross_stream_uses():
    with fake_cuda_streams(devices=("cpu",)):
        side = torch.cuda.Stream()
        x = torch.ones(3)
        with torch.cuda.stream(side):
            with pytest.raises(StreamOrderError, match="record_stream"):
                x + 1  # allocated on default, used on side without record_stream
            x.record_stream(side)
            with pytest.raises(StreamOrderError, match="without waiting"):
                x + 1  # recorded, but side never waited for the write
        ev = torch.cuda.Event()
        ev.record(torch.cuda.default_stream())
        side.wait_event(ev)
        with torch.cuda.stream(side):
            y = x + 1  # ordered and recorded: fine
        with pytest.raises(StreamOrderError, match="never recorded"):
            torch.cuda.default_stream().wait_event(torch.cuda.Event())
        y.record_stream(torch.cuda.default_stream())
        with pytest.raises(StreamOrderError, match="without waiting"):
            y + 1
        with pytest.raises(StreamOrderError, match="enable_timing"):
            ev.elapsed_time(ev)
        t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0.record()
        t1.record()
        assert t0.elapsed_time(t1) == 0.0


def test_for_device_picks_the_executor():
    assert isinstance(CommStream.for_device("cpu"), ThreadCommStream)
    assert isinstance(CommStream.for_device(None), ThreadCommStream)
    with fake_cuda_streams():
        assert isinstance(CommStream.for_device("cuda:0"), CudaCommStream)
