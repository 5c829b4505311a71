"""The optimizer step is bitwise stable: a fixed CPU run reproduces the parameters stored in
`tests/optim/data/muon_step_reference.pt`.

How the reference was produced: `python tests/optim/step_reference.py` on commit c821edc, the code before the
optimizer was reshaped into a library (choices module, kernel dispatch, constructor, renames), with torch
2.13.0 on an AVX512 CPU. It steps a toy model with fused QKV under GQA, fused gate/up and 3-D experts three
times under three settings (see `step_reference.SETTINGS`). Regenerate it deliberately, by running that
script, only when a change is meant to alter the optimizer's arithmetic, and say so in the commit.

CPU matmul kernels round differently across torch builds and instruction sets, so the comparison is bit for
bit where the environment matches the one that produced the file, and otherwise within a few float32 ulps
of the update, a bound a wrong formula, a wrong block split or a wrong lr ratio breaks by orders of magnitude.
"""

import torch

from step_reference import REFERENCE, environment, reference_run


def test_optimizer_step_matches_stored_reference():
    stored = torch.load(REFERENCE)
    ours = reference_run()
    assert ours.keys() == stored["params"].keys()
    same_environment = stored["environment"] == environment()
    for name, expected in stored["params"].items():
        if same_environment:
            assert torch.equal(ours[name], expected), f"{name} differs from the reference run"
        else:
            torch.testing.assert_close(ours[name], expected, rtol=1e-5, atol=1e-6, msg=name)
