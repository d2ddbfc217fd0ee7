"""The `schedule` slice of the job config (conf/schedule/*.yaml). Used only when parallel.pp > 1."""
from __future__ import annotations

from dataclasses import dataclass

from .schedule import SCHEDULES


@dataclass(frozen=True)
class ScheduleConfig:
    name: str = "1f1b"  # 1f1b | zb1p | dualpipe | dualpipev
    overlap: bool = True  # F&B steps interleave one micro-batch's forward with another's backward around the EP all-to-all
    split_middle_pair: bool = False  # DualPipe(V): run the middle ranks' first F&B pair unoverlapped, as DeepSeek's code does
    fb_weight_split: bool = False  # F&B pairs: backward as B then W piece by piece, each W under its piece's reverse all-to-all

    def __post_init__(self):
        if self.name not in SCHEDULES:
            raise ValueError(f"schedule.name={self.name!r} not in {'|'.join(SCHEDULES)}")
