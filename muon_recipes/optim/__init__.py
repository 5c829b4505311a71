"""Muon + AdamW with per-block Newton-Schulz orthogonalization.

`Muon` is the optimizer (one `torch.optim.Optimizer`, Muon and AdamW param groups, FSDP2-aware, every knob a
constructor argument); `newton_schulz` the orthogonalization, with the same defaults; `build_optimizer` /
`build_param_groups` turn a model's declared layouts and an `OptimConfig` into groups; `describe_param_groups`
is the start-up log line.

Modules: `blocks` (what a parameter stores and how its update splits into blocks), `newton_schulz`,
`orthogonalize` (batched per-block Newton-Schulz), `muon`, `sharded` (the step on FSDP2-sharded parameters),
`dispatch` (every Triton-or-torch decision and its thresholds), `kernels/` (Triton), `param_groups`. The lists
of valid names are in `muon_recipes.choices`.
"""

from muon_recipes.optim.muon import Muon
from muon_recipes.optim.newton_schulz import coefficients, newton_schulz
from muon_recipes.optim.param_groups import build_optimizer, build_param_groups, describe_param_groups

__all__ = ["Muon", "newton_schulz", "coefficients", "build_optimizer", "build_param_groups",
           "describe_param_groups"]
