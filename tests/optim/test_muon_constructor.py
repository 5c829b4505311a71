"""`Muon(...)` as a library user builds it: every knob an argument, coefficients given as numbers, AdamW groups
that never inherit Muon's lr, and defaults shared with `newton_schulz()`."""

import copy
import inspect

import pytest
import torch
from torch import nn

from muon_recipes.optim import Muon, newton_schulz
from muon_recipes.optim.newton_schulz import KELLER_COEFFICIENTS


def _params(seed=0, shapes=((12, 20), (20,))):
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]


def _grads(params, step):
    gen = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)


def test_every_knob_is_an_argument():
    matrix, bias = _params()
    opt = Muon([dict(params=[matrix]), dict(params=[bias], algorithm="adamw")], lr=0.03, split_sizes=(4, 8),
               experts="fused", bucket_mb=8.0, replica_spread=False, profile=True, adamw_lr=1e-3,
               adamw_weight_decay=0.05)
    muon, adamw = opt.param_groups
    assert (muon["lr"], muon["split_sizes"], muon["experts"]) == (0.03, (4, 8), "fused")
    assert (adamw["lr"], adamw["weight_decay"]) == (1e-3, 0.05)
    assert (opt.bucket_mb, opt.replica_spread, opt.profile) == (8.0, False, True)
    _grads([matrix, bias], 0)
    opt.step()
    assert set(opt.last_step_timings) == {"ns", "comm", "other", "total"}


@pytest.mark.parametrize("kwargs,fragment", [(dict(bucket_mb=0), "bucket_mb=0: must be > 0"),
                                             (dict(replica_spread="yes"), "replica_spread='yes': must be one of"),
                                             (dict(ns_schedule=[(1.0, 2.0)]), "ns_schedule=[(1.0, 2.0)]"),
                                             (dict(ns_schedule="cubic"), "must be one of keller, polar_express")])
def test_bad_arguments_are_named(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        Muon(_params()[:1], **kwargs)


@pytest.mark.parametrize("adamw_lr", [None, 1e-3])
def test_adamw_group_without_lr_never_takes_muons(adamw_lr):
    """An AdamW group that sets no lr steps exactly as torch.optim.AdamW at the documented default (3e-3) or
    at `adamw_lr`, not at Muon's 0.02."""
    ours, ref = _params(1, [(5, 4), (7,)]), _params(1, [(5, 4), (7,)])
    extra = {} if adamw_lr is None else dict(adamw_lr=adamw_lr)
    opt = Muon([dict(params=ours, algorithm="adamw")], lr=0.02, **extra)
    reference = torch.optim.AdamW(ref, lr=adamw_lr or 3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    for step in range(3):
        _grads(ours, step)
        _grads(ref, step)
        opt.step()
        reference.step()
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)


def test_coefficients_given_as_numbers():
    """Keller's triple given as numbers is the `keller` schedule bit for bit; any other table is iterated as
    written (checked against a float64 loop of the same polynomial), its last triple repeated."""
    W0 = torch.randn(16, 24, generator=torch.Generator().manual_seed(3))
    G = torch.randn(16, 24, generator=torch.Generator().manual_seed(4))

    def one_step(schedule, **kwargs):
        p = nn.Parameter(W0.clone())
        p.grad = G.clone()
        Muon([p], lr=0.1, momentum=0.0, nesterov=False, ns_schedule=schedule, ns_steps=4, backend="torch",
             **kwargs).step()
        return p.detach()

    assert torch.equal(one_step([KELLER_COEFFICIENTS]), one_step("keller"))
    table = [(2.0, -1.5, 0.5), (1.5, -0.5, 0.0)]
    ours = one_step(table, ns_dtype="float32", ns_method="standard")
    X = G.double() / (G.double().norm() + 1e-7)
    for a, b, c in table + [table[-1]] * 2:
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    torch.testing.assert_close(ours, W0 - 0.1 * X.float(), rtol=1e-5, atol=1e-6)


def test_coefficients_survive_a_state_dict_round_trip_as_lists():
    """A checkpoint may hand the coefficients back as lists (JSON, DCP); the loaded optimizer steps as the
    original does."""
    table = [(3.0, -3.2, 1.2), (2.0, -1.5, 0.5)]
    params = [_params(6)[0], _params(6)[0]]
    first = Muon([params[0]], ns_schedule=table, ns_steps=3, backend="torch")
    second = Muon([params[1]], backend="torch")
    _grads([params[0]], 0)
    first.step()
    state = copy.deepcopy(first.state_dict())   # as from a checkpoint: no tensor shared with `first`
    state["param_groups"][0]["ns_schedule"] = [list(t) for t in state["param_groups"][0]["ns_schedule"]]
    second.load_state_dict(state)
    with torch.no_grad():
        params[1].copy_(params[0])
    for opt, p in ((first, params[0]), (second, params[1])):
        _grads([p], 1)
        opt.step()
    assert torch.equal(params[0], params[1])


def test_newton_schulz_and_muon_share_their_defaults():
    signature = inspect.signature(newton_schulz).parameters
    muon = inspect.signature(Muon).parameters
    for ns_key, muon_key in [("steps", "ns_steps"), ("schedule", "ns_schedule"), ("method", "ns_method"),
                             ("dtype", "ns_dtype"), ("backend", "backend")]:
        assert signature[ns_key].default == muon[muon_key].default, ns_key
    # ... and so the same numbers: a bare Muon step (lr 1, no momentum, no decay) is the bare newton_schulz().
    G = torch.randn(24, 40, generator=torch.Generator().manual_seed(5))
    p = nn.Parameter(torch.zeros(24, 40))
    p.grad = G.clone()
    Muon([p], lr=1.0, momentum=0.0, nesterov=False).step()
    assert torch.equal(-p.detach(), newton_schulz(G).float())
