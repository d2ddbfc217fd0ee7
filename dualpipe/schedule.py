"""Pipeline schedules as data: each rank's ordered list of `Action`s (no torch here).

Four schedules, for `pp` pipeline ranks and `n_micro` micro-batches:

    1f1b       stage s on rank s; full backward (BW) right after each steady-state forward
    zb1p       ZB-H1 (Qi et al. 2023): backward split into B (input grad) and W (weight grad);
               rank r defers its first r W's to fill the cool-down bubble
    dualpipe   DeepSeek-V3 (TR §3.2.1): pp stages, every stage held twice; rank r holds stage r
               for micro-batches [0, n/2) (they enter at rank 0) and stage pp-1-r for
               micro-batches [n/2, n) (they enter at rank pp-1)
    dualpipev  the V-shaped variant: 2*pp stages; rank r holds stages r and 2*pp-1-r; every
               micro-batch enters at rank 0, turns at rank pp-1 and its loss is on rank 0

DualPipe and DualPipeV follow DeepSeek's 8 steps (dualpipe.py / dualpipev.py in
deepseek-ai/DualPipe), including where every send and receive is posted. One switch:
split_middle_pair=True is DeepSeek's code exactly, where the middle ranks (pp/2-1 and pp/2;
DualPipeV: pp-1) run the first pair of step 4 as F then BW, not overlapped. The default, False,
overlaps that pair too: it is the schedule whose bubble is the report's formula (simulate.py).
The loss is computed in the F of the last stage: DualPipe stage pp-1 on rank pp-1 for
micro-batches [0, n/2) and on rank 0 for [n/2, n); DualPipeV stage 2*pp-1 on rank 0.

Ops (`Action.op`); str(action) reads stage, op, micro-batch, e.g. 3F12, 3SEND_F12>4:
    F        forward of (stage, microbatch)
    B        backward for inputs of (stage, microbatch); its W comes later
    W        backward for weights of (stage, microbatch), after its B
    BW       full backward (inputs and weights in one pass) of (stage, microbatch)
    FB       forward of (stage, microbatch) overlapped with the full backward (BW) of
             (b_stage, b_microbatch): the report's F&B
    SEND_F   send the output of F(stage, microbatch) to rank `peer`
    RECV_F   receive the input of F(stage, microbatch) from rank `peer`
    SEND_B   send the input grad made by the backward of (stage, microbatch) to rank `peer`
    RECV_B   receive the output grad that the backward of (stage, microbatch) needs, from `peer`

A send carries the sender's stage and a receive the receiver's stage: SEND_F(s, m) pairs with
RECV_F(s+1, m) and SEND_B(s, m) with RECV_B(s-1, m). When the neighbouring stage lives on the
same rank (DualPipeV's turn at rank pp-1) there is no send or receive: the runtime hands the
tensor over locally. W's run in the order their B's ran (a FIFO per rank).

Communication batches, the contract with the runtime: the maximal run of consecutive SEND/RECV
actions between two compute actions (or after the last one) is ONE batch. Issue it with one
`dist.batch_isend_irecv`, ops in list order. Before the next compute action, wait for every
request of a batch that holds a receive (its sends too: on NCCL the requests of one call
complete together); a batch of sends only need not be waited before the end of the step (keep
its tensors alive until then). Messages between two ranks match in posting order: the k-th send
from a to b is the k-th receive on b from a. simulate(wait="batch") models exactly this and
checks that paired messages describe the same tensor. Waiting for every batch in full
(DeepSeek's `_commit_and_wait_comm`, wait="all") is deadlock-free too, but ZB1P loses its gain:
a W then waits until the previous rank posts the receive of the B just sent, and its bubble
becomes larger than 1F1B's (the simulated bubbles: docs/dualpipe.md).
"""
from __future__ import annotations

from collections import deque
from typing import NamedTuple, Sequence

SCHEDULES = ("1f1b", "zb1p", "dualpipe", "dualpipev")
COMPUTE_OPS = ("F", "B", "W", "BW", "FB")
COMM_OPS = ("SEND_F", "RECV_F", "SEND_B", "RECV_B")


