"""`muon_recipes.optim.dispatch`: every kernel-or-torch decision, checked where it is decided.

Without Triton (a fresh interpreter in which `import triton` fails) the module loads, every question answers
False, the kernels package exports nothing, and Muon and `newton_schulz` run on torch with the same numbers;
asking for the Triton backend there is a clear error. On this machine the thresholds are checked at their
boundaries, and the kernel modules import nothing private from one another.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from muon_recipes.optim import dispatch

KERNELS_DIR = Path(dispatch.__file__).resolve().parent / "kernels"

WITHOUT_TRITON = r"""
import sys
sys.modules["triton"] = None   # `import triton` raises ImportError, as on a machine without it
import torch
from muon_recipes.optim import Muon, dispatch, kernels, newton_schulz

assert dispatch.triton_imports() is False and dispatch.triton_available() is False
assert dispatch.kernels() is None and kernels.__all__ == []
g = torch.randn(2, 64, 96, generator=torch.Generator().manual_seed(0))
w = torch.randn(64, 96)
assert dispatch.prefer_triton(g) is False and dispatch.newton_schulz_on_triton(g, "auto") is False
assert dispatch.momentum_on_triton([g], [g.clone()]) is False
assert dispatch.scaled_add_on_triton(w, w.clone()) is False
assert dispatch.copy_transposed_on_triton(torch.empty(96, 64), w.mT) is False
assert torch.equal(newton_schulz(g, backend="auto"), newton_schulz(g, backend="torch"))
try:
    newton_schulz(g, backend="triton")
except RuntimeError as error:
    assert "backend='triton'" in str(error) and "backend='torch'" in str(error), error
else:
    raise AssertionError("backend='triton' without Triton did not fail")
p = torch.nn.Parameter(w.clone())
p.grad = torch.randn(64, 96)
Muon([p], lr=0.02, backend="auto").step()
assert not torch.equal(p.detach(), w)
assert "triton" not in sys.modules or sys.modules["triton"] is None
"""


def test_without_triton_everything_runs_on_torch():
    proc = subprocess.run([sys.executable, "-c", WITHOUT_TRITON], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("rows,cols,on_cuda,expected", [
    (64, 96, False, True),                                   # CPU: every non-square block
    (96, 64, False, True),
    (64, 64, False, False),                                  # square blocks gain nothing
    (dispatch.GRAM_MIN_SIDE_CUDA - 1, 4096, True, False),    # GPU: just under the measured side
    (dispatch.GRAM_MIN_SIDE_CUDA, 4096, True, True),         # ... and at it
    (4096, dispatch.GRAM_MIN_SIDE_CUDA, True, True),
    (1024, 1024, True, False),
])
def test_gram_form_boundary(rows, cols, on_cuda, expected):
    assert dispatch.uses_gram_form("gram", rows, cols, on_cuda) is expected
    assert dispatch.uses_gram_form("standard", rows, cols, on_cuda) is False


def test_cpu_tensors_stay_on_torch_outside_the_interpreter():
    if dispatch.interpreting():
        pytest.skip("TRITON_INTERPRET is set for this process")
    big = torch.zeros(8, 1024, 4096, dtype=torch.bfloat16)   # far above every threshold, but on the CPU
    weight = torch.zeros(dispatch.SCALED_ADD_MIN_NUMEL // 1024, 1024)
    assert dispatch.prefer_triton(big) is False
    assert dispatch.newton_schulz_on_triton(big, "auto") is False
    assert dispatch.momentum_on_triton([weight], [weight.clone()]) is False
    assert dispatch.scaled_add_on_triton(weight, weight.clone()) is False
    assert dispatch.copy_transposed_on_triton(torch.empty(1024, 4096), torch.zeros(4096, 1024).mT) is False
    assert dispatch.fused_adamw(weight) is False


def test_backend_names_are_checked():
    X = torch.zeros(1, 4, 8)
    assert dispatch.newton_schulz_on_triton(X, "torch") is False
    with pytest.raises(ValueError, match="backend='cuda': must be one of auto, torch, triton"):
        dispatch.newton_schulz_on_triton(X, "cuda")


def test_transposed_view():
    x = torch.zeros(3, 16, 24)
    assert dispatch.is_transposed_view(x.mT) and not dispatch.is_transposed_view(x)
    assert dispatch.is_transposed_view(torch.zeros(16, 24).mT)
    assert not dispatch.is_transposed_view(torch.zeros(24, 1).mT)   # one row: nothing is read with a stride
    assert not dispatch.is_transposed_view(torch.zeros(2, 3, 4, 5).mT)   # 4-D: not a batch of matrices


def test_kernel_modules_import_nothing_private_from_each_other():
    offenders = []
    for path in sorted(KERNELS_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("muon_recipes"):
                offenders += [f"{path.name}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    assert offenders == []
