"""Bytes this rank sends over each link class, per expert-parallel collective.

Every all-to-all the dispatcher issues is recorded as (event, link, part) -> bytes, where
  event: dispatch_fwd, dispatch_bwd (the gradients going back), combine_fwd, combine_bwd;
  link:  inter (different nodes: InfiniBand) or intra (same node: NVLink); rows a rank keeps for
         itself cross no link and are not counted;
  part:  x (activations or their gradients), meta (gate weights + expert ids, or their gradients),
         counts (the per-rank row counts exchanged before a dispatch).
The link class of (src, dst) comes from `ranks_per_node` through comm.layout.EPTopology.link.

The training loop logs `as_dict()` (totals per event and link since the last `reset()`); tests and
the benchmark read single entries with `get()`. The counters are this rank's own: sum them over
ranks for a job-wide figure.

ZeRO-1's data-parallel traffic (parallel/zero.py) uses its own counters, `ByteCounters("dp/",
events=DP_EVENTS, links=None)`: grad_reduce_scatter and weight_all_gather, the bytes a rank sends in a
ring ((n-1)/n of each buffer), recorded with `add_collective`; no link class.
"""
from __future__ import annotations

from collections import defaultdict

EVENTS = ("dispatch_fwd", "dispatch_bwd", "combine_fwd", "combine_bwd")
PARTS = ("x", "meta", "counts")
DP_EVENTS = ("grad_reduce_scatter", "weight_all_gather")


class ByteCounters:
    def __init__(self, prefix: str = "ep/", events: tuple[str, ...] = EVENTS,
                 links: tuple[str, ...] | None = ("inter", "intra")):
        """links=None: collectives over a whole group, counted without a link class (add_collective)."""
        self.prefix, self.events, self.links = prefix, events, links
        self.reset()

    def reset(self) -> None:
        self.bytes: dict[tuple[str, str, str], int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)  # all-to-alls issued per event

    def add(self, event: str, link: str, part: str, nbytes: int) -> None:
        assert event in self.events and part in PARTS, f"{event=}, {part=}"
        if link != "self":
            self.bytes[(event, link, part)] += int(nbytes)

    def add_collective(self, event: str, nbytes: int) -> None:
        """One collective over a group (no link class): `nbytes` this rank sends."""
        assert self.links is None and event in self.events, f"{event=}, links={self.links}"
        self.calls[event] += 1
        self.bytes[(event, "all", "x")] += int(nbytes)

    def record_a2a(self, event: str, links: list[str], send_rows: list[int], part_row_bytes: dict[str, int]) -> None:
        """One all_to_all_single: send_rows[p] rows to ep rank p (whose link class is links[p]), each
        row made of part_row_bytes[part] bytes per part."""
        self.calls[event] += 1
        for link, rows in zip(links, send_rows):
            for part, b in part_row_bytes.items():
                self.add(event, link, part, rows * b)

    def get(self, event: str | None = None, link: str | None = None, part: str | None = None) -> int:
        """Sum over the entries matching every given field (None matches all)."""
        return sum(v for (e, l, p), v in self.bytes.items()
                   if (event is None or e == event) and (link is None or l == link) and (part is None or p == part))

    def as_dict(self, reset: bool = False) -> dict[str, int]:
        """{'ep/dispatch_fwd_inter_bytes': ..., ..., 'ep/a2a_calls': ...} for the training log; without
        links {'dp/grad_reduce_scatter_bytes': ..., 'dp/weight_all_gather_bytes': ..., 'dp/calls': ...}."""
        if self.links is None:
            out = {f"{self.prefix}{e}_bytes": self.get(e) for e in self.events}
            out[f"{self.prefix}calls"] = sum(self.calls.values())
        else:
            out = {f"{self.prefix}{e}_{l}_bytes": self.get(e, l) for e in self.events for l in self.links}
            out[f"{self.prefix}a2a_calls"] = sum(self.calls.values())
        if reset:
            self.reset()
        return out
