"""Every ablation in conf/experiment composes, validates, names itself, declares its sweep, and its arms differ in
exactly what the ablation is about (so a measured gap can only come from that)."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from muon_recipes.config import register_configs, to_dataclass, validate

ROOT = Path(__file__).resolve().parents[2]
EXPERIMENTS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))
# What each ablation may change between its arms (the swept keys; for an optimizer-group axis, the optim subtree).
ALLOWED = {"qkv_split": ("optim.split.qkv",), "gate_up_split": ("optim.split.gate_up",),
           "moe_per_expert": ("optim.split.experts",), "ns_schedule": ("optim.ns_schedule", "optim.ns_steps"),
           "ns_method": ("optim.ns_method",),
           "lr_sweep": ("optim.lr",), "muon_vs_adamw": ("optim.",)}


@pytest.fixture(scope="module", autouse=True)
def hydra_conf():
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        yield


def _compose(overrides: list) -> tuple[dict, dict]:
    cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    hydra_cfg = OmegaConf.to_container(cfg.hydra, resolve=False)
    with open_dict(cfg):
        del cfg["hydra"]
    rc = to_dataclass(cfg)
    validate(rc, world_size=1)
    return OmegaConf.to_container(OmegaConf.structured(rc)), hydra_cfg


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_the_ablations_of_the_issue_exist():
    assert set(EXPERIMENTS) >= set(ALLOWED)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_declares_its_sweep(name):
    cfg, hydra_cfg = _compose([f"experiment={name}"])
    assert cfg["experiment"]["name"] == name and cfg["experiment"]["description"]
    params = hydra_cfg["sweeper"]["params"]
    assert "seed" in params and len(params) >= 2, params
    text = (ROOT / "conf" / "experiment" / f"{name}.yaml").read_text()
    assert text.startswith("# @package _global_") and f"experiment={name}" in text  # documents its command
    # The CPU-sized command the file advertises composes and validates too.
    cpu_line = next(ln for ln in text.splitlines() if ln.startswith("#") and "device=cpu" in ln)
    overrides = [tok for tok in cpu_line.split("#")[1].split() if "=" in tok]
    assert _compose(overrides)[0]["model"]["name"].endswith("_tiny")


@pytest.mark.parametrize("name", sorted(ALLOWED))
def test_arms_differ_only_in_the_ablated_keys(name):
    _, hydra_cfg = _compose([f"experiment={name}"])
    axes = {k: str(v).split(",") for k, v in hydra_cfg["sweeper"]["params"].items() if k != "seed"}
    arms = [dict(zip(axes, values)) for values in itertools.product(*axes.values())]
    assert len(arms) >= 2
    flat = [_flatten(_compose([f"experiment={name}"] + [f"{k}={v}" for k, v in arm.items()])[0]) for arm in arms]
    for a, b in itertools.combinations(flat, 2):
        changed = {k for k in a if a[k] != b[k]}
        assert changed, f"{name}: two arms compose to the same config"
        assert all(k.startswith(ALLOWED[name]) for k in changed), (name, changed)
    if name == "muon_vs_adamw":  # each arm at its own lr, the shared AdamW part identical
        by_optim = {f["optim.name"]: f for f in flat}
        assert by_optim["adamw"]["optim.algorithm"] == "adamw" and by_optim["muon_split"]["optim.algorithm"] == "muon"
        assert by_optim["adamw"]["optim.adamw.lr"] == by_optim["muon_split"]["optim.adamw.lr"]


def test_slurm_launcher_config_composes():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    proc = subprocess.run([sys.executable, "train.py", "experiment=qkv_split", "hydra/launcher=slurm", "--cfg",
                           "hydra", "--package", "hydra.launcher"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    launcher = OmegaConf.create(proc.stdout)
    launcher = launcher.hydra.launcher if "hydra" in launcher else launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.tasks_per_node == launcher.gpus_per_node  # one rank per GPU
