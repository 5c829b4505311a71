"""The Muon optimizer on one process: references, block parity, AdamW parity, state dict round trips."""

import copy
import importlib
import io
import math

import pytest
import torch
from torch import nn

from muon_recipes.optim import Muon
from muon_recipes.optim.newton_schulz import newton_schulz

orthogonalize_module = importlib.import_module("muon_recipes.optim.orthogonalize")

RATIO = {  # the block shape rule each adjust_lr mode must follow, written out independently
    "spectral_norm": lambda rows, cols: math.sqrt(max(1.0, rows / cols)),
    "rms_norm": lambda rows, cols: 0.2 * math.sqrt(max(rows, cols)),
    "none": lambda rows, cols: 1.0,
}


def grads_for(shapes, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen) for s in shapes] for _ in range(steps)]


def run(params, grads_per_step, **group_kwargs):
    """Step a fresh optimizer over `params` with the given gradients; returns the params."""
    opt = Muon([dict(params=params, **group_kwargs)])
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    return params


# --------------------------------------------------------------------------------------------------------------
# An independent reference for a plain matrix
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("adjust_lr", ["spectral_norm", "rms_norm", "none"])
def test_plain_matrix_matches_naive_loop(shape, nesterov, adjust_lr):
    lr, mu, wd = 0.05, 0.9, 0.1
    w0 = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    steps = grads_for([shape], 4)
    ours = run([nn.Parameter(w0.clone())], steps, lr=lr, momentum=mu, nesterov=nesterov, weight_decay=wd,
               adjust_lr=adjust_lr, ns_dtype=torch.float32, backend="torch")[0]
    w, buf = w0.clone(), torch.zeros(shape)
    for (g,) in steps:
        buf = mu * buf + g
        update = g + mu * buf if nesterov else buf
        O = newton_schulz(update, dtype=torch.float32, backend="torch")
        w = w * (1 - lr * wd) - lr * RATIO[adjust_lr](*shape) * O
    torch.testing.assert_close(ours.detach(), w, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch >= 2.9")
@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("adjust_lr,torch_fn", [("spectral_norm", "original"), ("rms_norm", "match_rms_adamw")])
def test_matches_torch_optim_muon(shape, nesterov, adjust_lr, torch_fn):
    # torch.optim.Muon keeps an EMA buffer, (1 - mu) times ours; Newton-Schulz normalizes the scale away, so
    # the updates agree up to bf16 rounding.
    lr, mu, wd = 0.02, 0.95, 0.1
    w0 = torch.randn(shape, generator=torch.Generator().manual_seed(8))
    steps = grads_for([shape], 3)
    ours = run([nn.Parameter(w0.clone())], steps, lr=lr, momentum=mu, nesterov=nesterov, weight_decay=wd,
               adjust_lr=adjust_lr, backend="torch")[0].detach()
    ref = nn.Parameter(w0.clone())
    opt = torch.optim.Muon([ref], lr=lr, momentum=mu, nesterov=nesterov, weight_decay=wd, adjust_lr_fn=torch_fn)
    for (g,) in steps:
        ref.grad = g.clone()
        opt.step()
    delta_ours, delta_ref = ours - w0, ref.detach() - w0
    assert (delta_ours - delta_ref).norm() / delta_ref.norm() < 0.03


# --------------------------------------------------------------------------------------------------------------
# Blocks: a fused weight with split_sizes == separate parameters of the block shapes
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("adjust_lr", ["spectral_norm", "rms_norm", "none"])
@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("ns_dtype", [torch.float32, torch.bfloat16])
def test_split_fused_weight_equals_separate_params(adjust_lr, nesterov, weight_decay, ns_dtype):
    blocks, cols = (12, 4, 4), 20  # GQA QKV: q is 12 x 20, k and v are 4 x 20 (so the ratios differ)
    kw = dict(lr=0.03, momentum=0.9, nesterov=nesterov, weight_decay=weight_decay, adjust_lr=adjust_lr,
              ns_dtype=ns_dtype, backend="torch")
    w0 = torch.randn(sum(blocks), cols, generator=torch.Generator().manual_seed(1))
    steps = grads_for([(sum(blocks), cols)], 3)
    fused = run([nn.Parameter(w0.clone())], steps, split_sizes=blocks, **kw)[0]
    separate = run([nn.Parameter(w.clone()) for w in w0.split(blocks)],
                   [list(g.split(blocks)) for (g,) in steps], **kw)
    torch.testing.assert_close(fused.detach(), torch.cat([p.detach() for p in separate]), rtol=0, atol=0)
    # And the switch matters: the same weight orthogonalized whole moves differently.
    whole = run([nn.Parameter(w0.clone())], steps, **kw)[0]
    assert (whole - fused).abs().max() > 1e-3


@pytest.mark.parametrize("split", [None, (6, 6)])
def test_expert_weight_equals_separate_matrices(split):
    experts, rows, cols = 3, 12, 20
    kw = dict(lr=0.03, weight_decay=0.05, ns_dtype=torch.float32, backend="torch")
    w0 = torch.randn(experts, rows, cols, generator=torch.Generator().manual_seed(2))
    steps = grads_for([(experts, rows, cols)], 3)
    stacked = run([nn.Parameter(w0.clone())], steps, split_sizes=split, experts="per_expert", **kw)[0]
    sizes = split or (rows,)
    separate = run([nn.Parameter(b.clone()) for e in w0 for b in e.split(sizes)],
                   [[b for e in g for b in e.split(sizes)] for (g,) in steps], **kw)
    expected = torch.stack([torch.cat([p.detach() for p in separate[i * len(sizes):(i + 1) * len(sizes)]])
                            for i in range(experts)])
    torch.testing.assert_close(stacked.detach(), expected, rtol=0, atol=0)


@pytest.mark.parametrize("split", [None, (6, 6)])
def test_fused_experts_orthogonalize_the_concatenation(split):
    # experts="fused": block i is the [E * rows_i, cols] concatenation over experts of each expert's block i.
    experts, rows, cols = 3, 12, 20
    sizes = split or (rows,)
    kw = dict(lr=0.03, weight_decay=0.05, adjust_lr="spectral_norm", ns_dtype=torch.float32, backend="torch")
    w0 = torch.randn(experts, rows, cols, generator=torch.Generator().manual_seed(3))
    steps = grads_for([(experts, rows, cols)], 3)
    fused = run([nn.Parameter(w0.clone())], steps, split_sizes=split, experts="fused", **kw)[0].detach()

    def concat_blocks(t):  # [E, rows, cols] -> one [E * rows_i, cols] tensor per block
        return [torch.cat([e.split(sizes)[i] for e in t]) for i in range(len(sizes))]

    separate = run([nn.Parameter(b) for b in concat_blocks(w0)], [concat_blocks(g) for (g,) in steps], **kw)
    for i, p in enumerate(separate):
        torch.testing.assert_close(torch.cat([e.split(sizes)[i] for e in fused]), p.detach(), rtol=0, atol=0)
    per_expert = run([nn.Parameter(w0.clone())], steps, split_sizes=split, experts="per_expert", **kw)[0]
    assert (per_expert - fused).abs().max() > 1e-3


def test_equal_block_shapes_share_one_batched_call(monkeypatch):
    calls = []
    real = orthogonalize_module.newton_schulz

    def counting(G, **kw):
        calls.append(tuple(G.shape))
        return real(G, **kw)

    monkeypatch.setattr(orthogonalize_module, "newton_schulz", counting)
    qkv = [nn.Parameter(torch.randn(20, 16)) for _ in range(2)]  # blocks 12x16, 4x16, 4x16
    small = [nn.Parameter(torch.randn(4, 16)) for _ in range(3)]  # same shape as the k/v blocks
    tall = nn.Parameter(torch.randn(16, 4))  # the transpose of a k/v block: joins their batch
    experts = nn.Parameter(torch.randn(3, 12, 16))  # 3 blocks of 12x16, like q
    opt = Muon([dict(params=qkv, split_sizes=(12, 4, 4)), dict(params=small + [tall]), dict(params=[experts])],
               backend="torch")
    for p in qkv + small + [tall, experts]:
        p.grad = torch.randn_like(p)
    opt.step()
    assert sorted(calls) == [(5, 12, 16), (8, 4, 16)]
    # The batches the first step's kernels are compiled for ahead (on a GPU) are these calls.
    from muon_recipes.optim.blocks import BlockPlan
    from muon_recipes.optim.orthogonalize import NSSettings, bucket_shapes

    ns = NSSettings(5, "keller", torch.bfloat16, "torch", 1e-7)
    jobs = [(BlockPlan.build(p.shape, group.get("split_sizes"), "per_expert"), ns, p.device)
            for group in opt.param_groups for p in group["params"]]
    assert sorted((count, m, n) for ((m, n), _, _, _), count in bucket_shapes(jobs).items()) == sorted(calls)


# --------------------------------------------------------------------------------------------------------------
# AdamW groups == torch.optim.AdamW
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("foreach", [False, True])
def test_adamw_group_matches_torch_adamw(foreach):
    hyper = dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05)
    shapes = [(6, 5), (7,), (2, 3, 4)]
    init = [torch.randn(s, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(shapes)]
    ours = [nn.Parameter(t.clone()) for t in init]
    ref = [nn.Parameter(t.clone()) for t in init]
    opt = Muon([dict(params=ours, algorithm="adamw", **hyper)])
    ref_opt = torch.optim.AdamW(ref, foreach=foreach, **hyper)
    for grads in grads_for(shapes, 6):
        for p, q, g in zip(ours, ref, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
        for p, q in zip(ours, ref):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)
    assert opt.state[ours[0]]["step"].item() == 6


# --------------------------------------------------------------------------------------------------------------
# State dict
# --------------------------------------------------------------------------------------------------------------
def _mixed_model_and_optimizer(seed=0):
    torch.manual_seed(seed)
    model = nn.ModuleDict(dict(qkv=nn.Linear(16, 24, bias=True), experts=nn.Linear(1, 1)))
    model.experts.weight = nn.Parameter(torch.randn(2, 8, 16))
    opt = Muon([
        dict(name="qkv", params=[model.qkv.weight], split_sizes=(16, 4, 4)),
        dict(name="experts", params=[model.experts.weight], experts="per_expert", adjust_lr="rms_norm",
             weight_decay=0.1),
        dict(name="adamw", params=[model.qkv.bias, model.experts.bias], algorithm="adamw", lr=3e-3,
             betas=(0.85, 0.98), weight_decay=0.01),
    ], backend="torch")
    return model, opt


def _train(model, opt, steps, start):
    for s in range(start, start + steps):
        gen = torch.Generator().manual_seed(s)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()


def test_state_dict_round_trip_continues_identically():
    model, opt = _mixed_model_and_optimizer()
    _train(model, opt, 3, start=0)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, buffer)
    assert all(isinstance(k, int) for k in opt.state_dict()["state"])  # indices, never id()

    fresh_model, fresh_opt = _mixed_model_and_optimizer(seed=1)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    fresh_model.load_state_dict(saved["model"])
    fresh_opt.load_state_dict(saved["optim"])
    _train(model, opt, 3, start=3)
    _train(fresh_model, fresh_opt, 3, start=3)
    for a, b in zip(model.parameters(), fresh_model.parameters()):
        assert torch.equal(a, b)
    # A fresh optimizer that did not load diverges (so the comparison above has teeth).
    other_model, other_opt = _mixed_model_and_optimizer(seed=1)
    other_model.load_state_dict(saved["model"])
    _train(other_model, other_opt, 3, start=3)
    assert not torch.equal(next(model.parameters()), next(other_model.parameters()))


