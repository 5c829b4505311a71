"""Parameterized building blocks that declare their own layout and initialization.

Every module here owns its parameters directly and answers two questions for the rest of the project:

* `param_layouts()`: what each direct parameter is for the optimizer (`muon_recipes.optim.blocks.ParamLayout`):
  the role, and for fused weights the logical matrices stacked in their rows. The optimizer never parses names.
* `init_weights()`: re-initialize the direct parameters and buffers in place. In-place `nn.init` calls only, so the
  same code runs on plain tensors and on the DTensor shards FSDP2 leaves after `to_empty` from the meta device.

`Linear` and `Embedding` subclass the `torch.nn` classes (so `isinstance(m, nn.Linear)` holds and parameter names
stay `*.weight`); they only add the layout and the init standard deviation chosen by their owner.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from muon_recipes.optim.blocks import ParamLayout


class Linear(nn.Linear):
    """`y = x W^T`, weight `[out, in]`, no bias, with a declared layout and a normal(0, init_std) init."""

    def __init__(self, in_features: int, out_features: int, layout: ParamLayout, init_std: float):
        super().__init__(in_features, out_features, bias=False)
        self.layout = layout
        self.init_std = init_std
        layout.check(type(self).__name__, self.weight.shape)

    def param_layouts(self) -> dict[str, ParamLayout]:
        return {"weight": self.layout}

    def init_weights(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=self.init_std)


class Embedding(nn.Embedding):
    """Token embedding table `[vocab, d_model]`, normal(0, init_std)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, init_std: float):
        super().__init__(num_embeddings, embedding_dim)
        self.init_std = init_std

    def param_layouts(self) -> dict[str, ParamLayout]:
        return {"weight": ParamLayout(role="embedding")}

    def init_weights(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=self.init_std)


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (Zhang & Sennrich 2019): `x / sqrt(mean(x^2) + eps) * weight`.

    The statistic is computed in float32 whatever the activation dtype, as in Llama, because bf16 sums of squares
    over thousands of channels lose the precision the normalization exists to provide.
    """

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight

    def param_layouts(self) -> dict[str, ParamLayout]:
        return {"weight": ParamLayout(role="norm")}

    def init_weights(self) -> None:
        nn.init.ones_(self.weight)


class FeedForward(nn.Module):
    """SwiGLU MLP (Shazeer 2020, "GLU Variants Improve Transformer"): `down(silu(gate(x)) * up(x))`.

    `fused=True` stores gate and up as one `[2*hidden, dim]` weight (rows: gate then up) so one GEMM computes
    both; its layout declares the two row blocks so the optimizer can still treat them as separate matrices.
    `down_std` is the scaled init of the output projection (see `Transformer.init_weights`).
    """

    def __init__(self, dim: int, hidden: int, fused: bool, init_std: float, down_std: float):
        super().__init__()
        self.hidden = hidden
        self.fused = fused
        matrix = ParamLayout(role="matrix")
        if fused:
            self.gate_up_proj = Linear(dim, 2 * hidden, ParamLayout(role="matrix", fuse_kind="gate_up",
                                                                   row_blocks=(hidden, hidden)), init_std)
        else:
            self.gate_proj = Linear(dim, hidden, matrix, init_std)
            self.up_proj = Linear(dim, hidden, matrix, init_std)
        self.down_proj = Linear(hidden, dim, matrix, down_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)
