"""How a parameter splits into the logical matrices it stores: the contract between models and optimizer.

A model declares, for each of its parameters, a `ParamLayout`: its role (which decides AdamW vs Muon by
default) and, for hidden matrices, what is fused inside it:

* a fused QKV weight `[q_dim + 2*kv_dim, d_model]` has row blocks `(q_dim, kv_dim, kv_dim)` of fuse kind `qkv`;
* a fused gate/up weight `[2*ffn, d_model]` has row blocks `(ffn, ffn)` of fuse kind `gate_up`;
* an expert weight `[E, out, in]` stacks `E` independent matrices along dim 0 (`experts=E`); combined with a
  fused gate/up inside the experts it has row blocks `(ffn, ffn)` within each expert.

Modules expose `param_layouts() -> dict[local_name, ParamLayout]` for their *direct* parameters only; `collect_layouts(model)` walks the module tree
and returns them keyed by the same fully-qualified names as `model.named_parameters()`. The optimizer never parses
names: the policy (`split` vs `fused`, `per_expert` vs `fused`) is applied to these declarations by
`param_groups.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

ROLES = ("embedding", "output", "norm", "bias", "router", "matrix")
FUSE_KINDS = ("qkv", "gate_up")


@dataclass(frozen=True)
class ParamLayout:
    """What a parameter is, for the optimizer.

    role: one of ROLES; `matrix` are the hidden 2-D/3-D weights Muon is meant for.
    fuse_kind: `qkv` or `gate_up` when several logical matrices are stacked along the rows (dim -2).
    row_blocks: the row sizes of those logical matrices (sum == size of dim -2).
    experts: number of independent matrices stacked along dim 0 of a 3-D weight (None for 2-D).
    """

    role: str
    fuse_kind: Optional[str] = None
    row_blocks: Optional[tuple[int, ...]] = None
    experts: Optional[int] = None

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"ParamLayout.role={self.role!r}: must be one of {', '.join(ROLES)}")
        if (self.fuse_kind is None) != (self.row_blocks is None):
            raise ValueError("ParamLayout: fuse_kind and row_blocks go together")
        if self.fuse_kind is not None and self.fuse_kind not in FUSE_KINDS:
            raise ValueError(f"ParamLayout.fuse_kind={self.fuse_kind!r}: must be one of {', '.join(FUSE_KINDS)}")

    def check(self, name: str, shape: torch.Size) -> None:
        """Raise if the declaration does not fit the parameter's shape."""
        want_dim = 3 if self.experts else (2 if self.role == "matrix" else None)
        if want_dim is not None and len(shape) != want_dim:
            raise ValueError(f"{name}: layout expects a {want_dim}-D weight, got shape {tuple(shape)}")
        if self.experts and shape[0] != self.experts:
            raise ValueError(f"{name}: layout declares {self.experts} experts, dim 0 is {shape[0]}")
        if self.row_blocks is not None and sum(self.row_blocks) != shape[-2]:
            raise ValueError(f"{name}: row blocks {self.row_blocks} sum to {sum(self.row_blocks)}, "
                             f"dim -2 is {shape[-2]}")


def collect_layouts(model: nn.Module) -> dict[str, ParamLayout]:
    """All parameters' layouts keyed by `named_parameters()` names.

    Each module declares only its direct parameters. Parameters nobody declares get a layout from their shape
    alone (1-D -> `bias`, otherwise a plain `matrix`); models in this package declare every parameter, the
    fallback is for user models.
    """
    layouts: dict[str, ParamLayout] = {}
    for mod_name, module in model.named_modules():
        declare = getattr(module, "param_layouts", None)
        if not callable(declare):
            continue
        for local, layout in declare().items():
            fqn = f"{mod_name}.{local}" if mod_name else local
            layouts[fqn] = layout
    out: dict[str, ParamLayout] = {}
    for name, p in model.named_parameters():
        layout = layouts.get(name)
        if layout is None:
            layout = ParamLayout(role="bias" if p.ndim < 2 else "matrix")
        layout.check(name, p.shape)
        out[name] = layout
    return out


def split_rows(matrix: torch.Tensor, row_blocks: Optional[tuple[int, ...]]) -> list[torch.Tensor]:
    """Views of the logical row blocks of `matrix` (`[..., rows, cols]`); the whole matrix when no blocks."""
    if not row_blocks:
        return [matrix]
    return list(torch.split(matrix, list(row_blocks), dim=-2))
