"""Metric sinks: run_dir/metrics.jsonl always (one JSON object per step), wandb when logging=wandb."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

from .config import LoggingConfig


class MetricsLogger:
    def __init__(self, run_dir: str | Path, cfg: LoggingConfig, config_dict: dict, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._wandb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", buffering=1)
        if cfg.backend == "wandb" and cfg.wandb_mode != "disabled":
            import wandb  # the API key comes from WANDB_API_KEY only; it is never printed or stored here

            os.environ.setdefault("WANDB_SILENT", "true")
            self._wandb = wandb.init(project=cfg.wandb_project, mode=cfg.wandb_mode, dir=str(run_dir),
                                     config=config_dict)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._file.write(json.dumps(clean) + "\n")
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
