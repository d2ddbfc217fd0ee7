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
simulate(..., check=False) skips all but the last two (a deadlock, a send without its receive), for
lists that are known to pass them (the planner's): the same numbers, without the checks' bookkeeping.

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
FB both chunks are live. peak_activations[r] is the most live chunks on rank r at once; live_peaks
counts it (and the bytes, given each stage's) on any action list, such as the planner's.
"""
from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Sequence

from moeforge.dualpipe.schedule import COMM_OPS, COMPUTE_OPS, Action, num_stages

WAIT_MODES = ("batch", "recvs", "all")
_ONE = defaultdict(lambda: 1)  # live_peaks without activation sizes: every chunk counts 1


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

    @property
    def max_bubble(self) -> float:
        return max(self.bubble)

    @property
    def peak_activations(self) -> list[int]:
        return [live_peaks(a for _, _, a in t)[0] for t in self.timeline]

    @property
    def param_copies(self) -> list[int]:
        """Stages held per rank: 1 for 1F1B/ZB1P, 2 for DualPipe/V."""
        return [len({s for _, _, a in t for _, s, _ in _parts(a)}) for t in self.timeline]

    @property
    def messages(self) -> dict[tuple[int, int], list[tuple[Action, Action]]]:
        """(src, dst) -> its (send, receive) pairs: the k-th send with the k-th receive."""
        sends, recvs = defaultdict(list), defaultdict(list)
        for rank, batches in enumerate(self.comm):
            for _, _, batch in batches:
                for a in batch:
                    if a.op in ("SEND_F", "SEND_B"):
                        sends[rank, a.peer].append(a)
                    else:
                        recvs[a.peer, rank].append(a)
        return {ch: list(zip(sends[ch], recvs[ch])) for ch in sorted(sends)}


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


class _Checks:
    """The checks of the module docstring, called by simulate() as the clocks run."""

    def __init__(self, schedules: Sequence[Sequence[Action]]):
        self.where, self.n_stages = _locate(schedules)
        self.done: list[set] = [set() for _ in schedules]  # parts computed on this rank
        self.received: list[set] = [set() for _ in schedules]  # parts whose result this rank received
        self.sent: set = set()

    def _need(self, rank: int, part: tuple[str, int, int], a: Action) -> None:
        if part in self.done[rank]:
            return
        if self.where[part] == rank:
            raise ScheduleError(f"rank {rank}: {a} runs before {part}, which is on the same rank")
        if part not in self.received[rank]:
            raise ScheduleError(f"rank {rank}: {a} needs {part} from rank {self.where[part]} but did not receive it")

    def compute(self, rank: int, a: Action) -> None:
        for kind, s, m in _parts(a):
            if kind == "F" and s > 0:
                self._need(rank, ("F", s - 1, m), a)
            if kind == "I":
                self._need(rank, ("F", s, m), a)
                if s < self.n_stages - 1:
                    self._need(rank, ("I", s + 1, m), a)
            if kind == "W" and a.op == "W":
                self._need(rank, ("I", s, m), a)
            self.done[rank].add((kind, s, m))

    def send(self, rank: int, a: Action) -> None:
        part = ("F" if a.op == "SEND_F" else "I", a.stage, a.microbatch)
        if part not in self.done[rank]:
            raise ScheduleError(f"rank {rank}: {a} sends {part} before computing it")
        if (part, a.peer) in self.sent:
            raise ScheduleError(f"rank {rank}: {a} is sent twice")
        self.sent.add((part, a.peer))

    def receive(self, rank: int, a: Action) -> None:
        part = ("F", a.stage - 1, a.microbatch) if a.op == "RECV_F" else ("I", a.stage + 1, a.microbatch)
        user = ("F" if a.op == "RECV_F" else "I", a.stage, a.microbatch)
        if self.where.get(part) != a.peer or self.where.get(user) != rank:
            raise ScheduleError(f"rank {rank}: {a}, but {part} runs on rank {self.where.get(part)} "
                                f"and {user} on rank {self.where.get(user)}")
        self.received[rank].add(part)


def simulate(schedules: Sequence[Sequence[Action]], costs: Costs | None = None, wait: str = "batch",
             check: bool = True) -> SimResult:
    """Run the ranks' lists together (the module docstring). check=False skips the checks, for lists
    known to pass them, such as the generators' (`moeforge plan` prices four schedules of 16 x 120): the
    same result, faster. A deadlock, an unmatched message, a bad peer or an unknown op still raise;
    with any other fault the numbers mean nothing."""
    if wait not in WAIT_MODES:
        raise ValueError(f"{wait=}, expected one of {WAIT_MODES}")
    costs = costs or Costs()
    checks = _Checks(schedules) if check else None
    price = {"F": costs.F, "B": costs.B, "W": costs.W, "BW": costs.full_backward, "FB": costs.overlapped}
    n = len(schedules)
    # [src][dst]: the sends (receives) posted on that channel, each (action, time posted), in posting order
    sends = [[[] for _ in range(n)] for _ in range(n)]
    recvs = [[[] for _ in range(n)] for _ in range(n)]
    timeline: list[list] = [[] for _ in range(n)]
    comm_log: list[list] = [[] for _ in range(n)]
    pc, clock, busy = [0] * n, [0.0] * n, [0.0] * n  # busy: the sum of end - start over its compute actions
    # each rank's posted batch until it completes: [index of its first action, its messages as (this side's
    # list on the channel, the other side's, index in both, is a receive), the ones it waits for, how many
    # of those are known to have both sides posted]
    posted: list[list | None] = [None] * n
    comm = costs.comm
    # A rank runs until a batch waits for a message whose other side is not posted yet; the sweep repeats
    # while some rank posts (only that lets another rank move).
    progress = True
    while progress:
        progress = False
        for rank in range(n):
            actions, line, i, t, b = schedules[rank], timeline[rank], pc[rank], clock[rank], busy[rank]
            end = len(actions)
            while True:
                if posted[rank] is None:
                    while i < end:  # compute actions up to the next batch
                        a = actions[i]
                        p = price.get(a.op)
                        if p is None:
                            break
                        if checks:
                            checks.compute(rank, a)
                        start, t = t, t + p
                        b += t - start
                        line.append((start, t, a))
                        i += 1
                    if i == end:
                        break
                    first, msgs, has_recv = i, [], False  # post the batch
                    while i < end and actions[i].op not in price:
                        a = actions[i]
                        op, peer = a.op, a.peer
                        if op != "SEND_F" and op != "SEND_B" and op != "RECV_F" and op != "RECV_B":
                            _parts(a)  # raises: an unknown op
                        if peer is None or not 0 <= peer < n or peer == rank:
                            raise ScheduleError(f"rank {rank}: {a} has a bad peer")
                        if op == "SEND_F" or op == "SEND_B":
                            if checks:
                                checks.send(rank, a)
                            own, other, is_recv = sends[rank][peer], recvs[rank][peer], False
                        else:
                            own, other, is_recv = recvs[peer][rank], sends[peer][rank], True
                            has_recv = True
                        msgs.append((own, other, len(own), is_recv))
                        own.append((a, t))
                        i += 1
                    sends_wait = wait == "all" or (wait == "batch" and has_recv)
                    posted[rank] = [first, msgs, msgs if sends_wait else [m for m in msgs if m[3]], 0]
                first, msgs, waits, j = posted[rank]
                if checks:  # the messages whose both sides are posted, up to the first one the batch waits for
                    for m in msgs:
                        if m[2] < len(m[1]):
                            _check_message(rank, m)
                        elif m[3] or waits is msgs:
                            break
                while j < len(waits) and waits[j][2] < len(waits[j][1]):
                    j += 1
                if j < len(waits):
                    posted[rank][3] = j
                    break
                finish = t
                for own, other, k, _ in waits:
                    t_own, t_other = own[k][1], other[k][1]
                    arrival = (t_own if t_own > t_other else t_other) + comm  # max(t_send, t_recv) + comm
                    if arrival > finish:
                        finish = arrival
                if checks:
                    for own, _, k, is_recv in msgs:
                        if is_recv:
                            checks.receive(rank, own[k][0])
                comm_log[rank].append((t, finish, tuple(actions[first:i])))
                t = finish
                posted[rank] = None
            if i != pc[rank]:
                progress = True
            pc[rank], clock[rank], busy[rank] = i, t, b

    stuck = [r for r in range(n) if posted[r] is not None]
    if stuck:
        lines = []
        for r in stuck:
            first, msgs, _, _ = posted[r]
            waiting = [str(own[k][0]) for own, other, k, _ in msgs if k >= len(other)]
            batch = schedules[r][first:pc[r]]
            lines.append(f"rank {r}: batch [{' '.join(map(str, batch))}] waits on {', '.join(waiting)}")
        raise ScheduleDeadlock("deadlock:\n" + "\n".join(lines))
    for src in range(n):
        for dst in range(n):
            s, r = sends[src][dst], recvs[src][dst]
            if len(s) != len(r):
                raise ScheduleError(f"ranks {src}->{dst}: {len(s)} sends but {len(r)} receives")
            if checks:
                for k in range(len(s)):
                    _check_pair((src, dst), k, s[k][0], r[k][0])

    makespan = max([t[-1][1] for t in timeline if t] + [c[-1][1] for c in comm_log if c], default=0.0)
    return SimResult(
        timeline=timeline,
        comm=comm_log,
        makespan=makespan,
        busy=busy,
        bubble=[makespan - b for b in busy],
    )


def _check_message(rank: int, msg) -> None:
    own, other, k, is_recv = msg
    if is_recv:
        _check_pair((own[k][0].peer, rank), k, other[k][0], own[k][0])
    else:
        _check_pair((rank, own[k][0].peer), k, own[k][0], other[k][0])


def _check_pair(ch: tuple[int, int], i: int, send: Action, recv: Action) -> None:
    ok = (
        (send.op, recv.op) in (("SEND_F", "RECV_F"), ("SEND_B", "RECV_B"))
        and send.microbatch == recv.microbatch
        and recv.stage == send.stage + (1 if send.op == "SEND_F" else -1)
    )
    if not ok:
        raise ScheduleError(f"ranks {ch[0]}->{ch[1]}, message {i}: {send} does not match {recv}")


def live_peaks(actions: Iterable[Action], act_of_stage: Sequence[float] | None = None) -> tuple[int, float]:
    """(the most chunks, the most activation) live at once on a rank that runs `actions` in order (the
    module docstring: from a chunk's F to its input backward; during an FB both are live). Comm actions
    and W change nothing. act_of_stage[s]: one chunk of stage s; None: 1 per chunk."""
    act = _ONE if act_of_stage is None else act_of_stage
    chunks = most_chunks = 0
    live = peak = 0.0
    for a in actions:
        op = a.op
        if op == "F" or op == "FB":
            chunks += 1
            live += act[a.stage]
            most_chunks = max(most_chunks, chunks)
            peak = max(peak, live)
            if op == "FB":
                chunks -= 1
                live -= act[a.b_stage]
        elif op == "B" or op == "BW":
            chunks -= 1
            live -= act[a.stage]
    return most_chunks, peak


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
