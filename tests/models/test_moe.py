"""The MoE layer against a naive per-token loop, the grouped-GEMM path against the per-expert loop, and the
DeepSeek-V3 bias update and Switch balance loss against their formulas."""

import pytest
import torch
import torch.nn.functional as F

from muon_recipes.config import ModelConfig
from muon_recipes.models.moe import MoE, grouped_mm_supported

D, HIDDEN = 16, 24


def make_moe(fused: bool = True, top_k: int = 2, shared: int = 1, n_experts: int = 5, aux: float = 0.0,
             dtype=torch.float64, seed: int = 0, dim: int = D, hidden: int = HIDDEN) -> MoE:
    cfg = ModelConfig(d_model=dim, n_heads=2, n_kv_heads=2, ffn_dim=32, n_experts=n_experts, top_k=top_k,
                      n_shared_experts=shared, expert_ffn_dim=hidden, fused_gate_up=fused, aux_loss_coef=aux,
                      router_bias_update_rate=0.01)
    torch.manual_seed(seed)
    moe = MoE(cfg, init_std=0.3, down_std=0.3)
    moe.router.init_weights()
    moe.experts.init_weights()
    if moe.shared_expert is not None:
        for m in moe.shared_expert.modules():
            if hasattr(m, "init_weights"):
                m.init_weights()
    moe = moe.to(dtype)
    with torch.no_grad():  # a selection bias large enough to change some choices
        moe.router.expert_bias.copy_(torch.randn(n_experts) * 0.2)
    return moe


def swiglu(x, gate, up, down):
    return down @ (F.silu(gate @ x) * (up @ x))


def naive_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """One token at a time: sigmoid affinities, top-k of (affinity + bias), gates from raw affinities."""
    experts, hidden = moe.experts, moe.experts.hidden
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        affinity = torch.sigmoid(moe.router.weight @ x[t])
        chosen = sorted(range(moe.n_experts), key=lambda e: -(affinity[e] + moe.router.expert_bias[e]).item())
        chosen = chosen[: moe.top_k]
        gates = affinity[chosen]
        if moe.top_k > 1:
            gates = gates / gates.sum()
        for g, e in zip(gates, chosen):
            if experts.fused:
                gate, up = experts.gate_up_proj[e][:hidden], experts.gate_up_proj[e][hidden:]
            else:
                gate, up = experts.gate_proj[e], experts.up_proj[e]
            out[t] += g * swiglu(x[t], gate, up, experts.down_proj[e])
        if moe.shared_expert is not None:
            s = moe.shared_expert
            if s.fused:
                gate, up = s.gate_up_proj.weight.chunk(2)
            else:
                gate, up = s.gate_proj.weight, s.up_proj.weight
            out[t] += swiglu(x[t], gate, up, s.down_proj.weight)
    return out


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("top_k, shared", [(2, 1), (1, 0), (3, 2)])
def test_moe_equals_a_naive_per_token_loop(fused, top_k, shared):
    moe = make_moe(fused=fused, top_k=top_k, shared=shared)
    x = torch.randn(3, 7, D, dtype=torch.float64)
    out, aux, counts = moe(x)
    torch.testing.assert_close(out, naive_moe(moe, x.reshape(-1, D)).view_as(x), rtol=0, atol=1e-12)
    assert counts.sum().item() == 21 * top_k  # dropless: every token reaches exactly top_k experts
    assert aux.item() == 0.0


def test_moe_gradients_match_the_naive_loop():
    moe = make_moe()
    x = torch.randn(9, D, dtype=torch.float64, requires_grad=True)
    target = torch.randn(9, D, dtype=torch.float64)
    (moe(x)[0] * target).sum().backward()
    grads = {n: p.grad.clone() for n, p in moe.named_parameters()}
    x_grad = x.grad.clone()
    moe.zero_grad()
    x.grad = None
    (naive_moe(moe, x) * target).sum().backward()
    torch.testing.assert_close(x_grad, x.grad, rtol=0, atol=1e-12)
    for n, p in moe.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=0, atol=1e-12, msg=n)
    assert grads["router.weight"].abs().sum() > 0  # the gates carry gradient to the router


