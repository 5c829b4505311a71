"""The optimizer step is bitwise stable: a fixed CPU run reproduces the parameters stored in
`tests/optim/data/muon_step_reference.pt`.

How the reference was produced: `python tests/optim/step_reference.py` with torch 2.13.0 on an AVX512 CPU with
avx512_bf16 and avx512_fp16 (its flags are stored with it), by a tree whose step equals, bit for bit on that
CPU, the step of commit c821edc, the code before the optimizer was reshaped into a library (choices module,
kernel dispatch, constructor, renames). It steps a toy model with fused QKV under GQA, fused gate/up and 3-D experts three
times under three settings (see `step_reference.SETTINGS`). Regenerate it deliberately, by running that
script, only when a change is meant to alter the optimizer's arithmetic, and say so in the commit.

CPU matmul kernels round differently across torch builds and instruction sets, so the comparison is bit for
bit where the environment matches the one that produced the file. Elsewhere a rounding difference inside
Newton-Schulz may flip the last bit of an update element, so the bound is a few ulps of the update in its
Newton-Schulz dtype over the steps (lr x ratio x ulp x steps: about 1e-3 in bf16, 1e-4 in fp32), still an
order of magnitude below what a wrong formula, block split or lr ratio moves (about lr, 1e-2).
"""

import torch

from step_reference import REFERENCE, SETTINGS, environment, reference_run

UPDATE_ULPS = {"bfloat16": 2e-3, "float32": 1e-4}


def test_optimizer_step_matches_stored_reference():
    stored = torch.load(REFERENCE)
    ours = reference_run()
    assert ours.keys() == stored["params"].keys()
    same_environment = stored["environment"] == environment()
    for name, expected in stored["params"].items():
        if same_environment:
            assert torch.equal(ours[name], expected), f"{name} differs from the reference run"
        else:
            atol = UPDATE_ULPS[SETTINGS[name.split("/")[0]]["muon"]["ns_dtype"]]
            torch.testing.assert_close(ours[name], expected, rtol=0, atol=atol, msg=name)
