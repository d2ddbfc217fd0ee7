"""Schedules as data: structure, placement, message pairing, no deadlock. No processes."""
from collections import Counter, defaultdict

import pytest

from moeforge.dualpipe.schedule import (
    SCHEDULES, Action, build_schedule, dualpipe, dualpipev, format_schedule, is_reverse, num_stages,
    one_f_one_b, stage_placement, stage_to_rank, validate, zb1p,
)
from moeforge.dualpipe.simulate import WAIT_MODES, simulate

CASES = {
    "1f1b": [(1, 1), (1, 3), (2, 1), (2, 4), (3, 7), (4, 3), (4, 8), (8, 8), (8, 20)],
    "zb1p": [(1, 1), (1, 3), (2, 1), (2, 4), (3, 7), (4, 3), (4, 8), (8, 8), (8, 20)],
    "dualpipe": [(2, 4), (2, 6), (4, 8), (4, 10), (6, 12), (6, 14), (8, 16), (8, 20)],
    "dualpipev": [(1, 2), (1, 5), (2, 4), (2, 7), (3, 6), (4, 8), (4, 9), (8, 16), (8, 20)],
}
ALL = [(name, pp, n) for name, cases in CASES.items() for pp, n in cases]


def _parts(a: Action):
    """(kind, stage, mb) that a compute action does; kind F, I (input backward) or W."""
    if a.op == "FB":
        return [("F", a.stage, a.microbatch), ("I", a.b_stage, a.b_microbatch), ("W", a.b_stage, a.b_microbatch)]
    kinds = {"F": "F", "B": "I", "W": "W", "BW": "IW"}[a.op]
    return [(k, a.stage, a.microbatch) for k in kinds]


@pytest.mark.parametrize("name,pp,n", ALL)
def test_every_chunk_has_one_f_one_b_one_w_on_its_rank(name, pp, n):
    sched = build_schedule(name, pp, n)
    seen = Counter()
    for rank, actions in enumerate(sched):
        for a in actions:
            if not a.is_compute:
                continue
            for kind, s, m in _parts(a):
                seen[kind, s, m] += 1
                assert s in stage_placement(name, pp)[rank]
                assert stage_to_rank(name, pp, s, is_reverse(name, n, m)) == rank, (a, rank)
    expected = {(k, s, m) for k in "FIW" for s in range(num_stages(name, pp)) for m in range(n)}
    assert set(seen) == expected
    assert set(seen.values()) == {1}


@pytest.mark.parametrize("name,pp,n", ALL)
def test_per_rank_order_f_before_b_before_w(name, pp, n):
    for actions in build_schedule(name, pp, n):
        position = {}
        for i, a in enumerate(a for a in actions if a.is_compute):
            for part in _parts(a):
                position[part] = (i, "FIW".index(part[0]))  # within an FB/BW: F, then I, then W
        for (kind, s, m), pos in position.items():
            if kind == "F":
                assert pos < position["I", s, m] <= position["W", s, m], (s, m)


@pytest.mark.parametrize("name,pp,n", ALL)
def test_sends_match_receives_in_order_per_peer_pair(name, pp, n):
    sched = build_schedule(name, pp, n)
    sends, recvs = defaultdict(list), defaultdict(list)
    for rank, actions in enumerate(sched):
        for a in actions:
            assert a.peer != rank, a  # a neighbour on the same rank is handed over locally
            if a.op.startswith("SEND"):
                sends[rank, a.peer].append(a)
            elif a.op.startswith("RECV"):
                recvs[a.peer, rank].append(a)
    assert set(sends) == set(recvs)
    for pair in sends:
        assert len(sends[pair]) == len(recvs[pair]), pair
        for s, r in zip(sends[pair], recvs[pair]):
            assert (s.op[5:], s.microbatch) == (r.op[5:], r.microbatch), (pair, s, r)
            assert r.stage == s.stage + (1 if s.op == "SEND_F" else -1), (pair, s, r)
    # every cross-rank edge of the data flow has exactly one message
    n_messages = sum(map(len, sends.values()))
    n_edges = sum(
        2 * (stage_to_rank(name, pp, s, is_reverse(name, n, m)) != stage_to_rank(name, pp, s + 1, is_reverse(name, n, m)))
        for s in range(num_stages(name, pp) - 1) for m in range(n)
    )
    assert n_messages == n_edges