def test_distributed_checkpoint_state_dict_round_trip():
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    model, opt = _mixed_model_and_optimizer()
    _train(model, opt, 2, start=0)
    osd = copy.deepcopy(get_optimizer_state_dict(model, opt))
    assert "qkv.weight" in osd["state"] and "momentum_buffer" in osd["state"]["qkv.weight"]
    msd = copy.deepcopy(model.state_dict())

    fresh_model, fresh_opt = _mixed_model_and_optimizer(seed=1)
    fresh_model.load_state_dict(msd)
    set_optimizer_state_dict(fresh_model, fresh_opt, osd)
    _train(model, opt, 2, start=2)
    _train(fresh_model, fresh_opt, 2, start=2)
    for a, b in zip(model.parameters(), fresh_model.parameters()):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------------------------
# Errors for people
# --------------------------------------------------------------------------------------------------------------
def test_bad_groups_name_the_key_and_value():
    w = nn.Parameter(torch.randn(8, 4))
    with pytest.raises(ValueError, match=r"algorithm='sgd'"):
        Muon([dict(params=[w], algorithm="sgd")])
    with pytest.raises(ValueError, match=r"adjust_lr='spectral'"):
        Muon([w], adjust_lr="spectral")
    with pytest.raises(ValueError, match=r"split_sizes=\(3, 3\)"):
        Muon([dict(params=[w], split_sizes=(3, 3))])
    with pytest.raises(ValueError, match=r"shape \(8,\)"):
        Muon([nn.Parameter(torch.randn(8))])
    with pytest.raises(ValueError, match=r"ns_dtype='float8'"):
        Muon([w], ns_dtype="float8")


def test_last_step_timings_are_reported():
    w = nn.Parameter(torch.randn(8, 4))
    opt = Muon([w], backend="torch")
    w.grad = torch.randn_like(w)
    opt.step()
    t = opt.last_step_timings
    assert set(t) == {"ns", "comm", "other", "total"} and t["ns"] > 0 and t["comm"] == 0
    assert abs(t["ns"] + t["comm"] + t["other"] - t["total"]) < 1e-9
