"""What keeps `moeforge plan` fast, held to the slow way: simulate() without its checks (check=False).
No timings here. The report's layout (pp 16, 120 micro-batches per pipeline) with the 16b model: the action
lists are the layout's, and 16b's units (32 layers: DualPipeV's 32 stages) are counted and measured faster
than 671b's."""
import pytest

from moeforge import dualpipe
from moeforge.dualpipe.simulate import simulate
from moeforge.launcher import plan as P

LAYOUT = ["model=16b", "model.n_layers=32", "parallel.pp=16", "parallel.ep=64", "cluster.nodes=256", "cluster.gpu=h800"]
RECIPE = ["fp8=blockwise", "train.moment_dtype=bfloat16", "parallel.two_hop=true", "parallel.fp8_dispatch=true"]


@pytest.mark.slow  # minutes: the 16b units are counted and their activations measured on fake tensors
@pytest.mark.timeout(1200)
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
