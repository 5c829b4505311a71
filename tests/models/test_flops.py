"""FLOP and parameter counts against a hand count and against the matmuls torch actually runs."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from muon_recipes.config import ModelConfig
from muon_recipes.models import build_model, flops_per_token, param_counts


def test_flops_match_a_hand_count():
    # d=8, 2 layers, 2 heads of 4 (1 kv head), SwiGLU 16, vocab 10, T=4.
    cfg = ModelConfig(vocab_size=10, d_model=8, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=16, max_seq_len=4)
    per_layer = (8 * 8) + (8 * 4) + (8 * 4) + (8 * 8) + 3 * (8 * 16)  # q, k, v, o, gate/up/down = 576
    n = 2 * per_layer + 10 * 8  # + output head = 1232
    attention = 12 * 2 * 2 * 4 * 4  # 12 * L * H * Q * T = 768
    assert flops_per_token(cfg, seq_len=4) == 6 * n + attention == 8160


def test_moe_flops_count_only_the_active_experts_by_hand():
    # One dense layer, one MoE layer with 4 experts (top-2, width 8) + 1 shared expert, tied head.
    cfg = ModelConfig(vocab_size=10, d_model=8, n_layers=2, n_heads=2, n_kv_heads=2, ffn_dim=16, max_seq_len=4,
                      n_experts=4, top_k=2, expert_ffn_dim=8, n_shared_experts=1, first_dense_layers=1,
                      tie_embeddings=True)
    attention_params = 4 * 8 * 8
    dense = attention_params + 3 * 8 * 16
    moe_active = attention_params + 4 * 8 + 2 * (3 * 8 * 8) + 3 * 8 * 8  # router + 2 experts + shared
    head = 10 * 8  # tied, but the matmul still runs
    assert flops_per_token(cfg, seq_len=4) == 6 * (dense + moe_active + head) + 12 * 2 * 2 * 4 * 4
    counts = param_counts(cfg)
    norms = 5 * 8
    assert counts.total == 10 * 8 + norms + dense + attention_params + 4 * 8 + 4 * (3 * 8 * 8) + 3 * 8 * 8
    assert counts.total - counts.active == 2 * 3 * 8 * 8  # the two experts a token skips


@pytest.mark.parametrize("extra", [
    dict(),
    dict(n_kv_heads=2, tie_embeddings=True),
    dict(n_kv_heads=2, n_experts=4, top_k=2, expert_ffn_dim=24, n_shared_experts=1, first_dense_layers=1, n_layers=3),
])
def test_flops_equal_the_matmul_flops_torch_counts_in_forward_and_backward(extra):
    cfg = ModelConfig(**{**dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=48,
                                max_seq_len=16), **extra})
    torch.manual_seed(0)
    model = build_model(cfg)
    tokens = torch.randint(0, 64, (3, 16))
    counter = FlopCounterMode(display=False)
    # The math SDPA backend runs attention as matmuls the counter sees (the full T x T scores, like the formula).
    with counter, sdpa_kernel(SDPBackend.MATH):
        out = model(tokens)
        out.logits.float().pow(2).mean().backward()
    assert counter.get_total_flops() == flops_per_token(cfg, seq_len=16) * tokens.numel()


@pytest.mark.parametrize("extra", [dict(), dict(tie_embeddings=True, n_kv_heads=1),
                                   dict(n_experts=3, top_k=1, n_shared_experts=2, first_dense_layers=1)])
def test_param_counts_equal_the_built_model(extra):
    cfg = ModelConfig(**{**dict(vocab_size=64, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=48), **extra})
    with torch.device("meta"):
        model = build_model(cfg)
    total = sum(p.numel() for p in model.parameters())
    expert_params = sum(p.numel() for moe in model.moe_layers() for p in moe.experts.parameters())
    counts = param_counts(cfg)
    assert counts.total == total
    assert counts.active == total - expert_params * (1 - cfg.top_k / cfg.n_experts if cfg.n_experts else 0)
    assert counts.embedding == model.tok_embeddings.weight.numel()