class Action(NamedTuple):
    op: str
    stage: int  # global stage index (for FB: the forward's stage)
    microbatch: int  # (for FB: the forward's micro-batch)
    peer: int | None = None  # SEND_*/RECV_*: the other rank
    b_stage: int | None = None  # FB only: stage of the overlapped full backward
    b_microbatch: int | None = None  # FB only

    @property
    def is_compute(self) -> bool:
        return self.op in COMPUTE_OPS

    @property
    def is_comm(self) -> bool:
        return self.op in COMM_OPS

    def __str__(self) -> str:
        if self.op == "FB":
            return f"{self.stage}F{self.microbatch}&{self.b_stage}BW{self.b_microbatch}"
        if self.is_comm:
            arrow = ">" if self.op.startswith("SEND") else "<"
            return f"{self.stage}{self.op}{self.microbatch}{arrow}{self.peer}"
        return f"{self.stage}{self.op}{self.microbatch}"


# ---------------------------------------------------------------------------------------------
# Placement and validation


def num_stages(name: str, pp: int) -> int:
    return 2 * pp if name == "dualpipev" else pp


def stage_placement(name: str, pp: int) -> list[tuple[int, ...]]:
    """Stages held by each rank, in local module order (DualPipe: module 0, module 1)."""
    _check_name(name)
    if name == "dualpipe":
        return [(r, pp - 1 - r) for r in range(pp)]
    if name == "dualpipev":
        return [(r, 2 * pp - 1 - r) for r in range(pp)]
    return [(r,) for r in range(pp)]


def is_reverse(name: str, n_micro: int, microbatch: int) -> bool:
    """DualPipe only: micro-batches [n/2, n) flow from rank pp-1 towards rank 0."""
    return name == "dualpipe" and microbatch >= n_micro // 2


def stage_to_rank(name: str, pp: int, stage: int, reverse: bool = False) -> int:
    """The rank that runs `stage` (for DualPipe, for the direction `reverse`, see is_reverse)."""
    _check_name(name)
    if not 0 <= stage < num_stages(name, pp):
        raise ValueError(f"{stage=} out of range for {name} with {pp=}")
    if name == "dualpipe":
        return pp - 1 - stage if reverse else stage
    if name == "dualpipev":
        return stage if stage < pp else 2 * pp - 1 - stage
    return stage


def validate(name: str, pp: int, n_micro: int, rank: int | None = None) -> None:
    """Raise ValueError, with the numbers, unless (pp, n_micro[, rank]) is valid for `name`."""
    _check_name(name)
    if pp < 1 or n_micro < 1:
        raise ValueError(f"{name}: need pp >= 1 and n_micro >= 1, got {pp=}, {n_micro=}")
    if name == "dualpipe" and (pp % 2 or n_micro % 2 or n_micro < 2 * pp):
        raise ValueError(f"dualpipe: need pp even, n_micro even and n_micro >= 2*pp, got {pp=}, {n_micro=}")
    if name == "dualpipev" and n_micro < 2 * pp:
        raise ValueError(f"dualpipev: need n_micro >= 2*pp (the number of stages), got {pp=}, {n_micro=}")
    if rank is not None and not 0 <= rank < pp:
        raise ValueError(f"{name}: need 0 <= rank < pp, got {rank=}, {pp=}")


def _check_name(name: str) -> None:
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}, expected one of {SCHEDULES}")


# ---------------------------------------------------------------------------------------------
# The emitter: DeepSeek's chunk helpers, writing actions instead of running them


class _Phase(NamedTuple):
    stage: int
    microbatches: Sequence[int]  # in the order this rank runs them
    prev: int | None  # rank holding the previous stage; None: first stage or same rank
    next: int | None  # rank holding the next stage; None: last stage or same rank


