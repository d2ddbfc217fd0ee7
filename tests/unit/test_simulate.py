"""The simulator against the report's table (TR §3.2.1), its error checks, and the Chrome trace."""
import json

import pytest

from moeforge.dualpipe.schedule import Action, build_schedule, num_stages
from moeforge.dualpipe.simulate import (
    WAIT_MODES, Costs, ScheduleDeadlock, ScheduleError, bubble_formula, live_peaks, simulate, to_chrome_trace,
)

# Unequal costs, so a term counted once too often or too rarely changes the result. B is the
# input backward; the report's B is BW = B + W. All satisfy the formula's conditions
# (simulate.py): W <= F, W <= B for ZB1P; F <= B, W <= B, BW <= FB <= F + BW for DualPipe.
COSTS = [
    Costs(F=3, B=4, W=2, FB=6),
    Costs(F=2, B=5, W=1, FB=7.5),
    Costs(F=1.5, B=2.5, W=0.5, FB=3.25),
    Costs(F=1, B=1, W=1),  # FB defaults to F + BW: no overlap gain
]
EXACT = 1e-9


def _sim(name, pp, n, costs, **kw):
    return simulate(build_schedule(name, pp, n, **kw), costs)


@pytest.mark.parametrize("costs", COSTS + [Costs(F=5, B=3, W=1)])
@pytest.mark.parametrize("pp,n", [(1, 3), (2, 4), (3, 7), (4, 4), (4, 9), (8, 3), (8, 20)])
def test_1f1b_bubble_is_formula_on_every_rank(pp, n, costs):
    r = _sim("1f1b", pp, n, costs)
    assert r.bubble == pytest.approx([(pp - 1) * (costs.F + costs.B + costs.W)] * pp, abs=EXACT)
    assert r.makespan == pytest.approx((n + pp - 1) * (costs.F + costs.full_backward), abs=EXACT)


@pytest.mark.parametrize("costs", COSTS)
@pytest.mark.parametrize("pp,n", [(1, 3), (2, 4), (3, 7), (4, 4), (4, 9), (6, 6), (8, 20)])
def test_zb1p_bubble_is_formula_on_every_rank(pp, n, costs):
    r = _sim("zb1p", pp, n, costs)
    formula = bubble_formula("zb1p", pp, costs)
    assert formula == pytest.approx((pp - 1) * (costs.F + costs.B - costs.W))  # the ZB paper's ZB-H1
    assert r.bubble == pytest.approx([formula] * pp, abs=EXACT)


@pytest.mark.parametrize("pp,n", [(4, 2), (8, 5)])
def test_zb1p_with_fewer_microbatches_than_stages_is_worse(pp, n):
    r = _sim("zb1p", pp, n, COSTS[0])
    assert r.max_bubble > bubble_formula("zb1p", pp, COSTS[0])


