import os

import pytest

# Keep the math reproducible and the 2-core CI machine responsive.
os.environ.setdefault("OMP_NUM_THREADS", "1")  # 2 threads spin-wait against each other on a busy 2-core machine
os.environ.setdefault("WANDB_MODE", "offline")


@pytest.fixture(scope="session")
def stdlib_data(tmp_path_factory):
    """A data.dir holding the default corpus (Python stdlib sources, the shipped BPE), prepared once per session."""
    from moeforge.train.config import DataConfig
    from moeforge.train.data import ensure_data

    out = tmp_path_factory.mktemp("stdlib_tokens")
    ensure_data(DataConfig(dir=str(out)), seed=0, log=lambda *a: None)
    return str(out)


@pytest.fixture(scope="module")
def one_thread():
    """Small tensors gain nothing from intra-op threads, and on a loaded 2-core machine idle threads
    spin and slow a whole file down ~10x; restores the setting for the tests that follow."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def interpreted(request):
    """The test file's `_worker()` dict, computed once under TRITON_INTERPRET=1 in a fresh process
    (tests/_helpers.run_interpreted); skips when triton is not installed."""
    from _helpers import run_interpreted

    return run_interpreted(request.module.__file__)
