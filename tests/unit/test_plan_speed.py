"""What keeps `moeforge plan` fast, held to the slow way: simulate() without its checks (check=False),
one walk for both activation peaks. No timings here."""
import random

import pytest

from moeforge import dualpipe
from moeforge.dualpipe.schedule import SCHEDULES, build_schedule, num_stages
from moeforge.dualpipe.simulate import simulate
from moeforge.launcher import plan as P

LAYOUT = ["model=671b", "parallel.pp=16", "parallel.ep=64", "cluster.nodes=256", "cluster.gpu=h800"]
RECIPE = ["fp8=blockwise", "train.moment_dtype=bfloat16", "parallel.two_hop=true", "parallel.fp8_dispatch=true"]


@pytest.mark.parametrize("overrides", [LAYOUT, LAYOUT + RECIPE], ids=["layout", "recipe"])
def test_plan_pipeline_is_the_checked_simulators(overrides, monkeypatch):
    """The plan prices its 16 x 120 action lists with check=False; they pass every check, and the checked
    run gives the same makespan and bubble, to the last bit, at the plan's own costs."""
    calls = []

    def recording(sched, costs, wait="batch", check=True):
        assert not check
        calls.append((sched, costs))
        return simulate(sched, costs, wait, check)

    monkeypatch.setattr(dualpipe.simulate, "simulate", recording)
    cfg, cluster, _ = P.load_plan_config(overrides)
    plan = P.evaluate(cfg, cluster)
    assert len(calls) == len(P.SCHEDULE_ORDER) and plan.n_micro == 120
    for (sched, costs), name in zip(calls, P.SCHEDULE_ORDER):
        sim = simulate(sched, costs)
        assert (plan.schedules[name].makespan, plan.schedules[name].bubble) == (sim.makespan, sim.max_bubble)


def _peak_walk(actions, act_of_stage):
    """The plan's activation peak as first written: every action, max after each."""
    live = peak = 0.0
    for a in actions:
        if a.op in ("F", "FB"):
            live += act_of_stage[a.stage]
        peak = max(peak, live)
        if a.op in ("B", "BW"):
            live -= act_of_stage[a.stage]
        elif a.op == "FB":
            live -= act_of_stage[a.b_stage]
    return peak


@pytest.mark.parametrize("name", SCHEDULES)
def test_one_walk_gives_both_peaks(name):
    rng = random.Random(0)
    for pp, n in ((4, 8), (8, 20), (16, 34)):
        S = num_stages(name, pp)
        sched = build_schedule(name, pp, n)
        act = [rng.uniform(1e9, 4e9) for _ in range(S)]
        peaks = [P._peaks(actions, act) for actions in sched]
        assert [chunks for chunks, _ in peaks] == simulate(sched).peak_activations
        assert [live for _, live in peaks] == [_peak_walk(actions, act) for actions in sched]
