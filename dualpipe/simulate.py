"""Run every rank's action list together on a cost model (no torch here).

Each rank executes its list in order. A compute action runs as soon as the previous step of its
rank has ended; it never waits by itself, because whatever it needs from another rank came
through a receive earlier in its list. A communication batch (the consecutive SEND/RECV actions
between two compute actions, see schedule.py) is posted when the rank reaches it. A message
transfers once both its send and its matching receive are posted and arrives `Costs.comm` later.
How long a batch holds its rank (`wait`):
    "batch"  (default) a batch holding a receive waits for all its messages, sends included; a
             batch of sends only does not wait. This is `dist.batch_isend_irecv` on NCCL, where
             the requests of one call complete together; the runtime waits the send-only ones
             before the step ends.
    "recvs"  a batch waits for its receives only; sends never block.
    "all"    every batch waits for all its messages (DeepSeek's `_commit_and_wait_comm`). The
             strictest: a schedule that runs under "all" runs under the others.
Messages between two ranks match in posting order.

Checked, with an error that names the ranks and actions (ScheduleError):
  - every (stage, microbatch) has exactly one F, one input backward (B, BW, or the backward of
    an FB) and one weight backward (W, BW or FB), all on one rank; W only after a B;
  - data dependencies: F(s, m) after F(s-1, m); a backward of (s, m) after F(s, m) and after
    the backward of (s+1, m); W after B. A dependency on another rank must come through a
    receive, and a send may only go out after its tensor was computed;
  - the k-th send from a to b and the k-th receive on b from a describe the same tensor, and
    every send has its receive;
  - no deadlock (ScheduleDeadlock lists every stuck rank and the messages it waits for).
step_time() gives the same makespan and bubble without these checks, ten times faster, for lists
that pass them (the planner's).

Bubble: bubble[r] = makespan - busy[r], the time rank r does not compute during the step
(makespan: time 0 to the end of the last action of any rank; busy: the sum of rank r's compute
prices; waiting in a comm batch is bubble). The report's bubble is the largest, max_bubble, on
the rank that waits most. With comm = 0 and the conditions below, the simulation gives the
report's table exactly (bubble_formula; tests/unit/test_simulate.py):
    1f1b       (PP-1)(F+B)          on every rank                  any costs, any n
    zb1p       (PP-1)(F+B-2W)       on every rank                  W <= F, W <= Bi; n >= pp
    dualpipe   (PP/2-1)(F&B+B-3W)   on ranks pp/2-1 and pp/2       Bi >= F, Bi >= W,
    dualpipev  the same, PP = 2*pp  on rank pp-1                   B <= F&B <= F + B
PP is the number of stages. The report's B is the full backward (our BW, B + W by default), Bi
our input-only backward (the B action, priced Costs.B), F&B is Costs.FB. The DualPipe rows are
for split_middle_pair=False, the schedule the report describes; with DeepSeek's split the
largest bubble is at most the formula.

Activations: one unit is one stage's activations for one micro-batch. A chunk is live from the
start of its forward to the end of its input backward (B, BW, or an FB's backward), so during an
FB both chunks are live. peak_activations[r] is the most live chunks on rank r at once.
"""
from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

from moeforge.dualpipe.schedule import COMM_OPS, COMPUTE_OPS, Action, num_stages

WAIT_MODES = ("batch", "recvs", "all")


class ScheduleError(ValueError):
    """The schedule is wrong: a missing or duplicate action, a broken dependency, a bad message."""


class ScheduleDeadlock(ScheduleError):
    """No rank can make progress."""


@dataclass(frozen=True)
class Costs:
    F: float = 1.0
    B: float = 1.0  # backward for inputs only (the B action); the report's B is BW
    W: float = 1.0  # backward for weights
    BW: float | None = None  # full backward; default B + W
    FB: float | None = None  # overlapped F and full backward, the report's F&B; default F + BW
    comm: float = 0.0  # one message, from the later of its send and receive being posted

    @property
    def full_backward(self) -> float:
        return self.B + self.W if self.BW is None else self.BW

    @property
    def overlapped(self) -> float:
        return self.F + self.full_backward if self.FB is None else self.FB

    def price(self, action: Action) -> float:
        if action.op == "BW":
            return self.full_backward
        if action.op == "FB":
            return self.overlapped
        return getattr(self, action.op)


