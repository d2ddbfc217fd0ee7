"""The `slurm` fixture: a real two-node Slurm on localhost for this test session (slurm_cluster.py).

Where Slurm cannot start here (not installed, not root, a daemon that will not come up) the tests that
use it skip with the reason, and the terminal summary repeats it in a line of its own, so a CI log
shows why they did not run. With MOEFORGE_REQUIRE_SLURM=1 (set by .ci/run once apt-get installed
Slurm) the same problem fails the tests instead: installed but not starting is a bug, not a skip.
"""
import os

import pytest
from slurm_cluster import SlurmCluster, SlurmUnavailable

_outcome: dict[str, str] = {}


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm")
    try:
        cluster = SlurmCluster.start(root)
    except SlurmUnavailable as e:
        _outcome["skipped"] = str(e).splitlines()[0]
        if os.environ.get("MOEFORGE_REQUIRE_SLURM") == "1":
            _outcome["failed"] = _outcome.pop("skipped")
            pytest.fail(f"MOEFORGE_REQUIRE_SLURM=1 but Slurm did not start: {e}", pytrace=False)
        pytest.skip(f"no real Slurm here: {e}")
    _outcome["started"] = f"{cluster.version()} at {root}"
    try:
        yield cluster
    finally:
        cluster.stop()


def pytest_terminal_summary(terminalreporter):
    if "failed" in _outcome:
        terminalreporter.write_line(f"slurm: real-Slurm tests FAILED (MOEFORGE_REQUIRE_SLURM=1): Slurm did not "
                                    f"start: {_outcome['failed']}", red=True, bold=True)
    elif "skipped" in _outcome:
        terminalreporter.write_line(f"slurm: real-Slurm tests SKIPPED: {_outcome['skipped']}", yellow=True, bold=True)
    elif "started" in _outcome:
        terminalreporter.write_line(f"slurm: real-Slurm tests ran against {_outcome['started']}")
