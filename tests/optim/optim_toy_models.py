"""Tiny parameter sets with declared layouts for the optimizer tests (no forward pass needed).

`ToyBlock` holds one of every weight kind the optimizer must handle: GQA fused QKV, fused gate/up, an
expert weight with fused gate/up inside, a plain expert weight, a plain matrix, a router, a norm and a bias;
`ToyModel` adds an embedding and an output head around two blocks. Row counts are chosen so that 2, 3 and 4
shards come out uneven, and `tiny` has fewer rows than ranks. The forward pass is a small residual network
that uses every parameter, so real backward passes (and FSDP2's reduce-scatter) produce the gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from muon_recipes.optim.blocks import ParamLayout

D, Q, KV, FFN, EXPERTS, EXPERT_FFN, VOCAB = 20, 12, 4, 14, 3, 6, 11


def _param(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.randn(*shape) * 0.1)


class ToyBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = _param(Q + 2 * KV, D)  # 20 rows
        self.wo = _param(D, Q)
        self.gate_up = _param(2 * FFN, D)  # 28 rows
        self.down = _param(D, FFN)
        self.experts_gate_up = _param(EXPERTS, 2 * EXPERT_FFN, D)
        self.experts_down = _param(EXPERTS, D, EXPERT_FFN)
        self.tiny = _param(2, 9)  # fewer rows than ranks
        self.router = _param(EXPERTS, D)
        self.norm = nn.Parameter(torch.ones(D))
        self.bias = nn.Parameter(torch.zeros(D))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, D]
        h = F.rms_norm(x, (D,)) * self.norm + self.bias
        q, k, v = (h @ self.qkv.T).split((Q, KV, KV), dim=-1)
        x = x + (q * k.repeat(1, Q // KV) + v.repeat(1, Q // KV)) @ self.wo.T
        gate, up = (x @ self.gate_up.T).chunk(2, dim=-1)
        x = x + (F.silu(gate) * up) @ self.down.T
        weights = torch.softmax(x @ self.router.T, dim=-1)  # [B, E]
        e_gate, e_up = torch.einsum("bd,efd->bef", x, self.experts_gate_up).chunk(2, dim=-1)
        experts = torch.einsum("bef,edf->bed", F.silu(e_gate) * e_up, self.experts_down)
        x = x + (weights.unsqueeze(-1) * experts).sum(1)
        return x + (x[:, :9] @ self.tiny.T).sum(-1, keepdim=True)

    def param_layouts(self) -> dict[str, ParamLayout]:
        return {
            "qkv": ParamLayout("matrix", fuse_kind="qkv", row_blocks=(Q, KV, KV)),
            "wo": ParamLayout("matrix"),
            "gate_up": ParamLayout("matrix", fuse_kind="gate_up", row_blocks=(FFN, FFN)),
            "down": ParamLayout("matrix"),
            "experts_gate_up": ParamLayout("matrix", fuse_kind="gate_up", row_blocks=(EXPERT_FFN, EXPERT_FFN),
                                           experts=EXPERTS),
            "experts_down": ParamLayout("matrix", experts=EXPERTS),
            "tiny": ParamLayout("matrix"),
            "router": ParamLayout("router"),
            "norm": ParamLayout("norm"),
            "bias": ParamLayout("bias"),
        }


class ToyModel(nn.Module):
    def __init__(self, n_blocks: int = 2):
        super().__init__()
        self.embed = _param(VOCAB, D)
        self.blocks = nn.ModuleList(ToyBlock() for _ in range(n_blocks))
        self.head = _param(VOCAB, D)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Next-token cross entropy of `tokens` [B, T] (each position predicts from its own token only)."""
        x = self.embed[tokens[:, :-1]].reshape(-1, D)
        for block in self.blocks:
            x = block(x)
        return F.cross_entropy(x @ self.head.T, tokens[:, 1:].reshape(-1))

    def param_layouts(self) -> dict[str, ParamLayout]:
        return {"embed": ParamLayout("embedding"), "head": ParamLayout("output")}


def fill_grads(model: nn.Module, step: int, seed: int = 0) -> None:
    """Deterministic full-size gradients (the same on every process for a given step)."""
    gen = torch.Generator().manual_seed(1000 * seed + step)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen)