@pytest.mark.parametrize("costs", COSTS)
@pytest.mark.parametrize("pp,n", [(2, 4), (4, 8), (4, 14), (6, 12), (8, 16), (8, 20)])
def test_dualpipe_bubble_is_formula_on_the_middle_ranks(pp, n, costs):
    r = _sim("dualpipe", pp, n, costs)
    formula = bubble_formula("dualpipe", pp, costs)
    assert r.max_bubble == pytest.approx(formula, abs=EXACT)
    worst = {rank for rank, b in enumerate(r.bubble) if b > formula - EXACT}
    if costs.overlapped < costs.F + costs.full_backward:
        assert worst == {pp // 2 - 1, pp // 2}
    # the step: (n - PP) overlapped pairs + PP lone F and BW on the middle rank, plus the bubble
    F, BW, FB = costs.F, costs.full_backward, costs.overlapped
    assert r.makespan == pytest.approx((n - pp) * FB + pp * (F + BW) + formula, abs=EXACT)


@pytest.mark.parametrize("costs", COSTS)
@pytest.mark.parametrize("pp,n", [(1, 2), (2, 4), (3, 7), (4, 8), (4, 10), (8, 16), (8, 20)])
def test_dualpipev_bubble_is_formula_with_2pp_stages(pp, n, costs):
    r = _sim("dualpipev", pp, n, costs)
    formula = bubble_formula("dualpipev", pp, costs)
    assert formula == pytest.approx((pp - 1) * (costs.overlapped + costs.full_backward - 3 * costs.W))
    assert r.max_bubble == pytest.approx(formula, abs=EXACT)
    if costs.overlapped < costs.F + costs.full_backward:
        assert [rank for rank, b in enumerate(r.bubble) if b > formula - EXACT] == [pp - 1]
    # DualPipeV on pp ranks with n micro-batches runs like DualPipe on 2*pp ranks with 2n
    assert r.makespan == pytest.approx(_sim("dualpipe", 2 * pp, 2 * n, costs).makespan, abs=EXACT)


@pytest.mark.parametrize("name", ["dualpipe", "dualpipev"])
@pytest.mark.parametrize("costs", COSTS)
def test_deepseek_middle_pair_is_never_worse_than_the_formula(name, costs):
    for pp, n in [(2, 4), (4, 8), (4, 12), (8, 20)]:
        r = _sim(name, pp, n, costs, split_middle_pair=True)
        assert r.max_bubble <= bubble_formula(name, pp, costs) + EXACT


@pytest.mark.parametrize("name,pp,n", [("1f1b", 4, 8), ("1f1b", 8, 20), ("zb1p", 4, 8), ("zb1p", 8, 20),
                                       ("1f1b", 4, 2), ("zb1p", 4, 2)])
def test_activations_and_params_1f1b_zb1p(name, pp, n):
    r = _sim(name, pp, n, COSTS[0])
    assert r.peak_activations == [min(pp - rank, n) for rank in range(pp)]  # rank 0 holds PP
    assert r.param_copies == [1] * pp


def test_live_peaks_counts_both_chunks_of_an_fb():
    """Stage 0 holds 2 bytes a chunk, stage 1 holds 7: F0 F1 FB(F0, BW1) B0 W0 BW0, with comm in between."""
    A = Action
    actions = [A("F", 0, 0), A("F", 1, 0), A("SEND_F", 1, 0, peer=1), A("FB", 0, 1, b_stage=1, b_microbatch=0),
               A("RECV_B", 0, 0, peer=1), A("B", 0, 0), A("W", 0, 0), A("BW", 0, 1)]
    assert live_peaks(actions, [2.0, 7.0]) == (3, 11.0)  # 2 + 7 + 2 during the FB, before its backward ends
    assert live_peaks(actions) == (3, 3.0)
    assert live_peaks(actions[:2], [2.0, 7.0]) == (2, 9.0)


@pytest.mark.parametrize("pp,n", [(4, 8), (8, 3)])
def test_live_peaks_weighs_1f1b_chunks_by_stage(pp, n):
    """1F1B: rank r holds min(pp - r, n) chunks of its one stage, so that many times its size."""
    act = [float(3 ** s) for s in range(pp)]
    got = [live_peaks(actions, act) for actions in build_schedule("1f1b", pp, n)]
    assert got == [(min(pp - r, n), min(pp - r, n) * act[r]) for r in range(pp)]


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("name,pp,n", [("dualpipe", 2, 4), ("dualpipe", 4, 8), ("dualpipe", 8, 20),
                                       ("dualpipev", 1, 2), ("dualpipev", 4, 8), ("dualpipev", 8, 20)])
def test_activations_and_params_dualpipe(name, pp, n, split):
    r = _sim(name, pp, n, COSTS[0], split_middle_pair=split)
    assert r.peak_activations == [num_stages(name, pp) + 1] * pp  # PP+1 on every rank
    assert r.param_copies == [2] * pp


@pytest.mark.parametrize("name,pp,n", [("1f1b", 4, 8), ("zb1p", 8, 20), ("dualpipe", 8, 20), ("dualpipev", 4, 9)])
def test_timeline_runs_f_then_b_then_w_per_chunk(name, pp, n):
    r = _sim(name, pp, n, COSTS[1])
    start, end = {}, {}
    for rank_timeline in r.timeline:
        for s, e, a in rank_timeline:
            parts = [("F", a.stage, a.microbatch)] if a.op in ("F", "FB") else []
            if a.op == "FB":
                parts += [("I", a.b_stage, a.b_microbatch), ("W", a.b_stage, a.b_microbatch)]
            elif a.op != "F":
                parts += [(k, a.stage, a.microbatch) for k in {"B": "I", "W": "W", "BW": "IW"}[a.op]]
            for p in parts:
                start[p], end[p] = s, e
    for s in range(num_stages(name, pp)):
        for m in range(n):
            assert end["F", s, m] <= start["I", s, m] and end["I", s, m] <= end["W", s, m]
            if s > 0:
                assert end["F", s - 1, m] <= start["F", s, m]
            if s < num_stages(name, pp) - 1:
                assert end["I", s + 1, m] <= start["I", s, m]


def test_waiting_for_sends_costs_zb1p_its_gain():
    costs = COSTS[0]
    sched = build_schedule("zb1p", 8, 20)
    formula = bubble_formula("zb1p", 8, costs)
    assert simulate(sched, costs, wait="recvs").max_bubble == pytest.approx(formula)
    assert simulate(sched, costs, wait="batch").max_bubble == pytest.approx(formula)
    assert simulate(sched, costs, wait="all").max_bubble == pytest.approx(71)  # 1F1B: 63
    for name in ("1f1b", "dualpipe"):  # these never block on a send-only batch
        sched = build_schedule(name, 8, 20)
        assert simulate(sched, costs, wait="all").makespan == simulate(sched, costs).makespan


def test_comm_latency_only_adds():
    for name, pp, n in [("1f1b", 4, 8), ("zb1p", 4, 8), ("dualpipe", 4, 8), ("dualpipev", 4, 8)]:
        sched = build_schedule(name, pp, n)
        base = simulate(sched, COSTS[0])
        slow = simulate(sched, Costs(F=3, B=4, W=2, FB=6, comm=0.5))
        assert slow.makespan > base.makespan and slow.busy == base.busy
        assert all(done >= posted for rank in slow.comm for posted, done, _ in rank)


def test_costs_defaults_and_prices():
    c = Costs(F=3, B=4, W=2)
    assert (c.full_backward, c.overlapped) == (6, 9)
    assert [c.price(Action(op, 0, 0)) for op in ("F", "B", "W", "BW")] == [3, 4, 2, 6]
    assert c.price(Action("FB", 0, 0, None, 1, 1)) == 9
    assert Costs(F=3, B=4, W=2, BW=5, FB=7).price(Action("BW", 0, 0)) == 5


def test_messages_pair_sends_with_receives():
    r = _sim("dualpipe", 4, 8, COSTS[0])
    assert set(r.messages) == {(0, 1), (1, 0), (1, 2), (2, 1), (2, 3), (3, 2)}
    for send, recv in r.messages[1, 2]:
        assert send.peer == 2 and recv.peer == 1 and send.microbatch == recv.microbatch


# ---- the checks fire ------------------------------------------------------------------------

def _two_stage(rank0, rank1):
    return [[Action(*a) for a in rank0], [Action(*a) for a in rank1]]


GOOD_0 = [("F", 0, 0), ("SEND_F", 0, 0, 1), ("RECV_B", 0, 0, 1), ("BW", 0, 0)]
GOOD_1 = [("RECV_F", 1, 0, 0), ("F", 1, 0), ("BW", 1, 0), ("SEND_B", 1, 0, 0)]


def test_hand_written_schedule_runs():
    r = simulate(_two_stage(GOOD_0, GOOD_1), Costs(F=1, B=1, W=1))
    assert r.makespan == 6 and r.bubble == [3, 3]  # 1F1B: (PP-1)(F+B) with F=1, B=2


def test_deadlock_names_the_stuck_ranks():
    rank0 = [("RECV_B", 0, 0, 1), ("F", 0, 0), ("SEND_F", 0, 0, 1), ("BW", 0, 0)]
    with pytest.raises(ScheduleDeadlock, match=r"rank 0: batch \[0RECV_B0<1\] waits on 0RECV_B0<1") as err:
        simulate(_two_stage(rank0, GOOD_1))
    assert "rank 1" in str(err.value)


def test_send_only_batches_deadlock_only_when_sends_block():
    """Two directions on two ranks (DualPipe-like): each rank first sends alone, computes, then
    sends and receives together. Fine when a send-only batch does not block (each rank's mixed
    batch pairs with the other's); a deadlock when every batch waits."""
    def rank(other, first, second):  # `first` micro-batches start here, `second` come from `other`
        a, b = first
        c, d = second
        return [
            ("F", 0, a), ("SEND_F", 0, a, other),
            ("F", 0, b), ("SEND_F", 0, b, other), ("RECV_F", 1, c, other), ("RECV_F", 1, d, other),
            ("F", 1, c), ("F", 1, d), ("BW", 1, c), ("SEND_B", 1, c, other),
            ("BW", 1, d), ("SEND_B", 1, d, other), ("RECV_B", 0, a, other), ("RECV_B", 0, b, other),
            ("BW", 0, a), ("BW", 0, b),
        ]
    sched = _two_stage(rank(1, (0, 1), (2, 3)), rank(0, (2, 3), (0, 1)))
    simulate(sched, wait="batch")
    simulate(sched, wait="recvs")
    with pytest.raises(ScheduleDeadlock, match=r"rank 0: batch \[0SEND_F0>1\] waits on 0SEND_F0>1"):
        simulate(sched, wait="all")


def test_messages_out_of_order_are_caught():
    rank0 = [("F", 0, 0), ("F", 0, 1), ("SEND_F", 0, 1, 1), ("SEND_F", 0, 0, 1),
             ("RECV_B", 0, 0, 1), ("BW", 0, 0), ("RECV_B", 0, 1, 1), ("BW", 0, 1)]
    rank1 = [("RECV_F", 1, 0, 0), ("F", 1, 0), ("BW", 1, 0), ("SEND_B", 1, 0, 0),
             ("RECV_F", 1, 1, 0), ("F", 1, 1), ("BW", 1, 1), ("SEND_B", 1, 1, 0)]
    with pytest.raises(ScheduleError, match=r"ranks 0->1, message 0: 0SEND_F1>1 does not match 1RECV_F0<0"):
        simulate(_two_stage(rank0, rank1))


@pytest.mark.parametrize("rank0,rank1,match", [
    (GOOD_0[:-1], GOOD_1, r"stage 0 micro-batch 0: no \['I', 'W'\]"),  # a missing backward
    (GOOD_0 + [("F", 0, 0)], GOOD_1, "runs twice"),
    ([("SEND_F", 0, 0, 1), ("F", 0, 0), ("RECV_B", 0, 0, 1), ("BW", 0, 0)], GOOD_1, "sends .* before computing"),
    (GOOD_0, [("F", 1, 0), ("BW", 1, 0), ("SEND_B", 1, 0, 0)], "did not receive"),
    ([("F", 0, 0), ("SEND_F", 0, 0, 1), ("RECV_B", 0, 0, 1), ("B", 0, 0), ("W", 0, 0)] + [("W", 0, 0)], GOOD_1, "twice"),
    ([("F", 0, 0), ("SEND_F", 0, 0, 1), ("RECV_B", 0, 0, 1), ("W", 0, 0), ("B", 0, 0)], GOOD_1, "runs before"),
    ([("F", 0, 0), ("SEND_F", 0, 0, 0), ("RECV_B", 0, 0, 1), ("BW", 0, 0)], GOOD_1, "bad peer"),
    ([("F", 0, 0), ("SEND_F", 0, 0, 1), ("SEND_F", 0, 0, 1), ("RECV_B", 0, 0, 1), ("BW", 0, 0)], GOOD_1, "sent twice"),
    (GOOD_0, GOOD_1[:-1], "receive|waits on"),  # an unanswered receive
])
def test_broken_schedules_are_caught(rank0, rank1, match):
    with pytest.raises(ScheduleError, match=match):
        simulate(_two_stage(rank0, rank1))


def test_unmatched_send_is_caught():
    rank0 = GOOD_0 + [("SEND_B", 0, 0, 1)]  # stage 0's input grad: nobody receives it
    with pytest.raises(ScheduleError, match="ranks 0->1: 2 sends but 1 receives"):
        simulate(_two_stage(rank0, GOOD_1))
    with pytest.raises(ScheduleDeadlock):
        simulate(_two_stage(rank0, GOOD_1), wait="all")
    with pytest.raises(ValueError, match="wait='eager'"):
        simulate(_two_stage(GOOD_0, GOOD_1), wait="eager")


# ---- check=False: the same result without the checks ----------------------------------------

@pytest.mark.parametrize("wait", WAIT_MODES)
@pytest.mark.parametrize("name,pp,n,split", [
    ("1f1b", 1, 3, False), ("1f1b", 4, 2, False), ("1f1b", 8, 20, False),
    ("zb1p", 3, 7, False), ("zb1p", 8, 5, False), ("zb1p", 8, 20, False),
    ("dualpipe", 2, 4, False), ("dualpipe", 6, 12, False), ("dualpipe", 8, 20, True),
    ("dualpipev", 1, 2, False), ("dualpipev", 4, 9, True), ("dualpipev", 8, 20, False),
])
def test_unchecked_run_gives_the_same_result(name, pp, n, split, wait):
    """Timeline, comm batches, messages, makespan and bubble to the last bit, comm latency or not."""
    sched = build_schedule(name, pp, n, split_middle_pair=split) if split else build_schedule(name, pp, n)
    for costs in COSTS + [Costs(F=1.3, B=2.7, W=0.9, FB=3.1, comm=0.37), Costs(F=0.0287, B=0.0322, W=0.0253,
                                                                              FB=0.0862, comm=0.00117)]:
        assert simulate(sched, costs, wait, check=False) == simulate(sched, costs, wait)


def test_unchecked_run_still_raises_what_it_cannot_finish():
    deadlock = [("RECV_B", 0, 0, 1), ("F", 0, 0), ("SEND_F", 0, 0, 1), ("BW", 0, 0)]
    with pytest.raises(ScheduleDeadlock, match=r"rank 0: batch \[0RECV_B0<1\] waits on 0RECV_B0<1"):
        simulate(_two_stage(deadlock, GOOD_1), check=False)
    with pytest.raises(ScheduleError, match="ranks 0->1: 2 sends but 1 receives"):
        simulate(_two_stage(GOOD_0 + [("SEND_B", 0, 0, 1)], GOOD_1), check=False)
    with pytest.raises(ScheduleError, match="bad peer"):
        simulate(_two_stage([("F", 0, 0), ("SEND_F", 0, 0, 0), ("RECV_B", 0, 0, 1), ("BW", 0, 0)], GOOD_1),
                 check=False)
    with pytest.raises(ScheduleError, match="unknown op"):
        simulate(_two_stage(GOOD_0 + [("X", 0, 0)], GOOD_1), check=False)
    with pytest.raises(ValueError, match="wait='eager'"):
        simulate(_two_stage(GOOD_0, GOOD_1), wait="eager", check=False)


# ---- Chrome trace ---------------------------------------------------------------------------

def test_chrome_trace_of_a_simulation(tmp_path):
    r = _sim("dualpipe", 4, 8, COSTS[0])
    path = tmp_path / "trace.json"
    to_chrome_trace(r.timeline, str(path), seconds_per_unit=1e-3)
    events = json.loads(path.read_text())["traceEvents"]
    spans = [e for e in events if e["ph"] == "X"]
    assert len(spans) == sum(map(len, r.timeline))
    assert {e["pid"] for e in events} == {0, 1, 2, 3}
    assert {e["args"]["name"] for e in events if e["ph"] == "M"} == {"rank 0", "rank 1", "rank 2", "rank 3"}
    first = min((e for e in spans if e["pid"] == 0), key=lambda e: e["ts"])
    assert (first["name"], first["ts"], first["dur"]) == ("0F0", 0, pytest.approx(3000))  # F = 3 ms
    assert max(e["ts"] + e["dur"] for e in spans) == pytest.approx(r.makespan * 1000)
    comm = to_chrome_trace(r.comm)["traceEvents"]
    assert all(e["cat"] == "comm" and e["tid"] == 1 for e in comm if e["ph"] == "X")


def test_chrome_trace_of_a_measured_timeline():
    measured = [[(0.0, 0.0125, "F0"), (0.02, 0.05, "BW0")], [(0.0125, 0.02, "F0")]]
    spans = [e for e in to_chrome_trace(measured)["traceEvents"] if e["ph"] == "X"]
    assert [(e["pid"], e["name"], e["ts"], e["dur"]) for e in spans] == [
        (0, "F0", 0.0, pytest.approx(12500)), (0, "BW0", pytest.approx(20000), pytest.approx(30000)),
        (1, "F0", pytest.approx(12500), pytest.approx(7500))]
    json.dumps(spans)
