"""How a parameter splits into the logical matrices it stores: the contract between models and optimizer.

A model declares, for each of its parameters, a `ParamLayout`: its role (which decides AdamW vs Muon by
default) and, for hidden matrices, what is fused inside it:

* a fused QKV weight `[q_dim + 2*kv_dim, d_model]` has row blocks `(q_dim, kv_dim, kv_dim)` of fuse kind `qkv`;
* a fused gate/up weight `[2*ffn, d_model]` has row blocks `(ffn, ffn)` of fuse kind `gate_up`;
* an expert weight `[E, out, in]` stacks `E` independent matrices along dim 0 (`experts=E`); combined with a
  fused gate/up inside the experts it has row blocks `(ffn, ffn)` within each expert.

Modules expose `param_layouts() -> dict[local_name, ParamLayout]` for their *direct* parameters only;
`collect_layouts(model)` walks the module tree and returns them keyed by the same fully-qualified names as
`model.named_parameters()`. The optimizer never parses names: the policy (`split` vs `fused`, `per_expert` vs
`fused`) is applied to these declarations by `param_groups.py`.

`BlockPlan` is the optimizer's side of the same contract: once the policy is applied, it says how a full
update of a parameter splits into the matrices Muon orthogonalizes, and which lr ratio (`adjust_lr`) each
row gets, computed on the block's shape, never the fused tensor's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from muon_recipes.choices import ADJUST_LR, EXPERT_MODES, FUSE_KINDS, ROLES
from muon_recipes.optim import dispatch
from muon_recipes.optim.newton_schulz import gram_restarts


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


# --------------------------------------------------------------------------------------------------------------
# The optimizer's view: the blocks of one update
# --------------------------------------------------------------------------------------------------------------
def adjust_lr_ratio(adjust_lr: str, rows: int, cols: int) -> float:
    """Factor on the lr of a `rows x cols` block so updates of different shapes have comparable size.

    spectral_norm: sqrt(max(1, rows/cols)) (Keller Jordan's Muon; keeps the update's spectral norm
    proportional to sqrt(fan_out/fan_in)). rms_norm: 0.2 * sqrt(max(rows, cols)), which gives the update
    the RMS of a typical AdamW update so AdamW's lr and weight decay carry over (Liu et al. 2025, "Muon is
    Scalable for LLM Training" (Moonlight), sec. 2.2). none: 1.
    """
    if adjust_lr == "spectral_norm":
        return math.sqrt(max(1.0, rows / cols))
    if adjust_lr == "rms_norm":
        return 0.2 * math.sqrt(max(rows, cols))
    if adjust_lr == "none":
        return 1.0
    raise ValueError(f"adjust_lr={adjust_lr!r}: must be one of {', '.join(ADJUST_LR)}")


@dataclass(frozen=True)
class BlockPlan:
    """How an update of `shape` (`[rows, cols]` or `[E, rows, cols]`) splits into the matrices Muon sees.

    row_blocks: sizes of the row blocks along dim -2 (one block = the whole matrix when not split).
    fuse_experts: for 3-D weights, orthogonalize the `[E*rows, cols]` concatenation of the experts (block i
      is then the concatenation over experts of each expert's block i) instead of E separate matrices.
    """

    shape: tuple[int, ...]
    row_blocks: tuple[int, ...]
    fuse_experts: bool = False

    @classmethod
    def build(cls, shape: Sequence[int], split_sizes: Optional[Sequence[int]] = None,
              experts: Optional[str] = "per_expert") -> "BlockPlan":
        shape = tuple(int(s) for s in shape)
        if len(shape) not in (2, 3):
            raise ValueError(f"Muon orthogonalizes 2-D [out, in] or 3-D [experts, out, in] weights, got shape {shape}")
        experts = experts or "per_expert"
        if experts not in EXPERT_MODES:
            raise ValueError(f"experts={experts!r}: must be one of {', '.join(EXPERT_MODES)}")
        rows = shape[-2]
        blocks = tuple(int(s) for s in split_sizes) if split_sizes else (rows,)
        if sum(blocks) != rows or any(s <= 0 for s in blocks):
            raise ValueError(f"split_sizes={tuple(blocks)}: must be positive and sum to the {rows} rows "
                             f"of shape {shape}")
        return cls(shape, blocks, fuse_experts=len(shape) == 3 and experts == "fused")

    @property
    def experts(self) -> int:
        return self.shape[0] if len(self.shape) == 3 else 1

    def block_shapes(self) -> list[tuple[int, int, int]]:
        """(count, rows, cols) of the batch each row block contributes."""
        e, cols = self.experts, self.shape[-1]
        if self.fuse_experts:
            return [(1, e * s, cols) for s in self.row_blocks]
        return [(e, s, cols) for s in self.row_blocks]

    def row_views(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Views of the row blocks of a tensor of the full shape, one `[experts, rows, cols]` view per block
        (`[1, rows, cols]` for a 2-D weight): the same elements as `matrices`, never a copy."""
        t3 = tensor if tensor.ndim == 3 else tensor.unsqueeze(0)
        return list(torch.split(t3, list(self.row_blocks), dim=-2))

    def matrices(self, update: torch.Tensor) -> list[torch.Tensor]:
        """The blocks of a full update, one `[count, rows, cols]` tensor per row block."""
        pieces = self.row_views(update)
        if self.fuse_experts:
            return [p.reshape(1, -1, p.shape[-1]) for p in pieces]
        return pieces

    def assemble(self, pieces: Sequence[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
        """Write orthogonalized blocks (as returned by `matrices`, same order) back into `out` (full shape)."""
        o3 = out if out.ndim == 3 else out.unsqueeze(0)
        for dst, src in zip(torch.split(o3, list(self.row_blocks), dim=-2), pieces):
            copy_block(dst, src.reshape(dst.shape))
        return out

    def row_scale(self, adjust_lr: str, device=None) -> torch.Tensor:
        """The lr ratio of every row, shaped `shape[:-1] + (1,)` to broadcast against the update (float32)."""
        ratios = [adjust_lr_ratio(adjust_lr, rows, cols) for _, rows, cols in self.block_shapes()]
        per_row = torch.repeat_interleave(torch.tensor(ratios, dtype=torch.float32),
                                          torch.tensor(self.row_blocks))
        return per_row.expand(*self.shape[:-1]).unsqueeze(-1).contiguous().to(device)

    def cost(self, steps: int, method: str = "standard", on_cuda: bool = False) -> float:
        """Multiply-adds of Newton-Schulz on all blocks (m <= n after transposing), to balance work across ranks.

        Standard form: per step 2 m^2 n + m^3. Gram form (where `newton_schulz` runs it) with r restarts:
        (2 + 2 r) m^2 n for the products that read X (R at the start and each restart, Q X at each restart and
        the end) and (4 steps - 3 r - 3) m^3 for the m x m products.
        """
        total = 0.0
        restarts = len(gram_restarts(steps))
        for count, rows, cols in self.block_shapes():
            m, n = min(rows, cols), max(rows, cols)
            if dispatch.uses_gram_form(method, rows, cols, on_cuda):
                total += count * ((2 + 2 * restarts) * m * m * n + (4 * steps - 3 * restarts - 3) * m ** 3)
            else:
                total += count * steps * (2 * m * m * n + m ** 3)
        return total


def copy_block(dst: torch.Tensor, src: torch.Tensor) -> None:
    """`dst.copy_(src)`; a transposed `src` on a GPU goes through the tiled Triton copy (kernels/transpose.py),
    which reads and writes coalesced where torch's elementwise copy reads with a large stride."""
    if dispatch.copy_transposed_on_triton(dst, src):
        dispatch.kernels().copy_transposed(dst, src)
    else:
        dst.copy_(src)
