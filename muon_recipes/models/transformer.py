"""A Llama-style decoder-only transformer: dense, grouped-query attention, or mixture of experts.

Pre-norm residual blocks (RMSNorm), rotary position embeddings, causal attention through
`F.scaled_dot_product_attention`, SwiGLU MLPs (or `MoE` layers), untied or tied output head.

Two storage layouts of the same function, chosen by config, exist so that recipes can compare how the optimizer
treats fused weights: `fused_qkv` stores q, k, v as one `[q_dim + 2*kv_dim, d_model]` weight (rows q, then k,
then v), `fused_gate_up` stores gate and up as one `[2*ffn, d_model]` weight (rows gate, then up). Each fused
weight declares its row blocks through `param_layouts()` (see `muon_recipes.optim.blocks`).

Initialization (`Transformer.init_weights`) is normal(0, init_std) for every weight matrix and the embedding,
with the output projections of each residual branch (attention out, MLP down, expert down) scaled by
`1/sqrt(2 * n_layers)` (GPT-2, Radford et al. 2019, section 2.3; Megatron-LM, Shoeybi et al. 2019): each of the
`2 * n_layers` branches adds to the residual stream, so its variance stays independent of depth. Norm weights are 1.
The trainer builds the model whole on its device with the run's seed, then shards it with FSDP2 (`train/entry.py`),
so the initial weights are the same for every world size; `init_weights` also serves a model built on the meta
device and materialized with `to_empty`.
"""

from __future__ import annotations

import math
from typing import Iterator, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from muon_recipes.config import ModelConfig, validate_model
from muon_recipes.models.layers import Embedding, FeedForward, Linear, RMSNorm
from muon_recipes.models.moe import MoE
from muon_recipes.optim.blocks import ParamLayout


class ModelOutput(NamedTuple):
    logits: torch.Tensor  # [B, T, V], in the activation dtype
    aux_loss: torch.Tensor  # scalar; MoE balance loss already multiplied by its coefficient (0 when unused)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding tables (RoFormer, Su et al. 2021, arXiv:2104.09864).

    Channel pair `(i, i + head_dim/2)` of a query/key at position `p` is rotated by the angle
    `p * theta^(-2i/head_dim)`. Pairing the two halves (GPT-NeoX / Llama "rotate half" convention) instead of
    adjacent channels is the same operation up to a fixed permutation of the head channels.
    The cos/sin tables are non-persistent buffers: not in checkpoints, recomputed by `init_weights`.
    """

    def __init__(self, head_dim: int, max_seq_len: int, theta: float):
        super().__init__()
        self.head_dim, self.max_seq_len, self.theta = head_dim, max_seq_len, theta
        self.register_buffer("cos", torch.empty(max_seq_len, head_dim // 2), persistent=False)
        self.register_buffer("sin", torch.empty(max_seq_len, head_dim // 2), persistent=False)

    def init_weights(self) -> None:
        device = self.cos.device
        # float64 for the angles: positions times frequencies lose digits in float32 at long context.
        exponents = torch.arange(0, self.head_dim, 2, device=device, dtype=torch.float64) / self.head_dim
        inv_freq = self.theta ** -exponents
        angles = torch.outer(torch.arange(self.max_seq_len, device=device, dtype=torch.float64), inv_freq)
        self.cos.copy_(angles.cos())
        self.sin.copy_(angles.sin())

    def forward(self, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[:seq_len], self.sin[:seq_len]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` `[B, T, heads, head_dim]` by the tables `[T, head_dim/2]`, computed in float32 or wider."""
    x1, x2 = x.to(torch.promote_types(x.dtype, torch.float32)).chunk(2, dim=-1)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).type_as(x)


class Attention(nn.Module):
    """Causal self-attention with grouped-query heads (Ainslie et al. 2023, arXiv:2305.13245).

    `n_heads` query heads share `n_kv_heads` key/value heads: query head `h` reads kv head
    `h // (n_heads / n_kv_heads)`. MHA when equal, MQA when `n_kv_heads == 1`.
    """

    def __init__(self, cfg: ModelConfig, init_std: float, out_std: float):
        super().__init__()
        self.n_heads, self.n_kv_heads = cfg.n_heads, cfg.n_kv_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        self.q_dim, self.kv_dim = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.fused = cfg.fused_qkv
        matrix = ParamLayout(role="matrix")
        if self.fused:
            qkv = ParamLayout(role="matrix", fuse_kind="qkv", row_blocks=(self.q_dim, self.kv_dim, self.kv_dim))
            self.qkv_proj = Linear(cfg.d_model, self.q_dim + 2 * self.kv_dim, qkv, init_std)
        else:
            self.q_proj = Linear(cfg.d_model, self.q_dim, matrix, init_std)
            self.k_proj = Linear(cfg.d_model, self.kv_dim, matrix, init_std)
            self.v_proj = Linear(cfg.d_model, self.kv_dim, matrix, init_std)
        self.o_proj = Linear(self.q_dim, cfg.d_model, matrix, out_std)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        if self.fused:
            q, k, v = self.qkv_proj(x).split([self.q_dim, self.kv_dim, self.kv_dim], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = apply_rotary(q.unflatten(-1, (self.n_heads, self.head_dim)), cos, sin)
        k = apply_rotary(k.unflatten(-1, (self.n_kv_heads, self.head_dim)), cos, sin)
        v = v.unflatten(-1, (self.n_kv_heads, self.head_dim))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, head_dim]
        if self.n_kv_heads != self.n_heads:
            # Materialize the shared kv heads: every SDPA backend takes this, `enable_gqa` not all of them.
            repeats = self.n_heads // self.n_kv_heads
            k = k.repeat_interleave(repeats, dim=1)
            v = v.repeat_interleave(repeats, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, self.q_dim))


