"""bench/overlap_bench.py in its smoke mode: 4 gloo ranks on loopback (no namespaces, no tc), the tiny
model, one step of every variant. Checks that the bench runs end to end and prints one row per variant
with numbers in every column, so that it cannot rot; the numbers themselves mean nothing at this size.
~12 s on an idle 2-core machine (most of it the fork server importing torch and torch's pipelining)."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VARIANTS = ["ours dualpipev, overlap", "ours dualpipev, no overlap", "ours 1f1b", "torch dualpipev", "torch 1f1b"]


@pytest.mark.timeout(180)
def test_overlap_bench_smoke():
    # every thread but the main one re-niced (+1 needs no privilege); where root can make cgroups, every
    # rank capped (at 1 core, so the smoke run is not slowed)
    extra = ["--comm-nice", "1"]
    if os.geteuid() == 0 and os.access("/sys/fs/cgroup/cpu", os.W_OK):
        extra += ["--cpu-per-rank", "1"]
    p = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "overlap_bench.py"), "--smoke", "--no-netns",
                        *extra], capture_output=True, text=True, timeout=170, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    rows = {}
    for line in p.stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] in VARIANTS:
            rows[cells[0]] = cells[1:]
    assert sorted(rows) == sorted(VARIANTS), p.stdout
    for label, cells in rows.items():
        step = float(cells[0].split()[0])
        assert step > 0, (label, cells)
        assert float(cells[3]) > 0, (label, cells)  # the ep stream ran exchanges (instrumentation hooked)
        assert all(re.fullmatch(r"-?[\d.]+%?|[\d.]+ \([\d.]+-[\d.]+\)", c) for c in cells), (label, cells)
    assert rows["torch dualpipev"][1] == "1.00"  # the reference of the ratio column
    assert rows["ours dualpipev, no overlap"][4] == "0%"  # the reference of "hidden"
    assert "# goals:" in p.stdout
    assert "at nice 1" in p.stdout
    if "--cpu-per-rank" in extra:
        assert "capped at 1 CPU by a cgroup quota" in p.stdout, p.stdout
    for kind in ("dispatch_fwd", "combine_fwd", "combine_bwd", "dispatch_bwd"):  # the per-kind breakdown
        counts = re.findall(rf"#\s+{kind}\s+[\d.]+ /\s+[\d.]+ /\s+[\d.]+ /\s+[\d.]+, (\d+)", p.stdout)
        assert len(counts) == 2 and all(int(c) > 0 for c in counts), (kind, p.stdout)


@pytest.mark.timeout(60)
def test_overlap_bench_rejects_bad_options_before_any_rank_starts():
    bench = os.path.join(ROOT, "bench", "overlap_bench.py")
    p = subprocess.run([sys.executable, bench, "--smoke", "--no-netns", "--cpu-per-rank", "-1"],
                       capture_output=True, text=True, timeout=50, cwd=ROOT)
    assert p.returncode != 0 and "--cpu-per-rank -1.0 must be >= 0" in p.stderr, p.stderr
    if os.geteuid() != 0:
        p = subprocess.run([sys.executable, bench, "--smoke", "--no-netns", "--comm-nice", "-5"],
                           capture_output=True, text=True, timeout=50, cwd=ROOT)
        assert p.returncode != 0 and "--comm-nice -5" in p.stderr and "needs root" in p.stderr, p.stderr