def bubble_formula(name: str, pp: int, costs: Costs) -> float:
    """The report's bubble (TR §3.2.1, Table 2) in our costs: its B is our full backward."""
    F, B, W, FB = costs.F, costs.full_backward, costs.W, costs.overlapped
    if name == "1f1b":
        return (pp - 1) * (F + B)
    if name == "zb1p":
        return (pp - 1) * (F + B - 2 * W)
    if name in ("dualpipe", "dualpipev"):
        return (num_stages(name, pp) // 2 - 1) * (FB + B - 3 * W)
    raise ValueError(f"unknown schedule {name!r}")


@dataclass
class SimResult:
    timeline: list[list[tuple[float, float, Action]]]  # per rank: (start, end, compute action)
    comm: list[list[tuple[float, float, tuple[Action, ...]]]]  # per rank: (posted, done, batch)
    makespan: float
    busy: list[float]
    bubble: list[float]  # makespan - busy, per rank
    peak_activations: list[int]
    param_copies: list[int]  # stages held per rank: 1 for 1F1B/ZB1P, 2 for DualPipe/V
    messages: dict[tuple[int, int], list[tuple[Action, Action]]]  # (src, dst) -> (send, recv)

    @property
    def max_bubble(self) -> float:
        return max(self.bubble)


def _parts(a: Action) -> list[tuple[str, int, int]]:
    """What a compute action does, as (kind, stage, mb); kind F, I (input backward) or W."""
    if a.op == "F":
        return [("F", a.stage, a.microbatch)]
    if a.op == "B":
        return [("I", a.stage, a.microbatch)]
    if a.op == "W":
        return [("W", a.stage, a.microbatch)]
    if a.op == "BW":
        return [("I", a.stage, a.microbatch), ("W", a.stage, a.microbatch)]
    if a.op == "FB":
        return [("F", a.stage, a.microbatch), ("I", a.b_stage, a.b_microbatch), ("W", a.b_stage, a.b_microbatch)]
    raise ScheduleError(f"unknown op in {a!r}; compute ops are {COMPUTE_OPS}, comm ops {COMM_OPS}")


def _steps(actions: Sequence[Action]) -> list[Action | list[Action]]:
    """A rank's list as compute actions and comm batches (lists)."""
    steps: list[Action | list[Action]] = []
    for a in actions:
        if a.op not in COMM_OPS:
            steps.append(a)
        elif steps and isinstance(steps[-1], list):
            steps[-1].append(a)
        else:
            steps.append([a])
    return steps


def _locate(schedules: Sequence[Sequence[Action]]) -> tuple[dict[tuple[str, int, int], int], int]:
    """The rank of every (kind, stage, mb); checks each runs once and nothing is missing."""
    where: dict[tuple[str, int, int], int] = {}
    for rank, actions in enumerate(schedules):
        for a in actions:
            if a.op in COMM_OPS:
                continue
            for part in _parts(a):
                if part in where:
                    raise ScheduleError(f"{part} runs twice: on rank {where[part]} and on rank {rank} ({a})")
                where[part] = rank
    n_stages = 1 + max((s for _, s, _ in where), default=-1)
    microbatches = sorted({m for _, _, m in where})
    for s in range(n_stages):
        for m in microbatches:
            ranks = {k: where.get((k, s, m)) for k in "FIW"}
            if None in ranks.values():
                raise ScheduleError(f"stage {s} micro-batch {m}: no {[k for k, r in ranks.items() if r is None]}")
            if len(set(ranks.values())) != 1:
                raise ScheduleError(f"stage {s} micro-batch {m}: F, backward, W on different ranks {ranks}")
    return where, n_stages


def simulate(schedules: Sequence[Sequence[Action]], costs: Costs | None = None, wait: str = "batch") -> SimResult:
    if wait not in WAIT_MODES:
        raise ValueError(f"{wait=}, expected one of {WAIT_MODES}")
    costs = costs or Costs()
    n = len(schedules)
    where, n_stages = _locate(schedules)
    steps = [_steps(a) for a in schedules]
    pc = [0] * n
    clock = [0.0] * n
    done: list[set] = [set() for _ in range(n)]  # parts computed on this rank
    received: list[set] = [set() for _ in range(n)]  # parts whose result this rank received
    sent: set = set()
    timeline: list[list] = [[] for _ in range(n)]
    comm_log: list[list] = [[] for _ in range(n)]
    # channel (src, dst) -> posted sends / receives, each (action, time posted), in posting order
    sends: dict[tuple[int, int], list] = defaultdict(list)
    recvs: dict[tuple[int, int], list] = defaultdict(list)
    posted: list[list | None] = [None] * n  # the current batch of each rank: [(channel, is_send, index)]

    def need(rank: int, part: tuple[str, int, int], a: Action) -> None:
        if part in done[rank]:
            return
        if where[part] == rank:
            raise ScheduleError(f"rank {rank}: {a} runs before {part}, which is on the same rank")
        if part not in received[rank]:
            raise ScheduleError(f"rank {rank}: {a} needs {part} from rank {where[part]} but did not receive it")

    def run_compute(rank: int, a: Action) -> None:
        for kind, s, m in _parts(a):
            if kind == "F" and s > 0:
                need(rank, ("F", s - 1, m), a)
            if kind == "I":
                need(rank, ("F", s, m), a)
                if s < n_stages - 1:
                    need(rank, ("I", s + 1, m), a)
            if kind == "W" and a.op == "W":
                need(rank, ("I", s, m), a)
            done[rank].add((kind, s, m))
        start, end = clock[rank], clock[rank] + costs.price(a)
        timeline[rank].append((start, end, a))
        clock[rank] = end

    def post(rank: int, batch: list[Action]) -> list:
        ops = []
        for a in batch:
            if a.peer is None or not 0 <= a.peer < n or a.peer == rank:
                raise ScheduleError(f"rank {rank}: {a} has a bad peer")
            if a.op in ("SEND_F", "SEND_B"):
                part = ("F" if a.op == "SEND_F" else "I", a.stage, a.microbatch)
                if part not in done[rank]:
                    raise ScheduleError(f"rank {rank}: {a} sends {part} before computing it")
                if (part, a.peer) in sent:
                    raise ScheduleError(f"rank {rank}: {a} is sent twice")
                sent.add((part, a.peer))
                ch, table = (rank, a.peer), sends
            else:
                ch, table = (a.peer, rank), recvs
            table[ch].append((a, clock[rank]))
            ops.append((ch, a.op in ("SEND_F", "SEND_B"), len(table[ch]) - 1))
        return ops

    def try_complete(rank: int, batch: list[Action], ops: list) -> bool:
        has_recv = any(not is_send for _, is_send, _ in ops)
        sends_wait = wait == "all" or (wait == "batch" and has_recv)
        finish = clock[rank]
        for ch, is_send, i in ops:
            if i >= len(recvs[ch] if is_send else sends[ch]):
                if is_send and not sends_wait:
                    continue
                return False
            (send, t_send), (recv, t_recv) = sends[ch][i], recvs[ch][i]
            _check_pair(ch, i, send, recv)
            if sends_wait or not is_send:
                finish = max(finish, max(t_send, t_recv) + costs.comm)
        for ch, is_send, i in ops:
            if is_send:
                continue
            a = recvs[ch][i][0]
            part = ("F", a.stage - 1, a.microbatch) if a.op == "RECV_F" else ("I", a.stage + 1, a.microbatch)
            user = ("F" if a.op == "RECV_F" else "I", a.stage, a.microbatch)
            if where.get(part) != ch[0] or where.get(user) != rank:
                raise ScheduleError(f"rank {rank}: {a}, but {part} runs on rank {where.get(part)} "
                                    f"and {user} on rank {where.get(user)}")
            received[rank].add(part)
        comm_log[rank].append((clock[rank], finish, tuple(batch)))
        clock[rank] = finish
        return True

    progress = True
    while progress:
        progress = False
        for rank in range(n):
            while pc[rank] < len(steps[rank]):
                step = steps[rank][pc[rank]]
                if not isinstance(step, list):
                    run_compute(rank, step)
                else:
                    if posted[rank] is None:
                        posted[rank] = post(rank, step)
                    if not try_complete(rank, step, posted[rank]):
                        break
                    posted[rank] = None
                pc[rank] += 1
                progress = True

    stuck = [r for r in range(n) if pc[r] < len(steps[r])]
    if stuck:
        lines = []
        for r in stuck:
            waiting = [str((sends if is_send else recvs)[ch][i][0]) for ch, is_send, i in posted[r]
                       if i >= len((recvs if is_send else sends)[ch])]
            lines.append(f"rank {r}: batch [{' '.join(map(str, steps[r][pc[r]]))}] waits on {', '.join(waiting)}")
        raise ScheduleDeadlock("deadlock:\n" + "\n".join(lines))
    for ch in sorted(set(sends) | set(recvs)):
        if len(sends[ch]) != len(recvs[ch]):
            raise ScheduleError(f"ranks {ch[0]}->{ch[1]}: {len(sends[ch])} sends but {len(recvs[ch])} receives")
        for i in range(len(sends[ch])):
            _check_pair(ch, i, sends[ch][i][0], recvs[ch][i][0])

    makespan = max([t[-1][1] for t in timeline if t] + [c[-1][1] for c in comm_log if c], default=0.0)
    busy = [sum(end - start for start, end, _ in t) for t in timeline]
    return SimResult(
        timeline=timeline,
        comm=comm_log,
        makespan=makespan,
        busy=busy,
        bubble=[makespan - b for b in busy],
        peak_activations=[_peak_activations(t) for t in timeline],
        param_copies=[len({s for _, _, a in t for _, s, _ in _parts(a)}) for t in timeline],
        messages={ch: [(s[0], r[0]) for s, r in zip(sends[ch], recvs[ch])] for ch in sorted(sends)},
    )


@dataclass(frozen=True)
class StepTime:
    makespan: float
    busy: list[float]
    bubble: list[float]

    @property
    def max_bubble(self) -> float:
        return max(self.bubble)


class _Unfinished(Exception):
    """step_time met something it leaves to simulate()."""


def step_time(schedules: Sequence[Sequence[Action]], costs: Costs | None = None, wait: str = "batch") -> StepTime:
    """simulate()'s makespan, busy and bubble, without its checks and without a timeline: about 10x
    faster (`moeforge plan`'s four schedules at 16 ranks x 120 micro-batches: 0.07 s, not 0.8 s).

    For action lists simulate() accepts, such as the generators' (tests/unit/test_schedule.py, and
    tests/unit/test_plan_speed.py at the plan's 16 x 120): it trusts that every part runs once, after
    what it needs, and that paired messages carry the same tensor. tests/unit/test_simulate.py holds
    its numbers equal to simulate()'s, bit for bit. What it cannot finish (a deadlock, a send nobody
    receives, an unknown op, a bad peer, a negative cost) it hands to simulate(), which raises the
    error that names the fault."""
    if wait not in WAIT_MODES:
        raise ValueError(f"{wait=}, expected one of {WAIT_MODES}")
    costs = costs or Costs()
    try:
        return _step_time(schedules, costs, wait)
    except _Unfinished:
        r = simulate(schedules, costs, wait)
        return StepTime(r.makespan, r.busy, r.bubble)


def _step_time(schedules: Sequence[Sequence[Action]], costs: Costs, wait: str) -> StepTime:
    # simulate()'s loop with nothing but the clocks: a rank runs until a batch waits for a message
    # whose other side is not posted yet; the sweep repeats while some rank moves.
    price = {"F": costs.F, "B": costs.B, "W": costs.W, "BW": costs.full_backward, "FB": costs.overlapped}
    comm = costs.comm
    if not all(p >= 0 for p in (*price.values(), comm)):  # a clock could go back; the makespan below assumes not
        raise _Unfinished
    n = len(schedules)
    sent = [[[] for _ in range(n)] for _ in range(n)]  # [src][dst]: times the sends were posted, in order
    got = [[[] for _ in range(n)] for _ in range(n)]  # [src][dst]: times the receives were posted
    pc, clock = [0] * n, [0.0] * n
    busy = [0.0] * n  # the sum of end - start over each rank's compute actions, in order (as simulate())
    # the posted batch of each rank: [the messages it waits for, each (send times, recv times, index), the first
    # one whose other side may not be posted yet]
    waiting: list[list | None] = [None] * n
    progress = True
    while progress:
        progress = False
        for rank in range(n):
            actions, i, t, b = schedules[rank], pc[rank], clock[rank], busy[rank]
            end = len(actions)
            while True:
                if waiting[rank] is None:
                    while i < end:  # compute actions up to the next batch
                        p = price.get(actions[i].op)
                        if p is None:
                            break
                        start, t = t, t + p
                        b += t - start
                        i += 1
                    if i == end:
                        break
                    posted, has_recv = [], False  # post the batch
                    while i < end and actions[i].op not in price:
                        a = actions[i]
                        peer = a.peer
                        if peer is None or not 0 <= peer < n or peer == rank:
                            raise _Unfinished
                        if a.op == "SEND_F" or a.op == "SEND_B":
                            sends, recvs = sent[rank][peer], got[rank][peer]
                            posted.append((True, sends, recvs, len(sends)))
                            sends.append(t)
                        elif a.op == "RECV_F" or a.op == "RECV_B":
                            sends, recvs = sent[peer][rank], got[peer][rank]
                            posted.append((False, sends, recvs, len(recvs)))
                            recvs.append(t)
                            has_recv = True
                        else:
                            raise _Unfinished
                        i += 1
                    sends_wait = wait == "all" or (wait == "batch" and has_recv)
                    waiting[rank] = [[m[1:] for m in posted if sends_wait or not m[0]], 0]
                msgs, j = waiting[rank]
                while j < len(msgs) and msgs[j][2] < len(msgs[j][0]) and msgs[j][2] < len(msgs[j][1]):
                    j += 1
                if j < len(msgs):
                    waiting[rank][1] = j
                    break
                finish = t
                for sends, recvs, k in msgs:
                    t_send, t_recv = sends[k], recvs[k]
                    arrival = (t_recv if t_recv > t_send else t_send) + comm  # max(t_send, t_recv) + comm
                    if arrival > finish:
                        finish = arrival
                t = finish
                waiting[rank] = None
            if i != pc[rank]:  # it posted: only that lets another rank move
                progress = True
            pc[rank], clock[rank], busy[rank] = i, t, b

    if any(pc[r] < len(schedules[r]) or waiting[r] is not None for r in range(n)):
        raise _Unfinished  # a deadlock
    if any(len(sent[a][b]) != len(got[a][b]) for a in range(n) for b in range(n)):
        raise _Unfinished  # a send nobody receives, or a receive nobody sends
    # the clocks never go back, so each rank's last end is its clock
    makespan = max((clock[r] for r in range(n) if schedules[r]), default=0.0)
    return StepTime(makespan, busy, [makespan - b for b in busy])


def _check_pair(ch: tuple[int, int], i: int, send: Action, recv: Action) -> None:
    ok = (
        (send.op, recv.op) in (("SEND_F", "RECV_F"), ("SEND_B", "RECV_B"))
        and send.microbatch == recv.microbatch
        and recv.stage == send.stage + (1 if send.op == "SEND_F" else -1)
    )
    if not ok:
        raise ScheduleError(f"ranks {ch[0]}->{ch[1]}, message {i}: {send} does not match {recv}")


def _peak_activations(timeline: Sequence[tuple[float, float, Action]]) -> int:
    live = peak = 0
    for _, _, a in timeline:
        parts = _parts(a)
        live += sum(kind == "F" for kind, _, _ in parts)
        peak = max(peak, live)
        live -= sum(kind == "I" for kind, _, _ in parts)
    return peak


def to_chrome_trace(timeline: Sequence[Sequence[tuple[float, float, object]]], path: str | None = None,
                    seconds_per_unit: float = 1.0) -> dict:
    """Chrome trace JSON ({"traceEvents": [...]}, ph "X", pid = rank, ts/dur in microseconds)
    of per-rank (start, end, what) tuples: SimResult.timeline (or .comm), or a measured timeline
    in seconds with `what` a name; comm goes on thread 1, compute on 0. Simulated times are in cost units; seconds_per_unit scales
    them. Opens in chrome://tracing and ui.perfetto.dev. Written to `path` if given."""
    events: list[dict] = []
    for rank, items in enumerate(timeline):
        events.append({"name": "process_name", "ph": "M", "pid": rank, "tid": 0, "args": {"name": f"rank {rank}"}})
        for start, end, what in items:
            if isinstance(what, tuple) and not isinstance(what, Action):  # a comm batch
                name, cat = " ".join(map(str, what)), "comm"
            else:
                name, cat = str(what), "comm" if getattr(what, "op", None) in COMM_OPS else "compute"
            events.append({"name": name, "cat": cat, "ph": "X", "pid": rank, "tid": int(cat == "comm"),
                           "ts": start * seconds_per_unit * 1e6, "dur": (end - start) * seconds_per_unit * 1e6})
    trace = {"traceEvents": events, "displayTimeUnit": "ms"}
    if path is not None:
        with open(path, "w") as f:
            json.dump(trace, f)
    return trace
