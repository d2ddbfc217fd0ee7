"""Test doubles and harnesses that more than one test file uses (one copy of each).

Test files import it as `from _helpers import ...` (pytest puts tests/, the folder of the root
conftest.py, on sys.path). `python tests/_helpers.py FILE` is the Triton-interpreter worker below.
"""
import importlib.util
import json
import os
import subprocess
import sys
import types
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]


def fake_nvml(n_gpus=2, free_gib=20, ecc=(0,), pages=0, pending=0, remap=(0, 0, 0, 0), xids=(), faulty_gpu=1,
              unsupported=(), init_error=None):
    """An object answering like pynvml (its names, constants and exceptions; our answers) for n_gpus
    H100s with 80 GiB, free_gib of it free, busy (97% util, 612.5 W, 71 C, 3 corrected ECC errors).

    Only GPU `faulty_gpu` has faults: `ecc` the uncorrected ECC counts its successive reads return (the
    last one repeats), `pages` retired pages per cause, `pending` retirement, `remap` (corrected,
    uncorrected, pending, failed) rows, and the XID critical errors `xids` (one event each). Queries
    named in `unsupported` raise NVMLError_NotSupported; nvmlInit raises `init_error`. `.calls` lists
    every call in order. Handles are "h0", "h1", ...; any UUID gives "h0".
    """
    import pynvml

    m = types.SimpleNamespace()
    for name in dir(pynvml):  # constants and exception classes
        if name.startswith(("NVML_", "NVMLError", "nvmlEventType")):
            setattr(m, name, getattr(pynvml, name))
    m.calls = []
    bad = f"h{faulty_gpu}"
    ecc = list(ecc)

    def q(name, value):
        def fn(*args):
            m.calls.append(name)
            if name in unsupported:
                raise pynvml.NVMLError_NotSupported(pynvml.NVML_ERROR_NOT_SUPPORTED)
            return value(*args) if callable(value) else value
        setattr(m, name, fn)

    def init():
        m.calls.append("nvmlInit")
        if init_error is not None:
            raise init_error

    def total_ecc(h, kind, counter):
        if kind != pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED:
            return 3
        if h != bad:
            return 0
        return ecc.pop(0) if len(ecc) > 1 else ecc[0]

    events = [types.SimpleNamespace(device=bad, eventData=x, eventType=pynvml.nvmlEventTypeXidCriticalError)
              for x in xids]

    def wait(es, ms):
        m.calls.append("nvmlEventSetWait")
        if events:
            return events.pop(0)
        raise pynvml.NVMLError_Timeout(pynvml.NVML_ERROR_TIMEOUT)

    m.nvmlInit = init
    m.nvmlEventSetWait = wait
    q("nvmlShutdown", None)
    q("nvmlSystemGetDriverVersion", "570.86.15")
    q("nvmlSystemGetCudaDriverVersion", 12080)
    q("nvmlDeviceGetCount", n_gpus)
    q("nvmlDeviceGetHandleByIndex", lambda i: f"h{i}")
    q("nvmlDeviceGetHandleByUUID", lambda u: "h0")
    q("nvmlDeviceGetName", "NVIDIA H100 80GB HBM3")
    q("nvmlDeviceGetUUID", lambda h: f"GPU-{h}")
    q("nvmlDeviceGetMemoryInfo", types.SimpleNamespace(total=80 * 2**30, free=free_gib * 2**30,
                                                       used=(80 - free_gib) * 2**30))
    q("nvmlDeviceGetUtilizationRates", types.SimpleNamespace(gpu=97, memory=41))
    q("nvmlDeviceGetPowerUsage", 612_500)  # milliwatts
    q("nvmlDeviceGetTemperature", 71)
    q("nvmlDeviceGetClockInfo", lambda h, kind: 1980 if kind == pynvml.NVML_CLOCK_SM else 2619)
    q("nvmlDeviceGetCurrentClocksEventReasons", 0)
    q("nvmlDeviceGetTotalEccErrors", total_ecc)
    q("nvmlDeviceGetRetiredPages", lambda h, cause: [0x1000] * pages if h == bad else [])
    q("nvmlDeviceGetRetiredPagesPendingStatus", lambda h: pending if h == bad else 0)
    q("nvmlDeviceGetRemappedRows", lambda h: remap if h == bad else (0, 0, 0, 0))
    q("nvmlEventSetCreate", "es")
    q("nvmlDeviceRegisterEvents", None)
    q("nvmlEventSetFree", None)
    return m


def run_interpreted(test_file: str, timeout_s: float = 300) -> dict:
    """`_worker()` of `test_file`, run under the Triton interpreter (TRITON_INTERPRET=1) on CPU.

    The interpreter must be on before triton decorates the kernels, and another test may already have
    imported triton in this process, so the worker runs in a fresh process (this file as a script);
    its dict comes back as JSON. triton is a dev dependency: without it this fails, it does not skip.
    """
    assert importlib.util.find_spec("triton"), "triton is not installed (pip install -e '.[dev]')"
    # one intra-op thread: the worker is Python-bound, and spare threads only spin on a loaded 2-core box
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, __file__, os.path.abspath(test_file)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout_s)
    assert proc.returncode == 0, f"interpreter worker failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":  # the worker process of run_interpreted
    os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
    spec = importlib.util.spec_from_file_location("interpreted_test", sys.argv[1])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    print(json.dumps(module._worker()))