@pytest.mark.parametrize("name,pp,n", ALL)
def test_receive_before_use_and_send_after_compute(name, pp, n):
    for rank, actions in enumerate(build_schedule(name, pp, n)):
        done, got = set(), set()
        for a in actions:
            if a.op in ("RECV_F", "RECV_B"):
                got.add((a.op[-1], a.stage, a.microbatch))
            elif a.op in ("SEND_F", "SEND_B"):
                assert (a.op[-1] if a.op == "SEND_F" else "I", a.stage, a.microbatch) in done, a
            else:
                for kind, s, m in _parts(a):
                    if kind == "F" and s > 0 and ("F", s - 1, m) not in done:
                        assert ("F", s, m) in got, (rank, a)
                    if kind == "I" and s < num_stages(name, pp) - 1 and ("I", s + 1, m) not in done:
                        assert ("B", s, m) in got, (rank, a)
                    done.add((kind, s, m))


@pytest.mark.parametrize("name,pp,n", ALL)
@pytest.mark.parametrize("wait", WAIT_MODES)
def test_no_deadlock(name, pp, n, wait):
    simulate(build_schedule(name, pp, n), wait=wait)  # raises ScheduleDeadlock / ScheduleError


@pytest.mark.parametrize("name,pp,n", [c for c in ALL if c[0].startswith("dual")])
def test_deepseek_middle_pair_variant_runs(name, pp, n):
    sched = build_schedule(name, pp, n, split_middle_pair=True)
    simulate(sched, wait="all")
    middle = pp // 2 - 1 if name == "dualpipe" else pp - 1
    plain = build_schedule(name, pp, n)
    ops = [a.op for a in sched[middle] if a.is_compute]
    assert ops.count("FB") == [a.op for a in plain[middle]].count("FB") - 1
    for rank in range(pp):
        if rank not in (middle, pp - 1 - middle if name == "dualpipe" else middle):
            assert sched[rank] == plain[rank]


def test_dualpipe_ranks_mirror_each_other():
    pp, n = 8, 20
    half = n // 2
    sched = build_schedule("dualpipe", pp, n)
    for rank in range(pp):
        mirrored = [a._replace(microbatch=(a.microbatch + half) % n,
                               peer=None if a.peer is None else pp - 1 - a.peer,
                               b_microbatch=None if a.b_microbatch is None else (a.b_microbatch + half) % n)
                    for a in sched[pp - 1 - rank]]
        assert sched[rank] == mirrored


