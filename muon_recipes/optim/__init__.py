"""Muon + AdamW with per-block Newton-Schulz orthogonalization.

`Muon` is the optimizer (one `torch.optim.Optimizer`, Muon and AdamW param groups, FSDP2-aware);
`newton_schulz` the orthogonalization; `build_optimizer` / `build_param_groups` turn a model's declared
layouts and an `OptimConfig` into groups; `describe_param_groups` is the start-up log line.
"""

from muon_recipes.optim.muon import Muon
from muon_recipes.optim.newton_schulz import coefficients, newton_schulz
from muon_recipes.optim.param_groups import build_optimizer, build_param_groups, describe_param_groups

__all__ = ["Muon", "newton_schulz", "coefficients", "build_optimizer", "build_param_groups",
           "describe_param_groups"]
