"""The decoder against independent references: separate vs fused weights, a hand-written attention, causality,
layout declarations, and initialization from the meta device."""

import math

import pytest
import torch
import torch.nn.functional as F

from muon_recipes.config import ConfigError, ModelConfig
from muon_recipes.models import Attention, Transformer, build_model
from muon_recipes.models.moe import MoE
from muon_recipes.optim.blocks import collect_layouts, split_rows

TINY = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=48, max_seq_len=32)
MOE = dict(n_experts=4, top_k=2, n_shared_experts=1, expert_ffn_dim=24, first_dense_layers=1, n_layers=3)
VARIANTS = {
    "dense": ModelConfig(**TINY),
    "gqa": ModelConfig(**{**TINY, "n_kv_heads": 2}),
    "mqa": ModelConfig(**{**TINY, "n_kv_heads": 1}),
    "moe": ModelConfig(**{**TINY, "n_kv_heads": 2, **MOE}),
    "moe_tied": ModelConfig(**{**TINY, **MOE, "tie_embeddings": True, "top_k": 1}),
}


def model64(cfg: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = build_model(cfg).double()
    model.rotary.init_weights()  # recompute the cos/sin tables at float64 precision
    return model


def fuse_state_dict(separate: dict) -> dict:
    """Map a separate-weights state dict to the fused layout by concatenating rows: q|k|v and gate|up."""
    out = {}
    for key, value in separate.items():
        if key.endswith("q_proj.weight"):
            prefix = key[: -len("q_proj.weight")]
            out[prefix + "qkv_proj.weight"] = torch.cat(
                [separate[prefix + n + "_proj.weight"] for n in ("q", "k", "v")], dim=0)
        elif key.endswith("gate_proj.weight") or key.endswith("gate_proj"):
            suffix = ".weight" if key.endswith(".weight") else ""
            prefix = key[: -len("gate_proj" + suffix)]
            out[prefix + "gate_up_proj" + suffix] = torch.cat(
                [value, separate[prefix + "up_proj" + suffix]], dim=-2)
        elif not any(key.endswith(n + s) for n in ("k_proj", "v_proj", "up_proj") for s in (".weight", "")):
            out[key] = value
    return out


def fused_pair(cfg: ModelConfig) -> tuple[Transformer, Transformer]:
    """A separate-weights model and a fused model holding the same logical matrices."""
    separate = model64(ModelConfig(**{**cfg.__dict__, "fused_qkv": False, "fused_gate_up": False}))
    fused = model64(ModelConfig(**{**cfg.__dict__, "fused_qkv": True, "fused_gate_up": True}), seed=1)
    with torch.no_grad():
        for moe in separate.moe_layers():  # a non-zero selection bias, so it must be carried over too
            moe.router.expert_bias.copy_(torch.randn(moe.n_experts, dtype=torch.float64) * 0.1)
    fused.load_state_dict(fuse_state_dict(separate.state_dict()), strict=True)
    return separate, fused


@pytest.mark.parametrize("variant", ["dense", "gqa", "moe"])
def test_fused_and_separate_weights_compute_the_same_function(variant):
    separate, fused = fused_pair(VARIANTS[variant])
    tokens = torch.randint(0, 64, (2, 16))
    out_s, out_f = separate(tokens), fused(tokens)
    torch.testing.assert_close(out_f.logits, out_s.logits, rtol=0, atol=1e-12)
    torch.testing.assert_close(out_f.aux_loss, out_s.aux_loss, rtol=0, atol=1e-12)
    # Same gradients on the shared logical matrices, after reassembling the separate ones.
    out_s.logits.pow(2).mean().backward()
    out_f.logits.pow(2).mean().backward()
    grads_s = {n: p.grad for n, p in separate.named_parameters()}
    fused_grads = fuse_state_dict(grads_s)
    for name, p in fused.named_parameters():
        torch.testing.assert_close(p.grad, fused_grads[name], rtol=0, atol=1e-12, msg=name)


@pytest.mark.parametrize("variant", ["dense", "gqa", "moe"])
def test_declared_row_blocks_reassemble_the_logical_matrices(variant):
    separate, fused = fused_pair(VARIANTS[variant])
    layouts = collect_layouts(fused)
    sep = dict(separate.named_parameters())
    n_fused = 0
    for name, param in fused.named_parameters():
        layout = layouts[name]
        if layout.fuse_kind is None:
            continue
        n_fused += 1
        names = ("q_proj", "k_proj", "v_proj") if layout.fuse_kind == "qkv" else ("gate_proj", "up_proj")
        logical = [sep[name.replace("qkv_proj" if layout.fuse_kind == "qkv" else "gate_up_proj", n)] for n in names]
        blocks = split_rows(param.detach(), layout.row_blocks)
        assert len(blocks) == len(logical), name
        for block, matrix in zip(blocks, logical):
            assert torch.equal(block, matrix.detach()), name
        if layout.experts:  # each expert's slice splits into that expert's gate and up
            for e in range(layout.experts):
                for block, matrix in zip(split_rows(param.detach()[e], layout.row_blocks), logical):
                    assert torch.equal(block, matrix.detach()[e]), f"{name}[{e}]"
    cfg = VARIANTS[variant]
    moe_layers = cfg.n_layers - cfg.first_dense_layers if cfg.n_experts else 0
    # qkv + (dense or experts') gate_up per layer, plus the shared expert's gate_up in MoE layers
    assert n_fused == 2 * cfg.n_layers + (moe_layers if cfg.n_shared_experts else 0)


def rotate_reference(x: torch.Tensor, theta: float) -> torch.Tensor:
    """RoPE with complex numbers: channel pair (i, i + D/2) is z = a + ib, rotated by exp(i * pos * theta^(-2i/D))."""
    seq, dim = x.shape[1], x.shape[-1]
    z = torch.complex(x[..., : dim // 2], x[..., dim // 2:])
    freqs = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    rotation = torch.polar(torch.ones(seq, dim // 2, dtype=torch.float64),
                           torch.arange(seq, dtype=torch.float64)[:, None] * freqs)
    z = z * rotation[None, :, None, :]
    return torch.cat([z.real, z.imag], dim=-1)


def multi_head_attention_reference(x, wq, wk, wv, wo, n_heads, theta):
    """Plain causal multi-head attention with an explicit mask and softmax."""
    batch, seq, _ = x.shape
    head_dim = wq.shape[0] // n_heads
    q = rotate_reference((x @ wq.T).view(batch, seq, n_heads, head_dim), theta)
    k = rotate_reference((x @ wk.T).view(batch, seq, n_heads, head_dim), theta)
    v = (x @ wv.T).view(batch, seq, n_heads, head_dim)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim)
    future = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1)
    probs = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v).reshape(batch, seq, n_heads * head_dim)
    return out @ wo.T


def run_attention(cfg: ModelConfig, x: torch.Tensor) -> tuple[Attention, torch.Tensor]:
    model = model64(cfg)
    block = model.layers[0]
    cos, sin = model.rotary(x.shape[1])
    return block.attention, block.attention(x, cos, sin)


@pytest.mark.parametrize("fused", [True, False])
def test_attention_with_as_many_kv_heads_as_heads_is_multi_head_attention(fused):
    cfg = ModelConfig(**{**TINY, "fused_qkv": fused, "rope_theta": 100.0})
    x = torch.randn(2, 12, cfg.d_model, dtype=torch.float64)
    attn, out = run_attention(cfg, x)
    if fused:
        wq, wk, wv = attn.qkv_proj.weight.split([cfg.d_model] * 3)
    else:
        wq, wk, wv = attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight
    ref = multi_head_attention_reference(x, wq, wk, wv, attn.o_proj.weight, cfg.n_heads, cfg.rope_theta)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("n_kv_heads", [2, 1])
def test_grouped_query_attention_is_multi_head_attention_with_shared_kv_heads(n_kv_heads):
    cfg = ModelConfig(**{**TINY, "n_kv_heads": n_kv_heads, "fused_qkv": False})
    x = torch.randn(2, 12, cfg.d_model, dtype=torch.float64)
    attn, out = run_attention(cfg, x)
    head_dim, group = cfg.d_model // cfg.n_heads, cfg.n_heads // n_kv_heads
    # Query head h reads kv head h // group: duplicate each kv head's rows for its query heads.
    kv_of_head = [h // group for h in range(cfg.n_heads)]

    def expand(w):
        return torch.cat([w[j * head_dim:(j + 1) * head_dim] for j in kv_of_head])

    ref = multi_head_attention_reference(x, attn.q_proj.weight, expand(attn.k_proj.weight),
                                         expand(attn.v_proj.weight), attn.o_proj.weight, cfg.n_heads, cfg.rope_theta)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("variant", ["dense", "gqa", "moe"])
def test_changing_a_future_token_never_changes_earlier_logits(variant):
    model = model64(VARIANTS[variant])
    tokens = torch.randint(0, 64, (2, 24))
    changed = tokens.clone()
    position = 13
    changed[:, position] = (tokens[:, position] + 1) % 64
    before, after = model(tokens).logits, model(changed).logits
    torch.testing.assert_close(after[:, :position], before[:, :position], rtol=0, atol=1e-12)
    assert (after[:, position:] - before[:, position:]).abs().amax(dim=-1).min() > 1e-6  # later positions see it


def declared_names(model: torch.nn.Module) -> set[str]:
    names = set()
    for mod_name, module in model.named_modules():
        if hasattr(module, "param_layouts"):
            names |= {f"{mod_name}.{local}" if mod_name else local for local in module.param_layouts()}
    return names


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("fused", [True, False])
def test_every_parameter_is_declared_with_the_expected_role(variant, fused):
    cfg = ModelConfig(**{**VARIANTS[variant].__dict__, "fused_qkv": fused, "fused_gate_up": fused})
    with torch.device("meta"):
        model = build_model(cfg)
    params = dict(model.named_parameters())
    assert declared_names(model) == set(params)
    layouts = collect_layouts(model)
    for name, layout in layouts.items():
        p = params[name]
        if name == "tok_embeddings.weight":
            assert layout.role == "embedding"
        elif name == "output.weight":
            assert layout.role == "output"
        elif p.ndim == 1:
            assert layout.role == "norm", name
        elif name.endswith("router.weight"):
            assert layout.role == "router"
        else:
            assert layout.role == "matrix", name
            assert (layout.experts == cfg.n_experts) == (p.ndim == 3), name
    assert (model.output is None) == cfg.tie_embeddings


@pytest.mark.parametrize("variant", ["gqa", "moe", "moe_tied"])
def test_init_from_meta_device_matches_init_on_cpu(variant):
    cfg = VARIANTS[variant]
    with torch.device("meta"):
        model = build_model(cfg)
    model.to_empty(device="cpu")
    with torch.no_grad():  # garbage everywhere, buffers included, to prove init_weights rewrites all of it
        for t in list(model.parameters()) + list(model.buffers()):
            t.fill_(float("nan"))
    torch.manual_seed(7)
    model.init_weights()
    reference = build_model(cfg)
    torch.manual_seed(7)
    reference.init_weights()
    for (name, a), (_, b) in zip(list(model.named_parameters()) + list(model.named_buffers()),
                                 list(reference.named_parameters()) + list(reference.named_buffers())):
        assert torch.equal(a, b), name
    out = model(torch.randint(0, 64, (2, 16)))
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.aux_loss)


def test_init_statistics_follow_the_scaled_init():
    cfg = ModelConfig(vocab_size=512, d_model=256, n_layers=8, n_heads=4, n_kv_heads=4, ffn_dim=512,
                      n_experts=4, first_dense_layers=4, expert_ffn_dim=256, init_std=0.02)
    torch.manual_seed(0)
    model = build_model(cfg)
    scaled = 0.02 / math.sqrt(2 * cfg.n_layers)
    for name, p in model.named_parameters():
        if p.ndim == 1:
            assert torch.equal(p, torch.ones_like(p)), name
            continue
        want = scaled if name.endswith(("o_proj.weight", "down_proj.weight", "down_proj")) else 0.02
        assert abs(p.std().item() / want - 1) < 0.05, (name, p.std().item(), want)
        assert abs(p.mean().item()) < 0.1 * want, name
    for moe in model.moe_layers():
        assert torch.equal(moe.router.expert_bias, torch.zeros(cfg.n_experts))


def test_activation_checkpointing_gives_the_same_gradients_and_counts_load_once():
    cfg = VARIANTS["moe"]
    plain, checkpointed = model64(cfg), model64(cfg)
    for block in checkpointed.layers:
        block.activation_checkpointing = True
    tokens = torch.randint(0, 64, (2, 16))
    for model in (plain, checkpointed):
        out = model(tokens)
        (out.logits.pow(2).mean() + out.aux_loss).backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=1e-12, msg=name)
    assert list(dict(plain.named_parameters())) == list(dict(checkpointed.named_parameters()))
    for a, b in zip(plain.expert_load_counts(), checkpointed.expert_load_counts()):
        assert torch.equal(a, b)
        assert a.sum().item() == tokens.numel() * cfg.top_k