def test_switch_balance_loss_matches_its_formula():
    moe = make_moe(aux=0.1)
    x = torch.randn(20, D, dtype=torch.float64)
    _, aux, counts = moe(x)
    affinity = torch.sigmoid(x @ moe.router.weight.T)
    chosen = torch.topk(affinity + moe.router.expert_bias, moe.top_k).indices
    load_share = torch.stack([(chosen == e).sum() for e in range(moe.n_experts)]).double() / (20 * moe.top_k)
    mean_prob = (affinity / affinity.sum(-1, keepdim=True)).mean(0)
    torch.testing.assert_close(aux, 0.1 * moe.n_experts * (load_share * mean_prob).sum(), rtol=0, atol=1e-14)
    assert torch.equal(counts.double() / (20 * moe.top_k), load_share)


def test_bias_update_raises_under_loaded_and_lowers_over_loaded_experts():
    moe = make_moe(n_experts=4)
    before = moe.router.expert_bias.clone()
    moe.record_load(torch.tensor([10, 0, 5, 5]))
    moe.update_bias(torch.tensor([10.0, 0.0, 5.0, 5.0]))  # mean 5
    step = moe.router.expert_bias - before
    torch.testing.assert_close(step, torch.tensor([-0.01, 0.01, 0.0, 0.0], dtype=step.dtype), rtol=0, atol=1e-12)
    assert moe.load_counts.sum() == 0


def test_bias_updates_balance_a_skewed_router():
    torch.manual_seed(0)
    moe = make_moe(n_experts=4, shared=0)
    x = torch.randn(256, D, dtype=torch.float64) + 0.5
    with torch.no_grad():
        moe.router.expert_bias.zero_()
        moe.router.weight[0] = 0.5  # affinity ~ sigmoid(4) for expert 0: it takes every token

    def spread(counts):
        return (counts.max() - counts.min()).item() / counts.sum().item()

    first = moe(x)[2].double()
    for _ in range(100):
        moe.update_bias(moe(x)[2].double())
    last = moe(x)[2].double()
    assert spread(first) > 0.3, first
    assert spread(last) < 0.3 * spread(first), last
    assert moe.router.expert_bias[0] == moe.router.expert_bias.min()  # the over-loaded expert was pushed down


def grouped_mm_runs_on(device: str, dtype: torch.dtype) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        a = torch.zeros(16, 16, device=device, dtype=dtype)
        b = torch.zeros(2, 16, 16, device=device, dtype=dtype)
        torch._grouped_mm(a, b.transpose(-2, -1), offs=torch.tensor([0, 16], device=device, dtype=torch.int32))
        return True
    except (RuntimeError, NotImplementedError):
        return False


def compare_backends(moe: MoE, x: torch.Tensor, atol: float, rtol: float) -> None:
    results = {}
    for backend in ("grouped_mm", "loop"):
        moe.experts.backend = backend
        moe.zero_grad()
        xi = x.detach().clone().requires_grad_()
        out, _, counts = moe(xi)
        out.float().pow(2).sum().backward()
        results[backend] = (out, counts, xi.grad, {n: p.grad.clone() for n, p in moe.named_parameters()})
    (out_g, counts_g, xg_g, grads_g), (out_l, counts_l, xg_l, grads_l) = results["grouped_mm"], results["loop"]
    assert torch.equal(counts_g, counts_l)
    torch.testing.assert_close(out_g, out_l, atol=atol, rtol=rtol)
    torch.testing.assert_close(xg_g, xg_l, atol=atol, rtol=rtol)
    for name in grads_l:
        torch.testing.assert_close(grads_g[name], grads_l[name], atol=atol, rtol=rtol, msg=name)


@pytest.mark.skipif(not grouped_mm_runs_on("cpu", torch.float32), reason="torch._grouped_mm has no CPU kernel here")
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("group_align", [1, 16])
def test_grouped_mm_path_equals_the_loop_on_cpu(fused, group_align):
    moe = make_moe(fused=fused, dtype=torch.float32, n_experts=6)
    moe.experts.group_align = group_align
    with torch.no_grad():
        moe.router.expert_bias[3] = -100.0  # expert 3 receives no token: an empty group
    x = torch.randn(37, D)  # 74 assignments: groups of sizes that are not multiples of 8 or 16
    compare_backends(moe, x, atol=1e-5, rtol=1e-5)
    assert moe(x)[2][3] == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("group_align", [1, 16])
