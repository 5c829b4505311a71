"""The trainer's loss: next-token cross-entropy computed in float32 from bf16 logits, eager on the CPU and compiled
on a GPU (fused upcast and log-sum-exp), both against a float64 log-softmax."""

import pytest
import torch

from muon_recipes.train.trainer import cross_entropy


def reference(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits.double(), dim=-1)
    return -logp.gather(-1, targets.unsqueeze(-1)).mean()


def test_cross_entropy_of_bf16_logits_is_computed_in_float32():
    torch.manual_seed(0)
    logits = (torch.randn(2, 64, 5000) * 4).bfloat16()
    targets = torch.randint(0, 5000, (2, 64))
    loss = cross_entropy(logits, targets)
    assert loss.dtype == torch.float32
    # bf16 arithmetic would be off by ~1e-2 here; float32 by ~1e-6
    assert abs(loss.item() - reference(logits, targets).item()) < 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_cross_entropy_equals_float64_in_value_and_gradient():
    torch.manual_seed(0)
    logits = (torch.randn(4, 512, 32000, device="cuda") * 4).bfloat16().requires_grad_()
    targets = torch.randint(0, 32000, (4, 512), device="cuda")
    compiled = torch.compile(cross_entropy, dynamic=False)
    loss = compiled(logits, targets)
    loss.backward()
    grad = logits.grad.clone()
    logits.grad = None
    expected = reference(logits, targets)
    expected.backward()
    assert abs(loss.item() - expected.item()) < 1e-4 * abs(expected.item())
    error = ((grad.double() - logits.grad.double()).norm() / logits.grad.double().norm()).item()
    assert error < 1e-2, error  # the gradient is stored in bf16 like the logits