def test_load_is_accumulated_in_training_only_and_reset_by_the_bias_update():
    cfg = VARIANTS["moe"]
    model = model64(cfg)
    tokens = torch.randint(0, 64, (3, 10))
    model(tokens)
    model(tokens[:1])
    counts = model.expert_load_counts()
    assert len(counts) == cfg.n_layers - cfg.first_dense_layers
    for c in counts:
        assert c.dtype == torch.float32 and c.sum().item() == 40 * cfg.top_k  # dropless: N*k per layer
    model.eval()
    model(tokens)
    assert all(torch.equal(a, b) for a, b in zip(counts, model.expert_load_counts()))
    model.update_router_biases(counts)
    assert all(c.sum().item() == 0 for c in model.expert_load_counts())
    with pytest.raises(ValueError, match="2 MoE layers"):
        model.update_router_biases(counts[:1])


@pytest.mark.parametrize("changes, key", [
    (dict(n_heads=3), "n_heads"),
    (dict(n_kv_heads=3), "n_kv_heads"),
    (dict(n_experts=2, top_k=3), "top_k"),
    (dict(d_model=24, n_heads=8), "n_heads"),  # head_dim 3 is odd: no rotary pairs
])
def test_impossible_shapes_fail_with_the_key_named(changes, key):
    with pytest.raises(ConfigError, match=f"model.{key}="):
        Transformer(ModelConfig(**{**TINY, **changes}))


def test_sequence_longer_than_max_seq_len_is_refused():
    model = build_model(ModelConfig(**TINY))
    with pytest.raises(ValueError, match="max_seq_len=32"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_tied_head_uses_the_embedding_matrix():
    model = model64(VARIANTS["moe_tied"])
    tokens = torch.randint(0, 64, (1, 8))
    h = model.tok_embeddings(tokens)
    cos, sin = model.rotary(8)
    for layer in model.layers:
        h, _ = layer(h, cos, sin)
    torch.testing.assert_close(model(tokens).logits, model.norm(h) @ model.tok_embeddings.weight.T,
                               rtol=0, atol=1e-12)
    assert isinstance(model.layers[1].feed_forward, MoE)
