"""`moeforge doctor` and the launch preflight: what this node offers, read through NVML (nvidia-ml-py).

Reports the driver and CUDA driver version, torch and its CUDA build, each GPU with free memory, and
the health signals NVML exposes: volatile uncorrected ECC errors, retired pages (and pages pending
retirement), row-remapping failures, and XID critical-error events that arrive while we look (NVML
has no history of past XIDs; those live in the kernel log). Problems, such as more workers per node
than GPUs or a GPU with uncorrected errors, are listed and make `doctor` return 1 and `launch` stop.
Without an NVIDIA driver it says "no NVIDIA GPU; CPU/gloo" and goes on.

`gpu_report(nvml=...)` takes any object with pynvml's functions and exceptions, so tests fake NVML.
"""
from __future__ import annotations

import platform
from dataclasses import dataclass, field

from moeforge.train.nvml import nvml_str, nvml_try

NO_GPU = "no NVIDIA GPU; CPU/gloo"


@dataclass
class GpuInfo:
    index: int
    name: str
    uuid: str = ""
    memory_total: int = 0
    memory_free: int = 0
    ecc_uncorrected: int | None = None  # volatile (since the last driver reload); None: not supported
    retired_pages: int | None = None
    retired_pending: bool | None = None
    remap_failed: bool | None = None
    remap_pending: bool | None = None
    xid_events: list[int] = field(default_factory=list)


@dataclass
class GpuReport:
    available: bool
    reason: str = ""  # why no GPU report (e.g. the NVML error)
    driver: str | None = None
    cuda_driver: str | None = None
    gpus: list[GpuInfo] = field(default_factory=list)
    nproc_per_node: int | None = None
    problems: list[str] = field(default_factory=list)

    def format(self) -> str:
        lines = [f"doctor: python {platform.python_version()}, {_torch_line()}"]
        if not self.available:
            lines.append(f"doctor: {NO_GPU} ({self.reason})")
            return "\n".join(lines)
        lines.append(f"doctor: NVIDIA driver {self.driver}, CUDA driver {self.cuda_driver}, {len(self.gpus)} GPU(s)"
                     + (f", --nproc-per-node {self.nproc_per_node}" if self.nproc_per_node else ""))
        for g in self.gpus:
            health = [f"ecc_uncorrected={_na(g.ecc_uncorrected)}", f"retired_pages={_na(g.retired_pages)}"]
            if g.retired_pending:
                health.append("retirement pending")
            if g.remap_failed is not None:
                health.append(f"row_remap_failed={g.remap_failed}")
            if g.remap_pending:
                health.append("row remap pending")
            if g.xid_events:
                health.append(f"xid={g.xid_events}")
            lines.append(f"doctor:   GPU {g.index} {g.name} free {g.memory_free / 2**30:.1f} / "
                         f"{g.memory_total / 2**30:.1f} GiB, " + ", ".join(health))
        lines += [f"doctor: PROBLEM: {p}" for p in self.problems] or ["doctor: no problems found"]
        return "\n".join(lines)


def _na(x) -> str:
    return "n/a" if x is None else str(x)


def _torch_line() -> str:
    try:
        import torch

        cuda = torch.version.cuda or "none"
        return (f"torch {torch.__version__} (CUDA build {cuda}, cuda available {torch.cuda.is_available()}); "
                f"backend {'nccl' if torch.cuda.is_available() else 'gloo'}")
    except ImportError:
        return "torch not importable"


def _xid_events(nvml, handles, wait_ms: int) -> dict[int, list[int]]:
    """XID critical errors that arrive within wait_ms (NVML reports only events after registration)."""
    out: dict[int, list[int]] = {}
    try:
        es = nvml.nvmlEventSetCreate()
    except (nvml.NVMLError, AttributeError):
        return out
    try:
        index = {}
        for i, h in enumerate(handles):
            try:
                nvml.nvmlDeviceRegisterEvents(h, nvml.nvmlEventTypeXidCriticalError, es)
                index[id(h)] = i
            except nvml.NVMLError:
                pass
        while index:
            try:
                ev = nvml.nvmlEventSetWait(es, wait_ms)
            except nvml.NVMLError:  # NVMLError_Timeout: nothing (more) pending
                break
            i = next((j for j, h in enumerate(handles) if h == ev.device), 0)
            out.setdefault(i, []).append(int(ev.eventData))
    finally:
        nvml_try(nvml, "nvmlEventSetFree", es)
    return out