def test_grouped_mm_path_equals_the_loop_on_gpu_in_bf16(fused, group_align):
    """Group boundaries at any row (group_align 1, the default) and padded to 16 rows: both equal the loop."""
    moe = make_moe(fused=fused, dtype=torch.bfloat16, n_experts=8, dim=64, hidden=128, shared=1).cuda()
    moe.experts.group_align = group_align
    x = torch.randn(4, 250, 64, device="cuda", dtype=torch.bfloat16)
    if not grouped_mm_supported(x, 64, 128):
        pytest.skip("torch._grouped_mm is not available for this GPU")
    compare_backends(moe, x, atol=2e-2, rtol=2e-2)
    with torch.no_grad():
        moe.experts.backend = "grouped_mm"
        forced = moe(x)[0]
        moe.experts.backend = "auto"
        assert torch.equal(moe(x)[0], forced)  # auto picks the grouped GEMM here


# Experts that receive no token: the first, the last, several in a row, and all but top_k of them. Their groups
# are empty (repeated group ends in `offs`, also at the start and at the end), in the forward's products and in
# the backward's weight-gradient products, which contract over the group's rows.
EMPTY_EXPERTS = ((0,), (7,), (0, 1, 2, 7), (1, 2, 3, 4, 5, 6))


def starve(moe: MoE, experts: tuple[int, ...]) -> None:
    """Route no token to `experts` (a selection bias far below every affinity)."""
    with torch.no_grad():
        moe.router.expert_bias.zero_()
        moe.router.expert_bias[list(experts)] = -100.0


@pytest.mark.skipif(not grouped_mm_runs_on("cpu", torch.float32), reason="torch._grouped_mm has no CPU kernel here")
@pytest.mark.parametrize("empty", EMPTY_EXPERTS, ids=lambda e: "empty" + "_".join(map(str, e)))
@pytest.mark.parametrize("group_align", [1, 16])
def test_empty_expert_groups_equal_the_loop_on_cpu(empty, group_align):
    """Forward, input gradient and every weight gradient equal the per-expert loop; a starved expert's weight
    gradient is exactly zero."""
    moe = make_moe(fused=True, dtype=torch.float32, n_experts=8)
    moe.experts.group_align = group_align
    starve(moe, empty)
    x = torch.randn(45, D)
    counts = moe(x)[2]
    assert counts[list(empty)].sum() == 0 and counts.sum() == 90
    compare_backends(moe, x, atol=1e-5, rtol=1e-5)
    for name in ("gate_up_proj", "down_proj"):
        assert getattr(moe.experts, name).grad[list(empty)].abs().max() == 0, name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("empty", EMPTY_EXPERTS, ids=lambda e: "empty" + "_".join(map(str, e)))
@pytest.mark.parametrize("group_align", [1, 16])
def test_empty_expert_groups_equal_the_loop_on_gpu_at_moe_small_sizes(empty, group_align):
    """moe_small's expert layer (8 experts of 768 on d_model 512, top-2, one step's 8192 tokens) in bf16 with some
    experts starved: the grouped GEMM equals the loop forward and backward, the starved experts' weight gradients
    are exactly zero, and nothing faults (synchronized after each pass, so an illegal access is raised here)."""
    moe = make_moe(fused=True, dtype=torch.bfloat16, n_experts=8, dim=512, hidden=768, shared=1).cuda()
    moe.experts.group_align = group_align
    starve(moe, empty)
    x = torch.randn(32, 256, 512, device="cuda", dtype=torch.bfloat16)
    if not grouped_mm_supported(x, 512, 768):
        pytest.skip("torch._grouped_mm is not available for this GPU")
    results = {}
    for backend in ("loop", "grouped_mm"):   # the grouped GEMM last: its gradients are checked below
        moe.experts.backend = backend
        moe.zero_grad()
        xi = x.detach().clone().requires_grad_()
        out, _, counts = moe(xi)
        torch.cuda.synchronize()
        out.float().pow(2).mean().backward()
        torch.cuda.synchronize()
        results[backend] = {"out": out, "x": xi.grad, **{n: p.grad.clone() for n, p in moe.named_parameters()}}
        assert counts[list(empty)].sum() == 0 and counts.sum() == 32 * 256 * 2
    for key, reference in results["loop"].items():   # bf16 rounding of different summation orders
        assert relative_error(results["grouped_mm"][key], reference) < 2e-2, key
    for name in ("gate_up_proj", "down_proj"):
        assert getattr(moe.experts, name).grad[list(empty)].abs().max() == 0, name


