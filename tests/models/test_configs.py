"""Every model config in conf/model builds (on the meta device) and declares a layout for every parameter."""

from pathlib import Path

import pytest
import torch

from muon_recipes.config import ModelConfig, load_option
from muon_recipes.models import build_model, param_counts
from muon_recipes.optim.blocks import collect_layouts

CONF = Path(__file__).resolve().parents[2] / "conf" / "model"
FILES = sorted(CONF.glob("*.yaml"))
EXPECTED = {"dense_tiny", "gqa_tiny", "moe_tiny", "dense_small", "gqa_small", "moe_small", "moe_medium", "dense_medium",
            "dense_1b"}


def load(path: Path) -> ModelConfig:
    return load_option(path, "model")


def test_the_zoo_is_complete():
    assert EXPECTED <= {f.stem for f in FILES}


@pytest.mark.parametrize("path", FILES, ids=[f.stem for f in FILES])
@pytest.mark.parametrize("fused", [True, False])
def test_config_builds_and_every_parameter_is_declared(path, fused):
    cfg = load(path)
    assert cfg.name == path.stem
    cfg.fused_qkv = cfg.fused_gate_up = fused
    with torch.device("meta"):
        model = build_model(cfg)
    params = dict(model.named_parameters())
    declared = {f"{m}.{local}" if m else local
                for m, module in model.named_modules() if hasattr(module, "param_layouts")
                for local in module.param_layouts()}
    assert declared == set(params)  # explicit declarations, not collect_layouts' shape fallback
    layouts = collect_layouts(model)  # runs ParamLayout.check on every parameter
    assert set(layouts) == set(params)
    fused_kinds = {layout.fuse_kind for layout in layouts.values()} - {None}
    assert fused_kinds == ({"qkv", "gate_up"} if fused else set())
    assert param_counts(cfg).total == sum(p.numel() for p in params.values())


@pytest.mark.parametrize("name, low, high", [("dense_small", 100e6, 150e6), ("gqa_small", 100e6, 150e6),
                                             ("moe_small", 100e6, 150e6), ("moe_medium", 0.9e9, 1.1e9),
                                             ("dense_medium", 0.25e9, 0.28e9), ("dense_1b", 0.8e9, 0.9e9)])
def test_sizes_are_as_advertised(name, low, high):
    assert low <= param_counts(load(CONF / f"{name}.yaml")).total <= high


def test_moe_medium_is_a_quarter_active():
    """moe_medium: ~1B parameters of which ~0.25B act per token, counted on the built model (meta device): all of
    it less every routed expert a token skips (it takes its top_k of n_experts in every MoE layer)."""
    cfg = load(CONF / "moe_medium.yaml")
    with torch.device("meta"):
        model = build_model(cfg)
    layouts = collect_layouts(model)
    total = sum(p.numel() for p in model.parameters())
    skipped = sum(p.numel() // p.shape[0] * (p.shape[0] - cfg.top_k)
                  for name, p in model.named_parameters() if layouts[name].experts)
    assert 0.9e9 <= total <= 1.1e9 and 0.22e9 <= total - skipped <= 0.3e9


def test_moe_small_routes_two_of_eight_or_more_experts():
    """moe_small is the zoo's sparse model: its built expert weights stack 8 or more experts, and what a token
    skips (every routed expert but its top 2, in every MoE layer), counted on the built model, is exactly what
    `param_counts` leaves out of the active parameters."""
    cfg = load(CONF / "moe_small.yaml")
    with torch.device("meta"):
        model = build_model(cfg)
    layouts = collect_layouts(model)
    experts = [p for name, p in model.named_parameters() if layouts[name].experts]
    assert experts and all(p.shape[0] >= 8 for p in experts)
    skipped = sum(p.numel() // p.shape[0] * (p.shape[0] - 2) for p in experts)
    counts = param_counts(cfg)
    assert counts.total - counts.active == skipped


def test_dense_medium_matches_moe_medium_active_matmul_work():
    """The dense counterpart of moe_medium for the efficiency comparison: the same FLOPs per token within 1% (the
    MLP width a moe_medium token passes through, top-2 routed + 1 shared expert, in every layer), same attention."""
    from muon_recipes.models.flops import flops_per_token

    dense, moe = load(CONF / "dense_medium.yaml"), load(CONF / "moe_medium.yaml")
    assert dense.ffn_dim == (moe.top_k + moe.n_shared_experts) * moe.expert_ffn_dim
    assert abs(flops_per_token(dense, 2048) / flops_per_token(moe, 2048) - 1) < 0.01
    for key in ("d_model", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "max_seq_len"):
        assert getattr(dense, key) == getattr(moe, key), key