def gpu_report(nvml=None, nproc_per_node: int | None = None, xid_wait_ms: int = 0) -> GpuReport:
    if nvml is None:
        try:
            import pynvml as nvml
        except ImportError as e:
            return GpuReport(available=False, reason=f"nvidia-ml-py not installed: {e}")
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as e:
        return GpuReport(available=False, reason=f"{type(e).__name__}: {e}")
    try:
        rep = GpuReport(available=True, driver=nvml_str(nvml_try(nvml, "nvmlSystemGetDriverVersion")),
                        nproc_per_node=nproc_per_node)
        cuda = nvml_try(nvml, "nvmlSystemGetCudaDriverVersion")
        rep.cuda_driver = f"{cuda // 1000}.{cuda % 1000 // 10}" if isinstance(cuda, int) else None
        n = nvml.nvmlDeviceGetCount()
        handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(n)]
        for i, h in enumerate(handles):
            mem = nvml_try(nvml, "nvmlDeviceGetMemoryInfo", h)
            g = GpuInfo(index=i, name=nvml_str(nvml_try(nvml, "nvmlDeviceGetName", h)),
                        uuid=nvml_str(nvml_try(nvml, "nvmlDeviceGetUUID", h) or ""),
                        memory_total=int(getattr(mem, "total", 0)), memory_free=int(getattr(mem, "free", 0)))
            g.ecc_uncorrected = nvml_try(nvml, "nvmlDeviceGetTotalEccErrors", h,
                                         nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nvml.NVML_VOLATILE_ECC)
            pages = [nvml_try(nvml, "nvmlDeviceGetRetiredPages", h, cause) for cause in
                     (nvml.NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS,
                      nvml.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR)]
            g.retired_pages = None if all(p is None for p in pages) else sum(len(p or []) for p in pages)
            pending = nvml_try(nvml, "nvmlDeviceGetRetiredPagesPendingStatus", h)
            g.retired_pending = None if pending is None else bool(pending)
            remap = nvml_try(nvml, "nvmlDeviceGetRemappedRows", h)  # (corrected, uncorrected, pending, failed)
            if remap is not None:
                g.remap_pending, g.remap_failed = bool(remap[2]), bool(remap[3])
            rep.gpus.append(g)
        for i, xids in _xid_events(nvml, handles, xid_wait_ms).items():
            rep.gpus[i].xid_events = xids
    finally:
        nvml_try(nvml, "nvmlShutdown")
    rep.problems = problems(rep)
    return rep


def problems(rep: GpuReport) -> list[str]:
    out = []
    if rep.nproc_per_node is not None and rep.nproc_per_node > len(rep.gpus):
        out.append(f"--nproc-per-node {rep.nproc_per_node} > {len(rep.gpus)} GPU(s) on this node")
    for g in rep.gpus:
        if g.ecc_uncorrected:
            out.append(f"GPU {g.index}: {g.ecc_uncorrected} uncorrected ECC error(s) since the driver loaded")
        if g.retired_pending:
            out.append(f"GPU {g.index}: retired pages pending (reset the GPU or reboot)")
        if g.remap_failed:
            out.append(f"GPU {g.index}: row remapping failed (the GPU needs service)")
        if g.remap_pending:
            out.append(f"GPU {g.index}: row remap pending (reset the GPU)")
        if g.xid_events:
            out.append(f"GPU {g.index}: XID critical error(s) {g.xid_events}")
    return out


def doctor(nproc_per_node: int | None = None, nvml=None) -> int:
    """Print the report; 0 when usable (a CPU-only machine too), 1 when it lists problems."""
    rep = gpu_report(nvml=nvml, nproc_per_node=nproc_per_node, xid_wait_ms=100)
    print(rep.format(), flush=True)
    return 1 if rep.problems else 0