def test_grouped_mm_is_only_chosen_where_its_constraints_hold():
    x = torch.zeros(4, 64, dtype=torch.bfloat16)
    assert not grouped_mm_supported(x, 64, 128)  # CPU: the exact loop
    if torch.cuda.is_available():
        assert not grouped_mm_supported(x.cuda().float(), 64, 128)  # fp32: not the bf16 kernel
        assert not grouped_mm_supported(x.cuda(), 64, 100)  # 200-byte rows: unaligned


def test_unknown_backend_is_refused():
    moe = make_moe()
    moe.experts.backend = "cutlass"
    with pytest.raises(ValueError, match="backend='cutlass'"):
        moe(torch.randn(2, D, dtype=torch.float64))


def moe_block(seed: int = 0):
    """A transformer block with an MoE feed-forward (4 routed experts of 32 + 1 shared), float32 on the CPU."""
    from muon_recipes.models.transformer import RotaryEmbedding, TransformerBlock

    cfg = ModelConfig(d_model=32, n_heads=4, n_kv_heads=2, ffn_dim=64, n_layers=2, n_experts=4, top_k=2,
                      n_shared_experts=1, expert_ffn_dim=32, first_dense_layers=0, max_seq_len=16)
    torch.manual_seed(seed)
    block, rotary = TransformerBlock(cfg, layer_id=1), RotaryEmbedding(8, 16, 10000.0)
    for module in (*block.modules(), rotary):
        if hasattr(module, "init_weights"):
            module.init_weights()
    with torch.no_grad():
        block.feed_forward.router.expert_bias.copy_(torch.randn(4) * 0.2)
    return block, rotary(16)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.skipif(not grouped_mm_runs_on("cpu", torch.bfloat16), reason="torch._grouped_mm has no CPU kernel here")
