"""GPU telemetry during training, read through NVML (nvidia-ml-py): what `nvidia-smi` would show,
every `logging.telemetry_interval` steps, for the GPU this rank trains on.

A sample holds utilisation (SM and memory), memory used, power, temperature, SM/memory clocks, the
clock-event (throttle) reason bitmask, volatile ECC error counts, and XID critical errors that
arrived since the last sample (NVML only reports events after we register for them, so an XID
before the run started is in the kernel log, not here). A new uncorrected ECC error or an XID is
also printed as a warning line from whichever rank sees it.

On a CPU run, with telemetry switched off, or without a usable NVML this is a no-op that says so
in one line. `GpuTelemetry(nvml=...)` takes any object with pynvml's functions and exceptions, so
tests fake NVML (as launcher/doctor.py does).
"""
from __future__ import annotations

import os

import torch

from .nvml import nvml_str, nvml_try


class GpuTelemetry:
    def __init__(self, interval: int, device: torch.device | None, nvml=None, rank: int = 0, log=print):
        self.interval, self.rank, self.log = interval, rank, log  # log: warnings, from any rank
        self.active = False
        self._events = None
        notice = log if rank == 0 else (lambda msg: None)  # one-line notices: rank 0 only
        if interval <= 0:
            return
        if device is None or device.type != "cuda":
            notice("telemetry: CPU run, no GPU telemetry (NVML samples only GPU runs)")
            return
        if nvml is None:
            try:
                import pynvml as nvml
            except ImportError as e:
                notice(f"telemetry: off, nvidia-ml-py not importable ({e})")
                return
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as e:
            notice(f"telemetry: off, NVML unavailable ({type(e).__name__}: {e})")
            return
        self.nvml = nvml
        self.index = device.index or 0
        self.handle = _handle(nvml, self.index)
        self.name = nvml_str(nvml_try(nvml, "nvmlDeviceGetName", self.handle))
        self.active = True
        self._ecc_seen = self._ecc(nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED) or 0
        try:
            self._events = nvml.nvmlEventSetCreate()
            nvml.nvmlDeviceRegisterEvents(self.handle, nvml.nvmlEventTypeXidCriticalError, self._events)
        except (nvml.NVMLError, AttributeError):
            self._events = None  # e.g. not supported in a container without the event device
        notice(f"telemetry: NVML on GPU {self.index} ({self.name}) every {interval} steps")

    def _ecc(self, kind) -> int | None:
        return nvml_try(self.nvml, "nvmlDeviceGetTotalEccErrors", self.handle, kind, self.nvml.NVML_VOLATILE_ECC)

    def _xids(self) -> list[int]:
        out = []
        while self._events is not None:
            try:
                ev = self.nvml.nvmlEventSetWait(self._events, 0)
            except self.nvml.NVMLError:  # NVMLError_Timeout: nothing pending
                break
            out.append(int(ev.eventData))
        return out

    def sample(self, step: int) -> dict:
        """{} unless active and step is a multiple of the interval; else the `gpu/...` values."""
        if not self.active or step % self.interval:
            return {}
        nv, h = self.nvml, self.handle
        util = nvml_try(nv, "nvmlDeviceGetUtilizationRates", h)
        mem = nvml_try(nv, "nvmlDeviceGetMemoryInfo", h)
        power = nvml_try(nv, "nvmlDeviceGetPowerUsage", h)  # milliwatts
        reasons = nvml_try(nv, "nvmlDeviceGetCurrentClocksEventReasons", h)
        if reasons is None:
            reasons = nvml_try(nv, "nvmlDeviceGetCurrentClocksThrottleReasons", h)
        out = {
            "gpu/util_pct": getattr(util, "gpu", None),
            "gpu/mem_util_pct": getattr(util, "memory", None),
            "gpu/mem_used_gib": None if mem is None else round(mem.used / 2**30, 3),
            "gpu/power_w": None if power is None else power / 1000,
            "gpu/temp_c": nvml_try(nv, "nvmlDeviceGetTemperature", h, nv.NVML_TEMPERATURE_GPU),
            "gpu/sm_clock_mhz": nvml_try(nv, "nvmlDeviceGetClockInfo", h, nv.NVML_CLOCK_SM),
            "gpu/mem_clock_mhz": nvml_try(nv, "nvmlDeviceGetClockInfo", h, nv.NVML_CLOCK_MEM),
            "gpu/clock_event_reasons": reasons,
            "gpu/ecc_uncorrected": self._ecc(nv.NVML_MEMORY_ERROR_TYPE_UNCORRECTED),
            "gpu/ecc_corrected": self._ecc(nv.NVML_MEMORY_ERROR_TYPE_CORRECTED),
            "gpu/xid": self._xids(),
        }
        where = f"telemetry: rank {self.rank} GPU {self.index} ({self.name}) at step {step}"
        if out["gpu/xid"]:
            self.log(f"{where}: XID critical error(s) {out['gpu/xid']}")
        ecc = out["gpu/ecc_uncorrected"]
        if ecc is not None and ecc > self._ecc_seen:
            self.log(f"{where}: {ecc - self._ecc_seen} new uncorrected ECC error(s) ({ecc} since the driver loaded)")
            self._ecc_seen = ecc
        return out

    def close(self) -> None:
        if not self.active:
            return
        if self._events is not None:
            nvml_try(self.nvml, "nvmlEventSetFree", self._events)
        nvml_try(self.nvml, "nvmlShutdown")
        self.active = False


def _handle(nvml, index: int):
    """The NVML handle of torch's cuda:<index>: by UUID where torch knows it (NVML counts GPUs without
    CUDA_VISIBLE_DEVICES), else through CUDA_VISIBLE_DEVICES, else by index."""
    if torch.cuda.is_available():
        try:
            uuid = str(torch.cuda.get_device_properties(index).uuid)
            return nvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
        except (AttributeError, RuntimeError, nvml.NVMLError):
            pass
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if index < len(visible) and visible[index].isdigit():
        index = int(visible[index])
    return nvml.nvmlDeviceGetHandleByIndex(index)
