"""Param groups from declared layouts + config policy; the conf/optim files compose and build."""

import pathlib
import re

import pytest
import torch
from omegaconf import OmegaConf

from muon_recipes.config import OptimConfig, to_dataclass, validate_optim
from muon_recipes.optim import Muon, build_optimizer, build_param_groups, describe_param_groups
from muon_recipes.optim.blocks import BlockPlan
from optim_toy_models import EXPERT_FFN, FFN, KV, Q, ToyModel

CONF = pathlib.Path(__file__).resolve().parents[2] / "conf" / "optim"


def optim_cfg(**overrides) -> OptimConfig:
    cfg = OptimConfig()
    for key, value in overrides.items():
        obj, *path = key.split(".")
        target = cfg if not path else getattr(cfg, obj)
        setattr(target, path[-1] if path else obj, value)
    return cfg


def groups_by_param(groups) -> dict[str, dict]:
    return {name: g for g in groups for name, _ in g["params"]}


def test_split_policy_reaches_every_fused_kind():
    model = ToyModel()
    by_name = groups_by_param(build_param_groups(model, optim_cfg()))
    assert by_name["blocks.0.qkv"]["split_sizes"] == (Q, KV, KV)
    assert by_name["blocks.1.gate_up"]["split_sizes"] == (FFN, FFN)
    expert = by_name["blocks.0.experts_gate_up"]
    assert expert["split_sizes"] == (EXPERT_FFN, EXPERT_FFN) and expert["experts"] == "per_expert"
    assert by_name["blocks.0.wo"]["split_sizes"] is None and by_name["blocks.0.wo"]["algorithm"] == "muon"
    for name in ("embed", "head", "blocks.0.norm", "blocks.0.bias", "blocks.0.router"):
        assert by_name[name]["algorithm"] == "adamw", name
    # Weight decay: matrices of the AdamW half (head, router) yes; embeddings, norms, biases no.
    assert by_name["head"]["weight_decay"] == by_name["blocks.0.router"]["weight_decay"] == 0.1
    assert by_name["embed"]["weight_decay"] == by_name["blocks.0.norm"]["weight_decay"] == 0.0
    # Same policy -> same group, across layers.
    assert by_name["blocks.0.qkv"] is by_name["blocks.1.qkv"]


def test_fused_policy_and_adamw_everywhere():
    model = ToyModel()
    fused = groups_by_param(build_param_groups(model, optim_cfg(**{"split.qkv": "fused", "split.gate_up": "fused",
                                                                   "split.experts": "fused"})))
    assert fused["blocks.0.qkv"]["split_sizes"] is None and fused["blocks.0.gate_up"]["split_sizes"] is None
    assert fused["blocks.0.experts_down"]["experts"] == "fused"
    everything = build_param_groups(model, optim_cfg(algorithm="adamw"))
    assert {g["algorithm"] for g in everything} == {"adamw"}
    assert sum(len(g["params"]) for g in everything) == len(list(model.parameters()))


def test_hyperparameters_are_passed_through():
    cfg = optim_cfg(lr=0.05, momentum=0.9, nesterov=False, weight_decay=0.01, adjust_lr="rms_norm", ns_steps=7,
                    ns_schedule="polar_express", ns_dtype="float32", backend="torch")
    cfg.adamw.lr, cfg.adamw.betas, cfg.adamw.eps, cfg.adamw.weight_decay = 1e-3, [0.8, 0.9], 1e-6, 0.2
    opt = build_optimizer(ToyModel(), cfg)
    muon = next(g for g in opt.param_groups if g["algorithm"] == "muon")
    adamw = next(g for g in opt.param_groups if g["name"] == "adamw")
    assert (muon["lr"], muon["momentum"], muon["nesterov"], muon["weight_decay"], muon["adjust_lr"],
            muon["ns_steps"], muon["ns_schedule"], muon["ns_dtype"], muon["backend"]) == (
        0.05, 0.9, False, 0.01, "rms_norm", 7, "polar_express", "float32", "torch")
    assert (adamw["lr"], adamw["betas"], adamw["eps"], adamw["weight_decay"]) == (1e-3, (0.8, 0.9), 1e-6, 0.2)


def test_describe_lists_millions_per_group():
    opt = build_optimizer(ToyModel(), optim_cfg())
    line = describe_param_groups(opt)
    assert "\n" not in line
    counts = re.findall(r"(?:^|\| )(\S+) (\d+\.\d\d)M", line.removeprefix("param groups: "))
    assert [name for name, _ in counts] == [g["name"] for g in opt.param_groups] + ["total"]
    assert float(counts[0][1]) == round(sum(p.numel() for p in opt.param_groups[0]["params"]) / 1e6, 2)
    total = float(re.search(r"total (\d+\.\d\d)M", line).group(1))
    assert total == round(sum(p.numel() for p in ToyModel().parameters()) / 1e6, 2)


@pytest.mark.parametrize("path", sorted(CONF.glob("*.yaml")), ids=lambda p: p.stem)
def test_conf_files_compose_validate_and_build(path):
    raw = OmegaConf.load(path)
    assert raw.name == path.stem
    cfg = to_dataclass({"optim": raw}).optim
    validate_optim(cfg)
    opt = build_optimizer(ToyModel(), cfg)
    assert isinstance(opt, Muon)
    model_params = ToyModel()
    for p in model_params.parameters():
        p.grad = torch.randn_like(p)
    opt = build_optimizer(model_params, cfg)
    before = [p.detach().clone() for p in model_params.parameters()]
    opt.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, model_params.parameters()))


def test_recipes_orthogonalize_the_blocks_they_name():
    """conf/optim/muon_split.yaml orthogonalizes q, k, v, gate, up and every expert separately; muon_fused.yaml
    every stored weight whole (experts concatenated); adamw.yaml nothing. Checked on the blocks the optimizer
    builds from each file, against the toy model's declared sizes."""
    model = ToyModel()
    names = {id(p): n for n, p in model.named_parameters()}
    D = model.blocks[0].qkv.shape[1]
    E = model.blocks[0].experts_gate_up.shape[0]

    def blocks(recipe: str) -> dict:
        opt = build_optimizer(model, to_dataclass({"optim": OmegaConf.load(CONF / f"{recipe}.yaml")}).optim)
        return {names[id(p)]: BlockPlan.build(p.shape, g["split_sizes"], g["experts"]).block_shapes()
                for g in opt.param_groups if g["algorithm"] == "muon" for p in g["params"]}

    split, fused = blocks("muon_split"), blocks("muon_fused")
    assert split["blocks.0.qkv"] == [(1, Q, D), (1, KV, D), (1, KV, D)]
    assert split["blocks.0.gate_up"] == [(1, FFN, D), (1, FFN, D)]
    assert split["blocks.0.experts_gate_up"] == [(E, EXPERT_FFN, D), (E, EXPERT_FFN, D)]
    assert fused["blocks.0.qkv"] == [(1, Q + 2 * KV, D)]
    assert fused["blocks.0.gate_up"] == [(1, 2 * FFN, D)]
    assert fused["blocks.0.experts_gate_up"] == [(1, E * 2 * EXPERT_FFN, D)]
    assert blocks("adamw") == {}
