"""Parameter counts and training FLOPs per token, from the config alone (for MFU and for reports).

Training FLOPs per token (forward + backward), PaLM (Chowdhery et al. 2022, arXiv:2204.02311, Appendix B):

    flops_per_token = 6 * N  +  12 * L * H * Q * T

* `6 * N`: each weight that multiplies the token's activations costs 2 FLOPs per parameter in the forward
  (multiply + add) and 4 in the backward (gradient w.r.t. input and w.r.t. weight) (Kaplan et al. 2020,
  arXiv:2001.08361, section 2.1). `N` counts the weights that take part in a matmul for one token: attention
  projections, the dense MLP or, in MoE layers, the router plus the `top_k` routed experts the token visits and
  the shared experts (the "active" parameters), and the output head (its `d_model x vocab` matmul is real work,
  tied or not). Not counted: the input embedding (a table lookup) and norm gains (elementwise).
* `12 * L * H * Q * T`: attention scores `QK^T` and the weighted sum `AV`, 2 FLOPs per multiply-add each, so
  `4 * T * H * Q` per token and layer in the forward, times 3 for forward + backward; `L` layers, `H` heads of
  size `Q`, sequence length `T`. Like PaLM it counts the full `T x T` score matrix, not the causal half that a
  flash kernel computes, so MFU numbers compare with the published ones.

Activation-checkpointing recomputation is not counted (model FLOPs, not hardware FLOPs).
"""

from __future__ import annotations

from typing import NamedTuple

from muon_recipes.config import ModelConfig


class ParamCounts(NamedTuple):
    total: int  # every parameter of the model
    active: int  # parameters a token uses: total minus the routed experts it does not visit
    embedding: int  # the input embedding table (shared with the head when tied)
    matmul_active: int  # the `N` of the FLOP formula (see the module docstring)


def _attention_params(cfg: ModelConfig) -> int:
    head_dim = cfg.d_model // cfg.n_heads
    q_dim, kv_dim = cfg.n_heads * head_dim, cfg.n_kv_heads * head_dim
    return cfg.d_model * (q_dim + 2 * kv_dim) + q_dim * cfg.d_model


def _swiglu_params(dim: int, hidden: int) -> int:
    return 3 * dim * hidden  # gate, up: [hidden, dim]; down: [dim, hidden]


def n_moe_layers(cfg: ModelConfig) -> int:
    return max(cfg.n_layers - cfg.first_dense_layers, 0) if cfg.n_experts > 0 else 0


def param_counts(cfg: ModelConfig) -> ParamCounts:
    """Parameter counts of `Transformer(cfg)`, computed from the config."""
    d, vocab = cfg.d_model, cfg.vocab_size
    moe_layers = n_moe_layers(cfg)
    dense_layers = cfg.n_layers - moe_layers
    expert = _swiglu_params(d, cfg.expert_ffn_dim or cfg.ffn_dim)
    shared = cfg.n_shared_experts * expert
    router = cfg.n_experts * d

    embedding = vocab * d
    head = 0 if cfg.tie_embeddings else vocab * d
    norms = (2 * cfg.n_layers + 1) * d
    attention = cfg.n_layers * _attention_params(cfg)
    dense_mlp = dense_layers * _swiglu_params(d, cfg.ffn_dim)
    moe_total = moe_layers * (router + cfg.n_experts * expert + shared)
    moe_active = moe_layers * (router + cfg.top_k * expert + shared)

    total = embedding + head + norms + attention + dense_mlp + moe_total
    active = total - moe_total + moe_active
    matmul_active = attention + dense_mlp + moe_active + vocab * d  # the head matmul runs even when tied
    return ParamCounts(total=total, active=active, embedding=embedding, matmul_active=matmul_active)


def attention_flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """`12 * L * H * Q * T`: forward + backward of the score and value matmuls (PaLM, Appendix B)."""
    head_dim = cfg.d_model // cfg.n_heads
    return 12 * cfg.n_layers * cfg.n_heads * head_dim * seq_len


def flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Training (forward + backward) FLOPs per token at sequence length `seq_len`: `6 N + 12 L H Q T`."""
    if seq_len < 1:
        raise ValueError(f"flops_per_token: seq_len={seq_len} must be >= 1")
    return 6 * param_counts(cfg).matmul_active + attention_flops_per_token(cfg, seq_len)
