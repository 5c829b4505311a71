"""Recipes: `model=X` of a GPU-sized model composes X's training recipe (conf/recipe/X.yaml), the tiny models keep
the CPU smoke run, every key stays overridable, and the global batch turns into a per-rank micro-batch and an
accumulation count for any world size (or one line naming the numbers that do not divide)."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from muon_recipes.config import ConfigError, TrainConfig, derive_batch, to_dataclass

ROOT = Path(__file__).resolve().parents[1]
GPU_MODELS = ("dense_small", "gqa_small", "moe_small", "moe_medium", "dense_medium", "dense_1b")
TINY_MODELS = ("dense_tiny", "gqa_tiny", "moe_tiny")


def compose(*overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from muon_recipes.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return to_dataclass(hydra_compose("config", overrides=list(overrides)))


@pytest.mark.parametrize("model", GPU_MODELS)
def test_a_gpu_model_brings_its_recipe(model):
    recipe = OmegaConf.load(ROOT / "conf" / "recipe" / f"{model}.yaml")
    rc = compose(f"model={model}")
    assert rc.train.recipe == model
    for section in ("train", "optim", "data"):  # every value the recipe file sets is what the run gets
        composed = OmegaConf.structured(getattr(rc, section))
        for key, value in OmegaConf.to_container(recipe[section]).items():
            got = OmegaConf.to_container(composed[key]) if OmegaConf.is_config(composed[key]) else composed[key]
            assert got == value or (isinstance(value, dict) and value.items() <= got.items()), (section, key)
    assert rc.data.tokenizer == "bpe" and rc.data.scope == "site-packages" and rc.train.compile
    assert rc.train.global_batch_tokens % rc.train.seq_len == 0


@pytest.mark.parametrize("model", TINY_MODELS)
def test_a_tiny_model_keeps_the_smoke_run(model):
    smoke = OmegaConf.load(ROOT / "conf" / "train" / "default.yaml")
    rc = compose(f"model={model}")
    assert rc.train.recipe == "smoke" and rc.data.tokenizer == "byte" and rc.data.scope == "stdlib"
    composed = OmegaConf.to_container(OmegaConf.structured(rc.train))
    for key, value in OmegaConf.to_container(smoke).items():
        assert composed[key] == value, key


def test_every_recipe_key_can_be_overridden_and_experiments_keep_their_batch():
    rc = compose("model=moe_small", "train.global_batch_tokens=65536", "data.tokenizer=byte", "optim.lr=0.01",
                 "train.steps=7")
    assert (rc.train.global_batch_tokens, rc.data.tokenizer, rc.optim.lr, rc.train.steps) == (65536, "byte", 0.01, 7)
    rc = compose("experiment=qkv_split")  # gqa_small's recipe below, the experiment's own per-rank batch on top
    assert rc.train.recipe == "gqa_small" and rc.train.global_batch_tokens == 0
    assert (rc.train.seq_len, rc.train.batch_size, rc.train.steps) == (256, 32, 600)


@pytest.mark.parametrize("world, micro, accum", [(1, 32, 4), (2, 32, 2), (4, 32, 1), (8, 16, 1), (16, 8, 1)])
def test_derived_batch_keeps_the_global_batch(world, micro, accum):
    t = TrainConfig(seq_len=1024, global_batch_tokens=131072, batch_size=32)
    assert derive_batch(t, world) == (micro, accum)
    assert world * micro * accum * t.seq_len == t.global_batch_tokens


def test_derived_batch_on_three_ranks():
    ok = TrainConfig(seq_len=1024, global_batch_tokens=96 * 1024, batch_size=16)
    assert derive_batch(ok, 3) == (16, 2)  # 32 sequences per rank = 2 micro-batches of 16
    assert derive_batch(ok, 1) == (16, 6)
    assert derive_batch(ok, 2) == (16, 3)
    with pytest.raises(ConfigError) as e:  # 128 sequences cannot be split over 3 ranks
        derive_batch(TrainConfig(seq_len=1024, global_batch_tokens=131072, batch_size=32), 3)
    assert "train.global_batch_tokens=131072" in str(e.value) and "128 sequences" in str(e.value)
    assert "3 ranks" in str(e.value) and "3072" in str(e.value)


def test_a_micro_batch_that_does_not_divide_is_named_with_the_numbers():
    with pytest.raises(ConfigError) as e:  # 48 sequences per rank; 32 does not divide them, 24 does
        derive_batch(TrainConfig(seq_len=1024, global_batch_tokens=96 * 1024, batch_size=32), 2)
    message = str(e.value)
    assert message.startswith("invalid config: train.batch_size=32") and "\n" not in message
    assert "48 sequences per rank" in message and "96 x 1024" in message and "largest that does is 24" in message
    with pytest.raises(ConfigError, match="multiple of train.seq_len=1024"):
        derive_batch(TrainConfig(seq_len=1024, global_batch_tokens=1000, batch_size=8), 1)
    with pytest.raises(ConfigError, match="train.grad_accum=2"):
        derive_batch(TrainConfig(seq_len=64, global_batch_tokens=512, batch_size=4, grad_accum=2), 1)
    assert derive_batch(TrainConfig(batch_size=8, grad_accum=3), 5) == (8, 3)  # 0: per-rank values as given
