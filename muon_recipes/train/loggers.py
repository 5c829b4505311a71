"""Where metrics go: console (rank 0), `metrics.jsonl` in the run directory, and wandb (offline by default).

Only rank 0 logs. Each logger takes `log(metrics: dict)` with plain numbers; `close()` flushes.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Optional


def duration(seconds: float) -> str:
    """A span of time as people read it: 4.2s, 95s, 12.5min, 3.1h (a run's ETA, a sweep job's time)."""
    if seconds < 10:
        return f"{seconds:.1f}s"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f}min"
    return f"{seconds / 3600:.1f}h"


def token_count(n: float) -> str:
    """24,576 / 47.2M / 1.3B: a number of tokens as people read it."""
    if n >= 1e9:
        return f"{n / 1e9:.1f}B"
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{int(n):,}"


def _fmt(key: str, value: Any) -> str:
    if key == "eta_s":
        return f"eta {duration(value)}"
    if key == "tokens_left":
        return f"{token_count(value)} tokens left"
    if isinstance(value, float):
        if key in ("lr",):
            return f"{key} {value:.2e}"
        if key.endswith("_per_s"):
            return f"{key} {value:,.0f}"
        if key == "mfu":
            return f"{key} {100 * value:.1f}%"
        if key.endswith("_s"):
            return f"{key} {value * 1e3:.1f}ms" if value < 1 else f"{key} {value:.2f}s"
        if abs(value) >= 1e4:
            return f"{key} {value:,.0f}"
        return f"{key} {value:.4g}"
    return f"{key} {value}"


class ConsoleLogger:
    KEYS = ("step", "loss", "bpb", "eval_loss", "eval_bpb", "lr", "grad_norm", "tokens_per_s", "mfu", "step_time_s",
            "optim_time_s", "peak_mem_gib", "eta_s", "tokens_left")

    def log(self, metrics: dict) -> None:
        parts = [_fmt(k, metrics[k]) for k in self.KEYS if metrics.get(k) is not None]
        print(" | ".join(parts), flush=True)

    def close(self) -> None:
        pass


class JsonlLogger:
    """One JSON object per logged step, appended (a resumed run continues the same file)."""

    def __init__(self, path: str):
        self.path = path
        self._f = open(path, "a", buffering=1)

    def log(self, metrics: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        try:
            self._f.write(json.dumps(clean) + "\n")
        except OSError as e:  # a file object's write error does not name its file
            raise OSError(e.errno, f"{e.strerror} (writing {self.path})") from None

    def close(self) -> None:
        self._f.close()


class WandbLogger:
    """wandb run with the full resolved config, grouped by experiment so sweeps line up on the dashboard."""

    def __init__(self, *, run_dir: str, mode: str, project: str, entity: str, group: str, tags: list,
                 name: str, config: dict, resume_id: Optional[str] = None):
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        self._wandb = wandb
        self.run = wandb.init(project=project, entity=entity or None, group=group or None, tags=list(tags),
                              name=name or None, config=config, dir=run_dir, mode=mode, id=resume_id,
                              resume="allow" if resume_id else None, reinit=True)

    def log(self, metrics: dict) -> None:
        step = metrics.get("step")
        self._wandb.log({k: v for k, v in metrics.items() if v is not None}, step=step)

    def close(self) -> None:
        self.run.finish()


class Loggers:
    def __init__(self, loggers: list):
        self.loggers = loggers

    def log(self, metrics: dict) -> None:
        for lg in self.loggers:
            lg.log(metrics)

    def close(self) -> None:
        for lg in self.loggers:
            lg.close()
