"""A CUDA device without a GPU: what the dry run (train/dryrun.py) runs the real training step on.

Users train on NVIDIA GPUs; this machine and CI have none. To prove the GPU path on CPU, the dry run
runs the same code with three fakes, each at the lowest level the code reaches:

- tensors: `FakeTensorMode` gives `device="cuda"` tensors that have a shape, a dtype and a device but
  no storage; every op runs its shape rules only, and an op that mixes a cuda and a cpu tensor raises
  (FakeTensorDeviceMismatchError), as on a GPU.
- the device: the CPU build of torch has no CUDA device guard (Python indexing, `x[:, :T]`, opens one on
  its tensor's device) and no CUDA accelerator (backward asks the accelerator for its streams). A small
  C++ library registers a no-op `DeviceGuardImplInterface` for CUDA and CUDA hooks that say CUDA exists.
  ATen settles its hooks the first time anything asks, during `import torch`, so the library is loaded
  before torch (launcher/dryrun.py); it is compiled once per machine (torch.utils.cpp_extension, g++
  and ninja, ~30 s, cached under TORCH_EXTENSIONS_DIR).
- the runtime: `fake_cuda_runtime` answers the torch.cuda calls the code makes (is_available,
  device_count, set_device, current_device, synchronize, the memory statistics) as a machine with
  `n_devices` GPUs would, and the stream/event API through comm.fake_streams (which also checks the
  cross-stream ordering rules). `synchronize` reports to `on_sync`, the dry run's host-sync counter.

Parameter init draws on CPU generators (model.transformer.init_weights), so it needs no CUDA generator.
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable
from unittest import mock

import torch

_GUARD_SRC = r"""
#include <torch/extension.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <ATen/detail/CUDAHooksInterface.h>

namespace moeforge_fake {
// A CUDA device guard that switches nothing (fake tensors have no memory) and whose streams and events
// are no-ops (the autograd engine orders gradient accumulation on the device's streams with them).
struct FakeCudaGuard final : public c10::impl::DeviceGuardImplInterface {
  c10::DeviceType type() const override { return c10::DeviceType::CUDA; }
  c10::Device exchangeDevice(c10::Device d) const override {
    auto old = cur_; cur_ = d.index(); return c10::Device(c10::DeviceType::CUDA, old); }
  c10::Device getDevice() const override { return c10::Device(c10::DeviceType::CUDA, cur_); }
  void setDevice(c10::Device d) const override { cur_ = d.index(); }
  void uncheckedSetDevice(c10::Device d) const noexcept override { cur_ = d.index(); }
  c10::Stream getStream(c10::Device d) const override { return c10::Stream(c10::Stream::DEFAULT, d); }
  c10::Stream exchangeStream(c10::Stream s) const override { return s; }
  c10::DeviceIndex deviceCount() const noexcept override { return 8; }
  void record(void** event, const c10::Stream&, const c10::DeviceIndex, const c10::EventFlag) const override {
    static int token; *event = &token; }
  void block(void*, const c10::Stream&) const override {}
  bool queryEvent(void*) const override { return true; }
  bool queryStream(const c10::Stream&) const override { return true; }
  void synchronizeStream(const c10::Stream&) const override {}
  void synchronizeEvent(void*) const override {}
  void synchronizeDevice(const c10::DeviceIndex) const override {}
  static thread_local c10::DeviceIndex cur_;
};
thread_local c10::DeviceIndex FakeCudaGuard::cur_ = 0;

// at::hasCUDA(): registered under the key ATen looks up ("CUDAHooks"), which a CPU build leaves empty.
struct CUDAHooks final : public at::CUDAHooksInterface {
  explicit CUDAHooks(at::CUDAHooksArgs) {}
  bool hasCUDA() const override { return true; }
  bool isBuilt() const override { return true; }
  bool isAvailable() const override { return true; }
  c10::DeviceIndex deviceCount() const override { return 8; }
  c10::DeviceIndex getCurrentDevice() const override { return 0; }
  bool hasPrimaryContext(c10::DeviceIndex) const override { return true; }
  bool isPinnedPtr(const void*) const override { return false; }
};
}  // namespace moeforge_fake

C10_REGISTER_GUARD_IMPL(CUDA, moeforge_fake::FakeCudaGuard);
namespace at { C10_REGISTER_CLASS(CUDAHooksRegistry, CUDAHooks, moeforge_fake::CUDAHooks); }
"""


LIBRARY = "moeforge_fake_cuda"


def build_library() -> str:
    """Compile the fake CUDA guard and hooks (once per machine: ninja skips an unchanged source) and
    return the shared library's path. `python -m moeforge.train.fake_device` prints it."""
    from torch.utils.cpp_extension import _get_build_directory, load_inline

    try:  # the ninja wheel (a dependency) when no system ninja is on PATH
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass
    load_inline(LIBRARY, cpp_sources=_GUARD_SRC, is_python_module=False, verbose=False)
    return os.path.join(_get_build_directory(LIBRARY, False), f"{LIBRARY}.so")


def _no_values(*_a, **_k) -> int:
    return 0


@contextlib.contextmanager
def fake_cuda_runtime(n_devices: int, memory_bytes: int, on_sync: Callable[[str], None]):
    """torch.cuda as a machine with n_devices GPUs of memory_bytes each (inside a FakeTensorMode)."""
    from moeforge.comm.fake_streams import FakeEvent, FakeStream, fake_cuda_streams

    current = [0]

    def set_device(d) -> None:
        current[0] = torch.device("cuda", d).index if not isinstance(d, int) else d

    class _Props:
        name, total_memory, major, minor, multi_processor_count = "fake-cuda", memory_bytes, 9, 0, 132

    patches = {
        "is_available": lambda: True, "device_count": lambda: n_devices, "current_device": lambda: current[0],
        "set_device": set_device, "synchronize": lambda device=None: on_sync("torch.cuda.synchronize"),
        "get_device_properties": lambda device=None: _Props(), "get_device_name": lambda device=None: _Props.name,
        "memory_allocated": _no_values, "max_memory_allocated": _no_values, "memory_reserved": _no_values,
        "max_memory_reserved": _no_values, "reset_peak_memory_stats": lambda device=None: None,
        "empty_cache": lambda: None,
    }
    with contextlib.ExitStack() as stack:
        for name, fn in patches.items():
            stack.enter_context(mock.patch.object(torch.cuda, name, fn))
        for cls in (FakeEvent, FakeStream):  # a synchronize blocks the host: count it
            stack.enter_context(mock.patch.object(cls, "synchronize", _counted(cls.synchronize, on_sync, cls)))
        stack.enter_context(fake_cuda_streams())
        yield


def _counted(fn, on_sync, cls):
    def synchronize(self):
        on_sync(f"{cls.__name__.removeprefix('Fake')}.synchronize")
        return fn(self)
    return synchronize


if __name__ == "__main__":
    print(build_library())
