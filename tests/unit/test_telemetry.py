"""GPU telemetry against a fake NVML (tests/_helpers.fake_nvml; telemetry watches GPU 0)."""
import pynvml
import pytest
import torch
from _helpers import fake_nvml

from moeforge.train.telemetry import GpuTelemetry

CUDA0 = torch.device("cuda", 0)


def test_cpu_run_is_a_noop_with_one_notice():
    lines = []
    tel = GpuTelemetry(10, torch.device("cpu"), log=lines.append)
    assert not tel.active and tel.sample(10) == {} and len(lines) == 1 and "CPU run" in lines[0]
    tel.close()
    lines.clear()
    assert not GpuTelemetry(10, torch.device("cpu"), rank=3, log=lines.append).active and lines == []  # rank 0 says it
    assert not GpuTelemetry(0, CUDA0, nvml=fake_nvml(), log=lines.append).active and lines == []  # off: silent


def test_no_driver_is_a_noop_with_the_reason():
    lines = []
    nvml = fake_nvml(init_error=pynvml.NVMLError_LibraryNotFound(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND))
    tel = GpuTelemetry(5, CUDA0, nvml=nvml, log=lines.append)
    assert not tel.active and tel.sample(5) == {} and "LibraryNotFound" in lines[0]


def test_samples_every_n_steps_in_plain_units():
    lines = []
    nvml = fake_nvml()
    tel = GpuTelemetry(5, CUDA0, nvml=nvml, log=lines.append)
    assert tel.active and "every 5 steps" in lines[0]
    assert tel.sample(3) == {}
    s = tel.sample(10)
    assert s == {"gpu/util_pct": 97, "gpu/mem_util_pct": 41, "gpu/mem_used_gib": 60.0, "gpu/power_w": 612.5,
                 "gpu/temp_c": 71, "gpu/sm_clock_mhz": 1980, "gpu/mem_clock_mhz": 2619,
                 "gpu/clock_event_reasons": 0, "gpu/ecc_uncorrected": 0, "gpu/ecc_corrected": 3, "gpu/xid": []}
    assert len(lines) == 1  # nothing to warn about
    tel.close()
    assert "nvmlShutdown" in nvml.calls and "nvmlEventSetFree" in nvml.calls and not tel.active


def test_xid_and_new_ecc_errors_are_reported_from_any_rank():
    lines = []
    tel = GpuTelemetry(1, CUDA0, nvml=fake_nvml(xids=(79, 48), ecc=(0, 0, 2), faulty_gpu=0), rank=5, log=lines.append)
    assert lines == []  # rank 5: no notice
    s = tel.sample(1)
    assert s["gpu/xid"] == [79, 48] and s["gpu/ecc_uncorrected"] == 0
    assert lines == ["telemetry: rank 5 GPU 0 (NVIDIA H100 80GB HBM3) at step 1: XID critical error(s) [79, 48]"]
    s = tel.sample(2)
    assert s["gpu/xid"] == [] and s["gpu/ecc_uncorrected"] == 2
    assert "2 new uncorrected ECC error(s)" in lines[-1]
    tel.sample(3)
    assert len(lines) == 2  # the same count again: no new warning


def test_unsupported_queries_give_none():
    nvml = fake_nvml(unsupported=("nvmlDeviceGetPowerUsage", "nvmlDeviceGetTotalEccErrors", "nvmlEventSetCreate",
                                  "nvmlDeviceGetCurrentClocksEventReasons"))
    s = GpuTelemetry(1, CUDA0, nvml=nvml, log=lambda m: None).sample(1)
    assert s["gpu/power_w"] is None and s["gpu/ecc_uncorrected"] is None and s["gpu/xid"] == []
    assert s["gpu/util_pct"] == 97


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_real_nvml_on_this_gpu():
    tel = GpuTelemetry(1, CUDA0, log=print)
    s = tel.sample(1)
    tel.close()
    assert 0 <= s["gpu/util_pct"] <= 100 and s["gpu/mem_used_gib"] > 0 and s["gpu/temp_c"] > 0
