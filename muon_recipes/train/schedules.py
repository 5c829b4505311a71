"""Learning-rate schedules as multipliers of each param group's base lr.

`lr_multiplier(step, ...)` returns the factor for the lr used at optimizer step `step` (0-based). The trainer
wraps it in `torch.optim.lr_scheduler.LambdaLR`, so every param group (Muon and AdamW, each with its own base
lr) follows the same shape and the schedule's state lives in `scheduler.state_dict()`.

* `cosine`: linear warmup, then cosine decay to `min_lr_ratio` (Loshchilov & Hutter 2017, SGDR).
* `wsd`: warmup-stable-decay: linear warmup, constant, then a linear decay over the last `decay_fraction` of
  the steps to `min_lr_ratio` (Hu et al. 2024, MiniCPM; Hägele et al. 2024).
* `constant`: linear warmup, then constant.
"""

from __future__ import annotations

import math

from muon_recipes.choices import LR_SCHEDULES


def lr_multiplier(step: int, *, total_steps: int, schedule: str, warmup_steps: int,
                  min_lr_ratio: float = 0.1, decay_fraction: float = 0.2) -> float:
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "wsd":
        decay_steps = int(round(decay_fraction * total_steps))
        decay_start = total_steps - decay_steps
        if step < decay_start or decay_steps == 0:
            return 1.0
        progress = min(1.0, (step - decay_start + 1) / decay_steps)
        return 1.0 - (1 - min_lr_ratio) * progress
    raise ValueError(f"lr schedule {schedule!r}: must be one of {', '.join(LR_SCHEDULES)}")