class _Emitter:
    """Appends one rank's actions. A phase is one local stage; counters are per phase."""

    def __init__(self, phases: list[_Phase]):
        self.phases = phases
        self.actions: list[Action] = []
        self.counters = {k: [0] * len(phases) for k in ("f", "b", "send_f", "send_b", "recv_f", "recv_b")}
        self.w_queue: deque[tuple[int, int]] = deque()  # FIFO of (stage, microbatch) awaiting W

    def _next(self, kind: str, p: int) -> tuple[int, int]:
        i = self.counters[kind][p]
        self.counters[kind][p] += 1
        return self.phases[p].stage, self.phases[p].microbatches[i]

    def _comm(self, op: str, kind: str, p: int, peer: int | None) -> None:
        if peer is not None:
            stage, mb = self._next(kind, p)
            self.actions.append(Action(op, stage, mb, peer))

    def recv_forward(self, p: int) -> None:
        self._comm("RECV_F", "recv_f", p, self.phases[p].prev)

    def send_forward(self, p: int) -> None:
        self._comm("SEND_F", "send_f", p, self.phases[p].next)

    def recv_backward(self, p: int) -> None:
        self._comm("RECV_B", "recv_b", p, self.phases[p].next)

    def send_backward(self, p: int) -> None:
        self._comm("SEND_B", "send_b", p, self.phases[p].prev)

    def forward_compute(self, p: int) -> None:
        self.actions.append(Action("F", *self._next("f", p)))

    def backward_compute(self, p: int, zero_bubble: bool = False) -> None:
        stage, mb = self._next("b", p)
        if zero_bubble:
            self.w_queue.append((stage, mb))
        self.actions.append(Action("B" if zero_bubble else "BW", stage, mb))

    def weight_compute(self) -> None:
        self.actions.append(Action("W", *self.w_queue.popleft()))

    def forward_chunk(self, p: int, recv: bool = True, send: bool = True) -> None:
        if recv:
            self.recv_forward(p)
        self.forward_compute(p)
        if send:
            self.send_forward(p)

    def backward_chunk(self, p: int, zero_bubble: bool = False, recv: bool = True, send: bool = True) -> None:
        if recv:
            self.recv_backward(p)
        self.backward_compute(p, zero_bubble)
        if send:
            self.send_backward(p)

    def forward_backward_chunk(self, p0: int, p1: int, recv0: bool = True) -> None:
        if recv0:
            self.recv_forward(p0)
        self.recv_backward(p1)
        f_stage, f_mb = self._next("f", p0)
        b_stage, b_mb = self._next("b", p1)
        self.actions.append(Action("FB", f_stage, f_mb, None, b_stage, b_mb))
        self.send_forward(p0)
        self.send_backward(p1)


def _linear_phase(rank: int, pp: int, n_micro: int) -> _Phase:
    return _Phase(rank, range(n_micro), rank - 1 if rank > 0 else None, rank + 1 if rank < pp - 1 else None)


# ---------------------------------------------------------------------------------------------
# Generators


def one_f_one_b(rank: int, pp: int, n_micro: int) -> list[Action]:
    validate("1f1b", pp, n_micro, rank)
    e = _Emitter([_linear_phase(rank, pp, n_micro)])
    warmup = min(pp - 1 - rank, n_micro)
    # Warm-up: nF
    for _ in range(warmup):
        e.forward_chunk(0)
    # Steady state: 1F1B
    for _ in range(n_micro - warmup):
        e.forward_chunk(0)
        e.backward_chunk(0)
    # Cool-down: nB
    for _ in range(warmup):
        e.backward_chunk(0)
    return e.actions


def zb1p(rank: int, pp: int, n_micro: int) -> list[Action]:
    validate("zb1p", pp, n_micro, rank)
    e = _Emitter([_linear_phase(rank, pp, n_micro)])
    warmup = min(pp - 1 - rank, n_micro)
    deferred = rank  # W's this rank holds back for the cool-down
    # Warm-up: nF
    for _ in range(warmup):
        e.forward_chunk(0)
    # Steady state: 1F1B1W (the W of an older chunk, once `rank` W's are held back)
    for i in range(n_micro - warmup):
        e.forward_chunk(0)
        e.backward_chunk(0, zero_bubble=True)
        if i >= deferred:
            e.weight_compute()
    # Cool-down: nBW, then the held-back W's fill the tail
    for i in range(n_micro - warmup, n_micro):
        e.backward_chunk(0, zero_bubble=True)
        if i >= deferred:
            e.weight_compute()
    while e.w_queue:
        e.weight_compute()
    return e.actions


