"""comm.all_to_all.CommStream without a process group: exchanges are generators that yield objects with a
wait(); the stream runs them in submission order on its own thread, returns results to the waiter, and
after one fails refuses to run (or accept) more, so no later collective can pair with a peer's other one."""
import threading

import pytest
import torch

from moeforge.comm.all_to_all import CommStream

pytestmark = pytest.mark.timeout(60)


class _Work:
    def __init__(self, log, name, gate=None):
        self.log, self.name, self.gate = log, name, gate

    def wait(self):
        if self.gate is not None:
            assert self.gate.wait(10), "gate never opened"
        self.log.append(self.name)


def _exchange(log, name, value, gate=None):
    yield _Work(log, f"{name}.hop1", gate)
    yield _Work(log, f"{name}.hop2")
    return value, torch.is_grad_enabled(), threading.current_thread().name


def test_runs_in_submission_order_off_the_callers_thread():
    stream, log, gate = CommStream(name="test-stream", timeout_s=10), [], threading.Event()
    a = stream.submit(_exchange(log, "a", 1, gate))  # blocks on the gate: submit must not
    b = stream.submit(_exchange(log, "b", 2))
    assert log == []
    gate.set()
    assert stream.wait(b) == (2, False, "test-stream")  # b waits for a (FIFO), runs without autograd
    assert stream.wait(a)[0] == 1
    assert log == ["a.hop1", "a.hop2", "b.hop1", "b.hop2"]
    assert a.result is None and b.result is None  # the stream holds nothing once waited


def _failing(log):
    yield _Work(log, "bad.hop1")
    raise ValueError("peer sent garbage")


def test_a_failed_exchange_breaks_the_stream():
    stream, log = CommStream(timeout_s=10), []
    bad = stream.submit(_failing(log))
    queued = stream.submit(_exchange(log, "after", 3))  # queued before the failure is known
    with pytest.raises(ValueError, match="garbage"):
        stream.wait(bad)
    with pytest.raises(RuntimeError, match="earlier all-to-all exchange on this stream failed"):
        stream.wait(queued)
    assert log == ["bad.hop1"]  # the queued exchange issued nothing
    with pytest.raises(RuntimeError, match="earlier all-to-all exchange"):
        stream.submit(_exchange(log, "later", 4))


def test_wait_times_out_with_a_clear_error():
    stream, gate = CommStream(timeout_s=0.2), threading.Event()
    job = stream.submit(_exchange([], "stuck", 0, gate))
    with pytest.raises(TimeoutError, match="not finished after 0.2s"):
        stream.wait(job)
    gate.set()
