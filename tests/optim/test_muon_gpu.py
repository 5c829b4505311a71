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


def test_muon_step_on_cuda_equals_cpu():
    """The CUDA-only paths of a Muon step (tiled transposed copies of tall blocks into and out of their buckets,
    the vectorized normalization, row-segment lr ratios) give the step the CPU computes with plain torch ops.

    Tall and wide blocks, a fused gate/up weight split in two tall halves, 3-D expert weights with tall experts;
    float32 Newton-Schulz so the two devices differ only by float32 rounding."""
    shapes = {"gate_up": (192, 64), "tall": (80, 48), "wide": (48, 80), "experts_down": (4, 64, 32)}
    gen = torch.Generator().manual_seed(1)
    init = {k: torch.randn(s, generator=gen) * 0.02 for k, s in shapes.items()}
    grads = [{k: torch.randn(s, generator=gen) for k, s in shapes.items()} for _ in range(3)]

    def run(device: str, backend: str) -> dict:
        params = {k: nn.Parameter(v.clone().to(device)) for k, v in init.items()}
        opt = Muon([dict(params=[params["gate_up"]], split_sizes=(96, 96)),
                    dict(params=[params["tall"], params["wide"], params["experts_down"]], adjust_lr="rms_norm")],
                   lr=0.02, weight_decay=0.01, ns_dtype="float32", backend=backend)
        for g in grads:
            for k, p in params.items():
                p.grad = g[k].to(device)
            opt.step()
        return {k: p.detach().cpu() for k, p in params.items()}

    cpu = run("cpu", "torch")
    for backend in ("torch", "auto"):
        cuda = run("cuda", backend)
        for k in shapes:
            torch.testing.assert_close(cuda[k], cpu[k], rtol=1e-4, atol=1e-6, msg=f"{k} ({backend})")
    assert not torch.allclose(cpu["tall"], init["tall"])
