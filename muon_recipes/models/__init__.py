"""The model zoo: dense, grouped-query and mixture-of-experts Llama-style decoders.

`build_model(cfg)` gives a `Transformer`; every module declares how its weights split into logical matrices
(`param_layouts`, read by `muon_recipes.optim.blocks.collect_layouts`) and initializes itself in place
(`Transformer.init_weights`, usable after FSDP2 materializes a meta-device model). `flops` gives parameter counts
and training FLOPs per token for MFU.
"""

from muon_recipes.models.flops import ParamCounts, flops_per_token, param_counts
from muon_recipes.models.layers import Embedding, FeedForward, Linear, RMSNorm
from muon_recipes.models.moe import MoE, GroupedExperts, Router
from muon_recipes.models.transformer import (Attention, ModelOutput, RotaryEmbedding, Transformer,
                                             TransformerBlock, build_model)

__all__ = [
    "Attention", "Embedding", "FeedForward", "GroupedExperts", "Linear", "ModelOutput", "MoE", "ParamCounts",
    "RMSNorm", "RotaryEmbedding", "Router", "Transformer", "TransformerBlock", "build_model", "flops_per_token",
    "param_counts",
]