def _dual(e: _Emitter, h: int, num_half_ranks: int, half_num_chunks: int, split_middle_pair: bool) -> list[Action]:
    """DeepSeek's 8 steps for half-rank h. Phase 0 is the local stage nearer its pipeline's
    entry, phase 1 the other one. DualPipe: (pp/2, h, n/2); DualPipeV: (pp, rank, n)."""
    is_middle = h == num_half_ranks - 1

    # Step 1: nF0
    for _ in range((num_half_ranks - h - 1) * 2):
        e.forward_chunk(0)

    # Step 2: nF0F1
    step_2 = h + 1
    e.recv_forward(0)
    for i in range(step_2):
        e.forward_chunk(0, recv=False, send=is_middle)
        e.recv_forward(0)
        e.forward_chunk(1, send=(not is_middle) or (i < step_2 - 1))
        if not is_middle:
            e.send_forward(0)

    # Step 3: nB1W1F1 (Use zero bubble)
    for _ in range(num_half_ranks - h - 1):
        e.backward_chunk(1, zero_bubble=True)
        e.recv_forward(1)
        e.weight_compute()
        e.forward_chunk(1, recv=False)

    # Step 4 (Main step): nF0B1F1B0
    for i in range(half_num_chunks - 2 * num_half_ranks + h + 1):
        if i == 0:
            if is_middle and not split_middle_pair:
                # The report's schedule: this pair overlapped too; F1 of step 2 goes out first.
                e.send_forward(1)
                e.forward_backward_chunk(0, 1, recv0=False)
            elif is_middle:
                # DeepSeek's code: "We don't overlap these two chunks to further reduce bubble size."
                e.forward_chunk(0, recv=False, send=False)
                e.send_forward(1)
                e.backward_chunk(1, send=False)
                e.send_forward(0)
                e.send_backward(1)
            else:
                e.forward_backward_chunk(0, 1, recv0=False)
        else:
            e.forward_backward_chunk(0, 1)
        e.forward_backward_chunk(1, 0)

    # Step 5: nB1F1B0
    for _ in range(num_half_ranks - h - 1):
        e.backward_chunk(1)
        e.forward_backward_chunk(1, 0)

    # Step 6: nB1B0 (The second half of the chunks use zero bubble)
    step_6 = h + 1
    zero_bubble = False
    for i in range(step_6):
        if i == step_6 // 2 and h % 2 == 1:
            zero_bubble = True
        e.backward_chunk(1, zero_bubble=zero_bubble)
        if i == step_6 // 2 and h % 2 == 0:
            zero_bubble = True
        e.backward_chunk(0, zero_bubble=zero_bubble)

    # Step 7: nWB0 (Use zero bubble)
    for _ in range(num_half_ranks - h - 1):
        e.weight_compute()
        e.backward_chunk(0, zero_bubble=True)

    # Step 8: nW
    for _ in range(h + 1):
        e.weight_compute()
    assert not e.w_queue, e.w_queue
    return e.actions