@pytest.mark.parametrize("compiler", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_moe_block_compiles_as_one_graph_and_equals_eager(compiler, request):
    """Router, dispatch, grouped experts, combine and the load statistics in one graph (fullgraph: a graph break,
    or a host sync that needs a value from a tensor, raises), in bf16 (the grouped kernel's dtype under compile).
    Output and gradients are compared with the eager per-expert loop in float64 on the same weights: the compiled
    block's error is that of bf16 arithmetic, no larger than twice the eager bf16 loop's; the expert loads it
    records equal the eager ones. The graph is checked under aot_eager by default; inductor's CPU build of it
    (about a minute on 2 cores) runs with `-m slow`."""
    if compiler == "inductor" and "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("slow: select with -m slow")
    block, (cos, sin) = moe_block()
    x = torch.randn(3, 16, 32, dtype=torch.float64)
    weight = torch.linspace(-1, 1, x.numel(), dtype=torch.float64).view_as(x)
    results = {}
    for name, dtype in (("float64", torch.float64), ("eager bf16", torch.bfloat16), ("compiled", torch.bfloat16)):
        block.to(dtype).zero_grad()
        block.feed_forward.router.expert_bias.data = block.feed_forward.router.expert_bias.float()  # stays fp32
        block.feed_forward.load_counts.zero_()
        block.feed_forward.experts.backend = "grouped_mm" if name == "compiled" else "loop"
        run = torch.compile(block, fullgraph=True, backend=compiler) if name == "compiled" else block
        xi = x.to(dtype, copy=True).requires_grad_()
        out, _ = run(xi, cos.to(dtype), sin.to(dtype))
        (out.double() * weight).sum().backward()
        results[name] = {"out": out.detach(), "x": xi.grad, "load": block.feed_forward.load_counts.clone(),
                         **{n: p.grad.clone() for n, p in block.named_parameters()}}
    torch._dynamo.reset()
    reference, loop, compiled = results["float64"], results["eager bf16"], results["compiled"]
    assert torch.equal(compiled.pop("load"), loop.pop("load")) and reference.pop("load").sum() == 3 * 16 * 2
    for key in reference:
        loop_error, compiled_error = relative_error(loop[key], reference[key]), relative_error(compiled[key],
                                                                                              reference[key])
        assert compiled_error < 2 * loop_error + 1e-3 and compiled_error < 3e-2, (key, compiled_error, loop_error)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fused", [True, False])
def test_moe_in_bf16_on_gpu_is_as_close_to_float64_as_the_loop(fused):
    """The grouped GEMM path in bf16 against the per-expert loop in float64 (same weights): its relative error is
    that of bf16 arithmetic, no larger than twice the bf16 loop's own error. Measured on the tokens whose experts
    bf16 routing chooses as float64 does (a near tie can flip a choice; both bf16 paths share the router)."""
    moe = make_moe(fused=fused, dtype=torch.float64, n_experts=8, dim=128, hidden=256, shared=1).cuda()
    x = torch.randn(8, 256, 128, device="cuda", dtype=torch.float64)
    if not grouped_mm_supported(x.bfloat16(), 128, 256):
        pytest.skip("torch._grouped_mm is not available for this GPU")
    moe.experts.backend = "loop"
    with torch.no_grad():
        reference = moe(x)[0].reshape(-1, 128)
        chosen = moe.router(x.reshape(-1, 128))[1].sort(-1).values
        moe.to(torch.bfloat16)
        same = (moe.router(x.bfloat16().reshape(-1, 128))[1].sort(-1).values == chosen).all(-1)
        assert same.float().mean() > 0.5, same.float().mean()
        errors = {}
        for backend in ("grouped_mm", "loop"):
            moe.experts.backend = backend
            out = moe(x.bfloat16())[0].reshape(-1, 128).double()
            errors[backend] = ((out - reference)[same].norm() / reference[same].norm()).item()
    assert errors["grouped_mm"] < 2 * errors["loop"] + 1e-3, errors
    assert errors["grouped_mm"] < 2e-2, errors


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_moe_training_step_on_gpu_never_waits_for_the_device():
    """Forward and backward of the MoE layer (bf16, grouped GEMM), the load recording and the bias update, under
    `torch.cuda.set_sync_debug_mode("error")`: any operation that synchronizes the host with the device raises."""
    moe = make_moe(dtype=torch.bfloat16, n_experts=8, dim=64, hidden=128, shared=1).cuda()
    x = torch.randn(4, 250, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    if not grouped_mm_supported(x, 64, 128):
        pytest.skip("torch._grouped_mm is not available for this GPU")
    moe(x)[0].float().pow(2).sum().backward()  # first call: lazy initialization of kernels and handles
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, aux, counts = moe(x)
        (out.float().pow(2).sum() + aux).backward()
        moe.record_load(counts)
        moe.update_bias(moe.load_counts.clone())
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert int(counts.sum()) == 4 * 250 * 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp32_weights_under_autocast_take_the_grouped_gemm():
    """Without FSDP mixed precision the weights and the residual stream are fp32 and autocast runs the matmuls in
    bf16: the experts then run as one grouped GEMM too (the same result as forcing it), not the per-expert loop."""
    moe = make_moe(dtype=torch.float32, n_experts=8, dim=64, hidden=128, shared=1).cuda()
    x = torch.randn(4, 250, 64, device="cuda")
    if not grouped_mm_supported(x.bfloat16(), 64, 128):
        pytest.skip("torch._grouped_mm is not available for this GPU")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        moe.experts.backend = "grouped_mm"
        forced = moe(x)[0]
        moe.experts.backend = "auto"
        automatic = moe(x)[0]
    # The output's dtype is autocast's choice, not the layer's: CUDA autocast runs the combine's `sum` in float32
    # (its float32 op list), CPU autocast in bf16. What matters is that both paths took the same kernels.
    assert automatic.dtype == forced.dtype and torch.equal(automatic, forced)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_moe_block_compiles_as_one_graph_on_gpu_with_the_automatic_backend():
    """On the GPU the block chooses the grouped GEMM itself (`backend="auto"`: dtype, alignment and the device's
    compute capability checked while tracing) and still compiles as one graph, forward and backward, equal to
    eager (bf16, the same kernels: close to bf16 rounding)."""
    block, (cos, sin) = moe_block()
    block = block.cuda().bfloat16()
    block.feed_forward.router.expert_bias.data = block.feed_forward.router.expert_bias.float()
    x = torch.randn(3, 16, 32, device="cuda", dtype=torch.bfloat16)
    if not grouped_mm_supported(x, 32, 32):
        pytest.skip("torch._grouped_mm is not available for this GPU")
    cos, sin = cos.cuda().bfloat16(), sin.cuda().bfloat16()
    results = []
    for run in (block, torch.compile(block, fullgraph=True, backend="aot_eager")):
        block.zero_grad()
        xi = x.clone().requires_grad_()
        out, _ = run(xi, cos, sin)
        out.float().pow(2).sum().backward()
        results.append([out.detach(), xi.grad] + [p.grad.clone() for p in block.parameters()])
    torch._dynamo.reset()
    for eager, compiled in zip(*results):
        assert relative_error(compiled, eager) < 1e-2
