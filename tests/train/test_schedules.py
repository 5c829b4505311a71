"""`lr_multiplier`: the warmup, cosine, WSD and constant shapes at points worked out by hand, and the
schedule driving every param group of an optimizer through LambdaLR."""

import functools
import math

import pytest
import torch

from muon_recipes.train.schedules import lr_multiplier


def test_warmup_is_linear_and_reaches_one_on_its_last_step():
    for schedule in ("cosine", "wsd", "constant"):
        values = [lr_multiplier(s, total_steps=100, schedule=schedule, warmup_steps=4) for s in range(4)]
        assert values == [0.25, 0.5, 0.75, 1.0], schedule


def test_cosine_at_start_middle_end_and_beyond():
    f = functools.partial(lr_multiplier, total_steps=104, schedule="cosine", warmup_steps=4, min_lr_ratio=0.1)
    assert f(4) == 1.0                              # progress 0: cos(0) = 1
    assert f(54) == pytest.approx(0.55)             # progress 1/2: 0.1 + 0.9 * (1 + cos(pi/2)) / 2
    assert f(29) == pytest.approx(0.1 + 0.45 * (1 + math.sqrt(0.5)))   # progress 1/4: cos(pi/4)
    assert f(104) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)


def test_wsd_holds_then_decays_linearly_over_the_last_fraction():
    f = functools.partial(lr_multiplier, total_steps=100, schedule="wsd", warmup_steps=0, min_lr_ratio=0.1,
                          decay_fraction=0.2)
    assert f(0) == f(79) == 1.0                     # stable until step 80 = 100 - 20
    assert f(80) == pytest.approx(1 - 0.9 / 20)     # first decay step: 1/20 of the way down
    assert f(89) == pytest.approx(1 - 0.9 * 10 / 20)
    assert f(99) == pytest.approx(0.1)              # the last step lands on min_lr_ratio
    no_decay = functools.partial(lr_multiplier, total_steps=100, schedule="wsd", warmup_steps=0,
                                 decay_fraction=0.0)
    assert no_decay(99) == 1.0


def test_constant_after_warmup():
    assert [lr_multiplier(s, total_steps=10, schedule="constant", warmup_steps=0) for s in (0, 5, 50)] == [1.0] * 3


def test_unknown_schedule_names_the_choices():
    with pytest.raises(ValueError, match="lr schedule 'linear': must be one of cosine, wsd, constant"):
        lr_multiplier(10, total_steps=100, schedule="linear", warmup_steps=0)


def test_every_param_group_follows_the_shape_from_its_own_base_lr():
    groups = [dict(params=[torch.nn.Parameter(torch.zeros(1))], lr=0.02),
              dict(params=[torch.nn.Parameter(torch.zeros(1))], lr=3e-3)]
    opt = torch.optim.SGD(groups, lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, functools.partial(
        lr_multiplier, total_steps=104, schedule="cosine", warmup_steps=4, min_lr_ratio=0.1))
    seen = []
    for _ in range(55):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        scheduler.step()
    assert seen[0] == pytest.approx([0.02 * 0.25, 3e-3 * 0.25])
    assert seen[54] == pytest.approx([0.02 * 0.55, 3e-3 * 0.55])