def dualpipe(rank: int, pp: int, n_micro: int, *, split_middle_pair: bool = False) -> list[Action]:
    validate("dualpipe", pp, n_micro, rank)
    half = n_micro // 2
    h = min(rank, pp - 1 - rank)
    first_half = rank < pp // 2
    # Phase 0 runs the direction that enters at this rank's end of the pipe, at stage h.
    near = range(0, half) if first_half else range(half, n_micro)
    far = range(half, n_micro) if first_half else range(0, half)
    towards_entry, away = (rank - 1, rank + 1) if first_half else (rank + 1, rank - 1)
    phases = [
        _Phase(h, near, towards_entry if h > 0 else None, away),
        _Phase(pp - 1 - h, far, away, towards_entry if h > 0 else None),
    ]
    return _dual(_Emitter(phases), h, pp // 2, half, split_middle_pair)


def dualpipev(rank: int, pp: int, n_micro: int, *, split_middle_pair: bool = False) -> list[Action]:
    validate("dualpipev", pp, n_micro, rank)
    last = rank == pp - 1
    phases = [
        _Phase(rank, range(n_micro), rank - 1 if rank > 0 else None, None if last else rank + 1),
        _Phase(2 * pp - 1 - rank, range(n_micro), None if last else rank + 1, rank - 1 if rank > 0 else None),
    ]
    return _dual(_Emitter(phases), rank, pp, n_micro, split_middle_pair)


GENERATORS = {"1f1b": one_f_one_b, "zb1p": zb1p, "dualpipe": dualpipe, "dualpipev": dualpipev}


def build_schedule(name: str, pp: int, n_micro: int, *, split_middle_pair: bool = False) -> list[list[Action]]:
    """Every rank's action list: build_schedule(name, pp, n)[rank]. `split_middle_pair` is for
    dualpipe/dualpipev only: True is DeepSeek's code, False the schedule of the report's table."""
    validate(name, pp, n_micro)
    kw = {"split_middle_pair": split_middle_pair} if name in ("dualpipe", "dualpipev") else {}
    return [GENERATORS[name](rank, pp, n_micro, **kw) for rank in range(pp)]


# ---------------------------------------------------------------------------------------------
# Text rendering


def _cell(action: Action, marked: frozenset = frozenset()) -> str:
    def mb(stage: int, microbatch: int) -> str:
        return f"{microbatch}'" if stage in marked else str(microbatch)

    if action.op == "FB":
        return f"F{mb(action.stage, action.microbatch)}B{mb(action.b_stage, action.b_microbatch)}"
    return f"{action.op}{mb(action.stage, action.microbatch)}"


def _marked_stages(actions: list[Action]) -> frozenset:
    """The higher stage of a rank that runs the same micro-batch in two stages (DualPipeV)."""
    stages: dict[int, set[int]] = {}
    for a in actions:
        if a.op in ("F", "FB"):
            stages.setdefault(a.microbatch, set()).add(a.stage)
    return frozenset(max(s) for s in stages.values() if len(s) > 1)


def format_schedule(schedules: Sequence[Sequence], unit: float | None = None, width: int = 4) -> str:
    """Render the compute actions of every rank as text, one row per rank.

    `schedules[r]` is rank r's action list (cells in list order) or a timeline of
    (start, end, action) tuples, simulated or measured; then a column is `unit` of time
    (default: the shortest action), `width` characters wide, and idle time shows as dots.
    A cell is the op and the micro-batch: F3, B3, W3, BW3, and F3B5 for an FB (forward of 3
    overlapped with the full backward of 5). Where a rank runs a micro-batch in both its stages
    (DualPipeV), the higher stage is primed: F3'. Comm actions are left out.
    """
    timed = any(not isinstance(item, Action) for items in schedules for item in items)
    if timed and unit is None:
        unit = min((end - start for items in schedules for start, end, _ in items if end > start), default=1.0)
    rows = []
    for rank, items in enumerate(schedules):
        actions = [item if not timed else item[2] for item in items]
        marked = _marked_stages([a for a in actions if isinstance(a, Action)])
        row = ""
        for item in items:
            if not timed:
                if item.is_compute:
                    row += _cell(item, marked) + " "
                continue
            start, end, action = item
            if isinstance(action, Action) and not action.is_compute:
                continue
            text = _cell(action, marked) if isinstance(action, Action) else str(action)
            col, span = round(start / unit) * width, max(1, round((end - start) / unit)) * width
            row = row.ljust(col, ".") + text.ljust(span)[:span]
        rows.append(f"rank {rank:>2} | {row.rstrip()}")
    return "\n".join(rows) + "\n"
