"""One list per choice (`muon_recipes.choices`): the config and the optimizer accept exactly its entries and
name them when rejecting a value, and the module (with the config that validates against it) loads without
torch, as the sweep launcher needs."""

import dataclasses
import subprocess
import sys

import pytest
import torch

from muon_recipes import choices
from muon_recipes.config import ConfigError, OptimConfig, SplitConfig, validate_optim
from muon_recipes.optim import Muon

# (Muon group key, OptimConfig field, the list both must follow)
GROUP_KEYS = [("ns_schedule", "ns_schedule", choices.SCHEDULES), ("ns_method", "ns_method", choices.METHODS),
              ("backend", "backend", choices.BACKENDS), ("adjust_lr", "adjust_lr", choices.ADJUST_LR),
              ("experts", None, choices.EXPERT_MODES), ("algorithm", "algorithm", choices.ALGORITHMS),
              ("ns_dtype", "ns_dtype", choices.NS_DTYPES)]


def _group(**keys) -> dict:
    return dict(params=[torch.nn.Parameter(torch.zeros(4, 6))], lr=0.01, **keys)


def test_choices_and_config_load_without_torch():
    code = ("import sys; import muon_recipes.choices, muon_recipes.config; "
            "sys.exit('torch was imported' if 'torch' in sys.modules else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("key,field,valid", GROUP_KEYS, ids=[k for k, *_ in GROUP_KEYS])
def test_optimizer_accepts_every_choice_and_names_them_all(key, field, valid):
    for value in valid:
        Muon([_group(**{key: value})])
    with pytest.raises(ValueError) as error:
        Muon([_group(**{key: "not-a-choice"})])
    assert f"{key}='not-a-choice'" in str(error.value)
    assert str(error.value).rsplit("must be one of ", 1)[1].split(" (")[0].split(", ") == list(valid)


@pytest.mark.parametrize("key,field,valid", [g for g in GROUP_KEYS if g[1]], ids=[g[0] for g in GROUP_KEYS if g[1]])
def test_config_accepts_every_choice_and_names_them_all(key, field, valid):
    for value in valid:
        validate_optim(dataclasses.replace(OptimConfig(), **{field: value}))
    with pytest.raises(ConfigError) as error:
        validate_optim(dataclasses.replace(OptimConfig(), **{field: "not-a-choice"}))
    assert error.value.key == f"optim.{field}"
    assert error.value.valid == "must be one of " + ", ".join(valid)


@pytest.mark.parametrize("field,valid", [("qkv", choices.SPLIT_MODES), ("gate_up", choices.SPLIT_MODES),
                                         ("experts", choices.EXPERT_MODES)])
def test_config_split_policy_follows_the_lists(field, valid):
    for value in valid:
        validate_optim(dataclasses.replace(OptimConfig(), split=SplitConfig(**{field: value})))
    with pytest.raises(ConfigError, match=f"optim.split.{field}='x': must be one of {', '.join(valid)}"):
        validate_optim(dataclasses.replace(OptimConfig(), split=SplitConfig(**{field: "x"})))
