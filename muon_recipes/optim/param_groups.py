"""From a model's declared parameter layouts and the optim config to `Muon` param groups.

The model says what each parameter is (`blocks.collect_layouts`: role, fused blocks, experts); the config
says the policy: which roles go to AdamW (`adamw_roles`, plus every 1-D parameter), and whether fused
weights are orthogonalized per block or whole (`split.qkv`, `split.gate_up`: split | fused;
`split.experts`: per_expert | fused). Muon parameters that end with the same (split_sizes, experts) share a
group, named so the start-up log line reads like the config.

Weight decay in the AdamW half: norm gains, biases (every 1-D parameter) and embeddings get none -- decay
pulls norm gains towards 0 and shrinks rarely seen token rows, neither of which is regularization we want
(as in GPT-3/nanoGPT for 1-D params; OLMo 2 also drops it for embeddings). The output head and routers are
decayed with `adamw.weight_decay`. `no_decay_roles` changes that list.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import nn

from muon_recipes.optim.blocks import ParamLayout, collect_layouts
from muon_recipes.optim.muon import Muon

NO_DECAY_ROLES = ("embedding", "norm", "bias")


def _muon_policy(layout: ParamLayout, split: Any) -> tuple[Optional[tuple[int, ...]], str, str]:
    """(split_sizes, experts, readable label) of a hidden matrix under the config's split policy."""
    split_sizes, parts = None, []
    if layout.fuse_kind is not None:
        mode = getattr(split, layout.fuse_kind)
        if mode == "split":
            split_sizes = tuple(layout.row_blocks)
            parts.append(f"{layout.fuse_kind}=split({'+'.join(map(str, split_sizes))})")
        else:
            parts.append(f"{layout.fuse_kind}=fused")
    experts = "per_expert"
    if layout.experts:
        experts = split.experts
        parts.append(f"experts={experts}")
    label = "muon" + (f"[{','.join(parts)}]" if parts else "")
    return split_sizes, experts, label


def build_param_groups(model: nn.Module, optim_cfg: Any,
                       no_decay_roles: Optional[Sequence[str]] = None) -> list[dict]:
    """Param groups for `Muon`, each with `name`, `algorithm` and every hyperparameter spelled out.

    `optim_cfg` is an `OptimConfig` (or anything with its fields). Parameters are passed as
    (name, tensor) pairs, so the optimizer's state_dict records parameter names next to their indices.
    """
    if no_decay_roles is None:
        no_decay_roles = getattr(optim_cfg.adamw, "no_decay_roles", NO_DECAY_ROLES)
    layouts = collect_layouts(model)
    adamw_roles = set(optim_cfg.adamw_roles)
    adamw = optim_cfg.adamw
    groups: dict[str, dict] = {}

    def add(name: str, hyper: dict, pname: str, p: torch.Tensor) -> None:
        group = groups.setdefault(name, {"name": name, "params": [], **hyper})
        group["params"].append((pname, p))

    for pname, p in model.named_parameters():
        if not p.requires_grad:
            continue
        layout = layouts[pname]
        to_adamw = optim_cfg.algorithm == "adamw" or layout.role in adamw_roles or p.ndim < 2
        if to_adamw:
            decay = p.ndim >= 2 and layout.role not in no_decay_roles
            add("adamw" if decay else "adamw_no_decay",
                dict(algorithm="adamw", lr=adamw.lr, betas=tuple(adamw.betas), eps=adamw.eps,
                     weight_decay=adamw.weight_decay if decay else 0.0),
                pname, p)
            continue
        split_sizes, experts, label = _muon_policy(layout, optim_cfg.split)
        add(label, dict(algorithm="muon", lr=optim_cfg.lr, momentum=optim_cfg.momentum,
                        nesterov=optim_cfg.nesterov, weight_decay=optim_cfg.weight_decay,
                        adjust_lr=optim_cfg.adjust_lr, ns_steps=optim_cfg.ns_steps,
                        ns_schedule=optim_cfg.ns_schedule, ns_method=optim_cfg.ns_method,
                        ns_dtype=optim_cfg.ns_dtype,
                        backend=optim_cfg.backend, split_sizes=split_sizes, experts=experts),
            pname, p)
    # Muon groups first (the bulk of the parameters), then AdamW; stable for state_dict indices.
    return sorted(groups.values(), key=lambda g: (g["algorithm"] != "muon", g["name"]))


def build_optimizer(model: nn.Module, optim_cfg: Any, **options: Any) -> Muon:
    """The run's optimizer: `Muon` over `build_param_groups(model, optim_cfg)`, whose groups already carry every
    hyperparameter of the config, so none is passed again as a constructor default. `options` are the
    optimizer-wide arguments no group carries (`bucket_mb`, `replica_spread`, `profile`, `cuda_graph`); the
    config's `cuda_graph` is the default of the last."""
    options.setdefault("cuda_graph", getattr(optim_cfg, "cuda_graph", "off"))
    return Muon(build_param_groups(model, optim_cfg), **options)


def _expert_parallel_size(group: dict) -> int:
    """The ep size of a group's expert weights: the size of the mesh dim named "ep" they are sharded over
    (`muon_recipes.parallel.expert_parallel`), 1 when they are not spread that way."""
    for p in group["params"]:
        mesh = getattr(p, "device_mesh", None)
        names = (mesh.mesh_dim_names or ()) if mesh is not None else ()
        if "ep" in names and mesh.size(names.index("ep")) > 1:
            return mesh.size(names.index("ep"))
    return 1


def describe_param_groups(optimizer: torch.optim.Optimizer) -> str:
    """One log line: every group's name and parameter count in millions (global counts under FSDP2); groups with
    expert-parallel weights say their ep and whether Newton-Schulz runs where they are (per expert: no
    communication) or on experts assembled across the ep group (experts=fused)."""
    parts = []
    for i, group in enumerate(optimizer.param_groups):
        count = sum(p.numel() for p in group["params"])
        name, algorithm = group.get("name") or f"group{i}", group.get("algorithm", "?")
        label = name if name.startswith(algorithm) else f"{name} ({algorithm})"
        ep = _expert_parallel_size(group)
        if ep > 1 and algorithm == "muon":
            local = group.get("experts") == "per_expert"
            label += f" (experts ep={ep}, Newton-Schulz {'local' if local else 'on experts assembled over ep'})"
        elif ep > 1:
            label += f" (experts ep={ep})"
        parts.append(f"{label} {count / 1e6:.2f}M")
    total = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    return f"param groups: {' | '.join(parts)} | total {total / 1e6:.2f}M"
