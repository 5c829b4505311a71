"""GPU-only checks of the optimizer paths that exist only on CUDA (skipped without a CUDA device)."""

import pytest
import torch
from torch import nn

from muon_recipes.optim import Muon

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_fused_adamw_path_matches_torch_adamw_on_cuda():
    """On CUDA the AdamW groups run torch's fused kernel; every hyperparameter must still reach it."""
    hyper = dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05)
    shapes = [(64, 48), (7,), (2, 3, 4)]
    gen = torch.Generator(device="cuda").manual_seed(0)
    init = [torch.randn(s, device="cuda", generator=gen) for s in shapes]
    ours = [nn.Parameter(t.clone()) for t in init]
    ref = [nn.Parameter(t.clone()) for t in init]
    opt = Muon([dict(params=ours, algorithm="adamw", **hyper)])
    ref_opt = torch.optim.AdamW(ref, foreach=False, **hyper)
    for _ in range(6):
        for p, q in zip(ours, ref):
            g = torch.randn(p.shape, device="cuda", generator=gen)
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)
    assert float(opt.state[ours[0]]["step"]) == 6
    # ... and it moved the weights: a step that did nothing would also "match" an untouched copy
    assert not torch.allclose(ours[0].detach(), init[0])