class TransformerBlock(nn.Module):
    """Pre-norm block: `h = x + attn(norm(x))`, `out = h + ffn(norm(h))`, the ffn dense or MoE.

    `activation_checkpointing = True` recomputes the block in the backward (`torch.utils.checkpoint`,
    non-reentrant) instead of storing its activations; no wrapper module, so parameter names never change.
    `forward` returns `(hidden, aux_loss)`.
    """

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        init_std = cfg.init_std
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        self.layer_id = layer_id
        self.activation_checkpointing = False
        self.attention_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attention = Attention(cfg, init_std, out_std)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.feed_forward: Union[FeedForward, MoE]
        if cfg.n_experts > 0 and layer_id >= cfg.first_dense_layers:
            self.feed_forward = MoE(cfg, init_std, out_std)
        else:
            self.feed_forward = FeedForward(cfg.d_model, cfg.ffn_dim, cfg.fused_gate_up, init_std, out_std)

    @property
    def is_moe(self) -> bool:
        return isinstance(self.feed_forward, MoE)

    def _block(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        h = x + self.attention(self.attention_norm(x), cos, sin)
        if isinstance(self.feed_forward, MoE):
            y, aux_loss, counts = self.feed_forward(self.ffn_norm(h))
            return h + y, aux_loss, counts
        return h + self.feed_forward(self.ffn_norm(h)), torch.zeros((), device=x.device), None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.activation_checkpointing and torch.is_grad_enabled():
            out, aux_loss, counts = checkpoint(self._block, x, cos, sin, use_reentrant=False)
        else:
            out, aux_loss, counts = self._block(x, cos, sin)
        # Recorded here, outside the checkpointed region, so the backward's recomputation does not count twice.
        if counts is not None and self.training:
            self.feed_forward.record_load(counts)
        return out, aux_loss


class Transformer(nn.Module):
    """The decoder. `forward(tokens [B, T]) -> ModelOutput(logits [B, T, V], aux_loss)`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        validate_model(cfg)
        self.cfg = cfg
        self.tok_embeddings = Embedding(cfg.vocab_size, cfg.d_model, cfg.init_std)
        self.rotary = RotaryEmbedding(cfg.d_model // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta)
        self.layers = nn.ModuleList(TransformerBlock(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.output: Optional[Linear] = None
        if not cfg.tie_embeddings:
            self.output = Linear(cfg.d_model, cfg.vocab_size, ParamLayout(role="output"), cfg.init_std)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialize every parameter and buffer in place (see the module docstring for the scheme).

        Each submodule initializes its own direct parameters and buffers; in-place ops only, so this also runs on
        FSDP2's DTensor shards after `to_empty(device=...)`.
        """
        for module in self.modules():
            if module is not self and hasattr(module, "init_weights"):
                module.init_weights()

    def forward(self, tokens: torch.Tensor) -> ModelOutput:
        if tokens.ndim != 2:
            raise ValueError(f"tokens: expected shape [batch, seq], got {tuple(tokens.shape)}")
        seq = tokens.shape[1]
        if seq > self.cfg.max_seq_len:
            raise ValueError(f"tokens: sequence length {seq} exceeds model.max_seq_len={self.cfg.max_seq_len}")
        h = self.tok_embeddings(tokens)
        cos, sin = self.rotary(seq)
        aux_loss = torch.zeros((), device=h.device)
        for layer in self.layers:
            h, layer_aux = layer(h, cos, sin)
            aux_loss = aux_loss + layer_aux
        h = self.norm(h)
        logits = self.output(h) if self.output is not None else F.linear(h, self.tok_embeddings.weight)
        return ModelOutput(logits, aux_loss)

    # ---- mixture-of-experts load balancing ------------------------------------------------------------------
    def moe_layers(self) -> Iterator[MoE]:
        for layer in self.layers:
            if isinstance(layer.feed_forward, MoE):
                yield layer.feed_forward

    def expert_load_counts(self) -> list[torch.Tensor]:
        """Per MoE layer, the float32 `[n_experts]` token-assignment counts since the last bias update (copies)."""
        return [moe.load_counts.detach().to(torch.float32, copy=True) for moe in self.moe_layers()]

    def update_router_biases(self, counts: list[torch.Tensor]) -> None:
        """Apply the DeepSeek-V3 bias update per MoE layer from `counts` (all-reduced) and reset the accumulators."""
        layers = list(self.moe_layers())
        if len(counts) != len(layers):
            raise ValueError(f"update_router_biases: got {len(counts)} count tensors for {len(layers)} MoE layers")
        for moe, layer_counts in zip(layers, counts):
            moe.update_bias(layer_counts)


def build_model(cfg: ModelConfig) -> Transformer:
    """Build the model for `cfg` on the current default device (use `with torch.device("meta"):` for FSDP2)."""
    return Transformer(cfg)