@pytest.mark.parametrize("pp,n", [(4, 8), (8, 20)])
def test_dualpipe_phase_counts(pp, n):
    """Step counts from DeepSeek's code for half-rank h: overlapped pairs 2*(n/2-pp+h+1) + (pp/2-h-1),
    the first pp-2h-2 actions are forwards of the near stage (Step 1: nF0)."""
    for rank, actions in enumerate(build_schedule("dualpipe", pp, n)):
        h = min(rank, pp - 1 - rank)
        compute = [a for a in actions if a.is_compute]
        assert sum(a.op == "FB" for a in compute) == 2 * (n // 2 - pp + h + 1) + (pp // 2 - h - 1)
        step_1 = compute[: (pp // 2 - h - 1) * 2]
        assert all(a.op == "F" and a.stage == h for a in step_1)
        # Step 8: nW -- the last h+1 actions are W's
        assert [a.op for a in compute[-(h + 2):]] == ["B"] + ["W"] * (h + 1)


def test_1f1b_rank_lists_by_hand():
    assert [str(a) for a in one_f_one_b(1, 2, 2)] == [
        "1RECV_F0<0", "1F0", "1BW0", "1SEND_B0>0", "1RECV_F1<0", "1F1", "1BW1", "1SEND_B1>0"]
    assert [str(a) for a in one_f_one_b(0, 2, 2)] == [
        "0F0", "0SEND_F0>1", "0F1", "0SEND_F1>1", "0RECV_B0<1", "0BW0", "0RECV_B1<1", "0BW1"]
    # ZB1P: rank 0 does its W right after each B, the last rank defers pp-1 of them
    assert [a.op for a in zb1p(0, 2, 3) if a.is_compute] == ["F", "F", "B", "W", "F", "B", "W", "B", "W"]
    assert [a.op for a in zb1p(1, 2, 3) if a.is_compute] == ["F", "B", "F", "B", "W", "F", "B", "W", "W"]


def test_dualpipev_turn_is_local_and_loss_on_rank_0():
    pp, n = 4, 8
    sched = build_schedule("dualpipev", pp, n)
    last = sched[pp - 1]
    assert not any(a.is_comm and a.stage in (pp - 1, pp) and a.peer == pp - 1 for a in last)
    assert all(a.peer is None or abs(a.peer - (pp - 1)) == 1 for a in last)
    assert stage_to_rank("dualpipev", pp, 2 * pp - 1) == 0
    assert stage_placement("dualpipev", pp) == [(0, 7), (1, 6), (2, 5), (3, 4)]
    assert stage_placement("dualpipe", pp) == [(0, 3), (1, 2), (2, 1), (3, 0)]
    assert stage_to_rank("dualpipe", pp, 0, reverse=True) == pp - 1


@pytest.mark.parametrize("name,pp,n,match", [
    ("dualpipe", 3, 12, "pp=3"),
    ("dualpipe", 4, 7, "n_micro=7"),
    ("dualpipe", 4, 6, "n_micro=6"),
    ("dualpipe", 0, 4, "pp=0"),
    ("dualpipev", 4, 7, "n_micro=7"),
    ("dualpipev", 2, 3, "pp=2"),
    ("1f1b", 4, 0, "n_micro=0"),
    ("zb1p", 0, 4, "pp=0"),
    ("gpipe", 4, 8, "unknown schedule"),
])
def test_invalid_sizes_raise_with_the_numbers(name, pp, n, match):
    with pytest.raises(ValueError, match=match):
        build_schedule(name, pp, n)


def test_invalid_rank_raises():
    with pytest.raises(ValueError, match="rank=4, pp=4"):
        dualpipe(4, 4, 8)
    with pytest.raises(ValueError, match="rank=-1"):
        dualpipev(-1, 4, 8)
    validate("dualpipev", 3, 6)  # odd pp is fine for DualPipeV
    with pytest.raises(ValueError, match="stage=8"):
        stage_to_rank("dualpipev", 4, 8)


def test_format_schedule_lists_and_timelines():
    sched = build_schedule("dualpipe", 4, 8)
    text = format_schedule(sched)
    assert text.count("\n") == 4 and text.startswith("rank  0 | F0 F1 F2 F4 ")
    timed = format_schedule(simulate(sched).timeline)  # unit costs: F=B=W=1, BW=2, FB=3
    row1 = timed.splitlines()[1]
    assert row1.startswith("rank  1 | ....F0  ")  # rank 1 waits one F for its first input
    assert "F2B4        " in row1  # an FB spans three units of four characters
    v = format_schedule(build_schedule("dualpipev", 2, 4))
    assert "F0'" in v  # rank 1 runs micro-batch 0 in stages 1 and 2: the later one is primed


def test_action_str():
    assert str(Action("FB", 1, 2, None, 2, 4)) == "1F2&2BW4"
    assert str(Action("SEND_B", 3, 5, 2)) == "3SEND_B5>2"
    assert str(Action("RECV_F", 3, 5, 2)) == "3RECV_F5<2"
    assert Action("W", 0, 0).is_compute and Action("RECV_B", 0, 0, 1).is_comm
    assert set(SCHEDULES) == set(CASES)
