"""Two NVML helpers shared by GPU telemetry (train/telemetry.py) and `moeforge doctor` (launcher/doctor.py).

`nvml` is pynvml or any object with its functions and exceptions (tests pass a fake)."""
from __future__ import annotations


def nvml_str(x) -> str:
    """NVML returns bytes from older pynvml versions and str from newer ones."""
    return x.decode() if isinstance(x, bytes) else str(x)


def nvml_try(nvml, fn: str, *args):
    """Call an NVML query; None where the GPU or driver does not support it."""
    try:
        return getattr(nvml, fn)(*args)
    except (nvml.NVMLError, AttributeError):
        return None
