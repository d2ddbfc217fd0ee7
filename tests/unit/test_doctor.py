"""The GPU preflight against a fake NVML (tests/_helpers.fake_nvml; faults on GPU 1)."""
import pynvml
import pytest
from _helpers import fake_nvml

from moeforge.launcher.doctor import NO_GPU, doctor, gpu_report


def test_no_driver_says_cpu_gloo_and_goes_on(capsys):
    nvml = fake_nvml(init_error=pynvml.NVMLError_LibraryNotFound(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND))
    rep = gpu_report(nvml)
    assert not rep.available and rep.problems == [] and "LibraryNotFound" in rep.reason
    assert doctor(8, nvml=nvml) == 0
    assert NO_GPU in capsys.readouterr().out


def test_real_pynvml_on_this_machine(capsys):
    """Whatever this machine has, doctor answers and returns 0 or 1 without raising."""
    assert doctor(None) in (0, 1)
    out = capsys.readouterr().out
    assert "torch" in out and ("GPU" in out)


def test_healthy_node_report(capsys):
    nvml = fake_nvml(n_gpus=2, free_gib=70)
    rep = gpu_report(nvml, nproc_per_node=2)
    assert rep.available and rep.driver == "570.86.15" and rep.cuda_driver == "12.8"
    assert [g.index for g in rep.gpus] == [0, 1] and rep.gpus[0].memory_free == 70 * 2**30
    assert rep.gpus[0].ecc_uncorrected == 0 and rep.gpus[0].retired_pages == 0 and rep.problems == []
    assert doctor(2, nvml=nvml) == 0
    out = capsys.readouterr().out
    assert "NVIDIA driver 570.86.15" in out and "GPU 1 NVIDIA H100 80GB HBM3 free 70.0 / 80.0 GiB" in out
    assert "nvmlShutdown" in nvml.calls


def test_more_workers_than_gpus_is_a_problem():
    rep = gpu_report(fake_nvml(n_gpus=2), nproc_per_node=4)
    assert rep.problems == ["--nproc-per-node 4 > 2 GPU(s) on this node"]


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(ecc=(3,)), "GPU 1: 3 uncorrected ECC error(s)"),
    (dict(pending=1), "GPU 1: retired pages pending"),
    (dict(remap=(0, 1, 0, 1)), "GPU 1: row remapping failed"),
    (dict(remap=(0, 1, 1, 0)), "GPU 1: row remap pending"),
    (dict(xids=(79,)), "GPU 1: XID critical error(s) [79]"),
])
def test_health_problems_are_reported(kwargs, fragment, capsys):
    nvml = fake_nvml(**kwargs)
    rep = gpu_report(nvml, nproc_per_node=2)
    assert any(fragment in p for p in rep.problems), rep.problems
    assert doctor(2, nvml=fake_nvml(**kwargs)) == 1
    assert "PROBLEM: " + fragment in capsys.readouterr().out


def test_retired_pages_counted_over_both_causes():
    rep = gpu_report(fake_nvml(pages=2))
    assert rep.gpus[1].retired_pages == 4 and rep.gpus[0].retired_pages == 0


def test_unsupported_queries_read_as_na(capsys):
    nvml = fake_nvml(unsupported={"nvmlDeviceGetTotalEccErrors", "nvmlDeviceGetRetiredPages",
                                  "nvmlDeviceGetRetiredPagesPendingStatus", "nvmlDeviceGetRemappedRows",
                                  "nvmlEventSetCreate"})
    rep = gpu_report(nvml)
    g = rep.gpus[0]
    assert (g.ecc_uncorrected, g.retired_pages, g.retired_pending, g.remap_failed) == (None, None, None, None)
    assert rep.problems == []
    assert doctor(None, nvml=nvml) == 0
    assert "ecc_uncorrected=n/a, retired_pages=n/a" in capsys.readouterr().out
