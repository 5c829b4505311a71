"""`FastLaunch` on CPU, with a stand-in for the compiled kernel that records every launch: each launch gets the
grid its own call asks for, also when an earlier call with the same key (same sizes, strides, dtypes and
alignment) asked for another.

The transposed copy and the normalization pass the batch count only through the grid. A grid kept from the
first launch of a key made the copy of a shared expert's gate half (one 768 x 512 matrix, the strides of a
`[1536, 512]` weight) run over the eight matrices of the routed experts' gate halves (`[8, 768, 512]` pieces of
`[8, 1536, 512]`, the same strides): reads and writes seven matrices past both tensors, an illegal memory
access on a GPU (moe_small with `optim.split.experts=per_expert`). Fused experts make no such pair.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from muon_recipes.optim.kernels import normalize, transpose  # noqa: E402
from muon_recipes.optim.kernels.fast_launch import FastLaunch, unwrap  # noqa: E402


class RecordingKernel:
    """Stands for a `@triton.jit` kernel: `kernel[grid](*args, **constexprs)` returns a "compiled kernel" whose
    `compiled[grid](*args)` launches; both record (path, grid, the first int argument)."""

    def __init__(self, arg_names):
        self.arg_names = list(arg_names)
        self.launches: list[tuple] = []
        self.compiles = 0

    def __getitem__(self, grid):
        def ordinary(*args, **constexprs):
            meta = dict(zip(self.arg_names, args), **constexprs)
            self.launches.append(("ordinary", tuple(grid(meta)) + (1,) * (3 - len(grid(meta)))))
            self.compiles += 1
            return RecordingCompiled(self)
        return ordinary


class RecordingCompiled:
    function = object()   # what `FastLaunch` checks for: the compiled-kernel launch API

    def __init__(self, kernel: RecordingKernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        return lambda *args: self.kernel.launches.append(("fast", tuple(grid)))


class RecordingWithSource(RecordingKernel):
    """Also records the batch of the first argument (the transposed copy's source, `[B, R, C]`)."""

    def __getitem__(self, grid):
        def ordinary(*args, **constexprs):
            meta = dict(zip(self.arg_names, args), **constexprs)
            self.launches.append((args[0].shape[0], tuple(grid(meta))[2]))
            return RecordingCompiledWithSource(self)
        return ordinary


class RecordingCompiledWithSource(RecordingCompiled):
    def __getitem__(self, grid):
        return lambda *args: self.kernel.launches.append((args[0].shape[0], tuple(grid)[2]))


def recording(real_kernel) -> tuple[FastLaunch, RecordingKernel]:
    kernel = RecordingKernel(unwrap(real_kernel)[0].arg_names)
    launcher = FastLaunch(kernel)
    launcher.enabled = True   # off under the interpreter; the stand-in runs nowhere
    return launcher, kernel


def test_each_launch_gets_its_own_grid_under_one_key():
    launcher, kernel = recording(transpose._transposed_copy_kernel)
    args = (torch.empty(4), torch.empty(4), 10, 20, 1, 2, 3, 4, 5, 6)
    for batch in (8, 1, 8, 3):
        launcher(lambda meta, batch=batch: (2, 3, batch), args, {"TILE": 64, "INTERPRETED": False})
    assert kernel.compiles == 1   # one key: compiled once, launched directly afterwards
    assert [grid[2] for _, grid in kernel.launches] == [8, 1, 8, 3]
    assert [path for path, _ in kernel.launches] == ["ordinary", "fast", "fast", "fast"]


def test_an_entry_keeps_no_tensor_of_its_first_launch():
    launcher, _ = recording(transpose._transposed_copy_kernel)
    launcher(lambda meta: (1, 1, 1), (torch.empty(4), torch.empty(4), 10, 20, 1, 2, 3, 4, 5, 6),
             {"TILE": 64, "INTERPRETED": False})
    (entry,) = launcher.entries.values()
    assert not any(isinstance(v, torch.Tensor) for part in entry if isinstance(part, (dict, tuple))
                   for v in (part.values() if isinstance(part, dict) else part))


def test_transposed_copies_of_expert_and_shared_halves_launch_their_own_batch(monkeypatch):
    """The copies `orthogonalize` makes for moe_small's per-expert gate/up halves, then the shared expert's:
    equal key, batch 8 then 1 (sizes cut down, strides of the same form)."""
    launcher, kernel = recording(transpose._transposed_copy_kernel)
    monkeypatch.setattr(transpose, "_launch_transposed_copy", launcher)
    rows, cols, experts = 24, 16, 8
    routed = torch.zeros(experts, 2 * rows, cols, dtype=torch.bfloat16)   # [E, gate+up, in]
    shared = torch.zeros(2 * rows, cols, dtype=torch.bfloat16).unsqueeze(0)   # [1, gate+up, in]
    bucket = torch.empty(experts + 1, cols, rows, dtype=torch.bfloat16)
    gate = routed[:, :rows].mT                # [8, cols, rows], column-major
    shared_gate = shared[:, :rows].mT         # [1, cols, rows], the same strides
    assert gate.stride() == shared_gate.stride()
    transpose.copy_transposed(bucket[:experts], gate)
    transpose.copy_transposed(bucket[experts:], shared_gate)
    assert kernel.compiles == 1, "the two copies should share one specialization (the case under test)"
    assert [grid[2] for _, grid in kernel.launches] == [experts, 1]


def test_normalization_of_two_batches_with_equal_matrix_sizes_launches_its_own_batch(monkeypatch):
    launcher, kernel = recording(normalize._divide_kernel)
    monkeypatch.setattr(normalize, "_launch_divide", launcher)
    for batch, (m, n) in ((5, (8, 12)), (2, (4, 24)), (1, (8, 12))):   # 96 elements per matrix each time
        x = torch.ones(batch, m, n)
        normalize.divide_matrices(x, torch.ones(batch), out=torch.empty_like(x))
    assert [grid[0] for _, grid in kernel.launches] == [5, 2, 1]   # one block of 8192 elements per matrix


@pytest.mark.parametrize("experts", ["per_expert", "fused"])
def test_the_bucket_copies_of_a_moe_small_step_each_cover_their_own_matrices(monkeypatch, experts):
    """`orthogonalize` on moe_small's expert and shared-expert updates of two layers (gate/up split 768 + 768), every
    copy into and out of the buckets through the transposed-copy launcher, as on a GPU: each launch's grid spans
    exactly its source's matrices (Newton-Schulz itself left out: the identity)."""
    from muon_recipes.optim import dispatch, orthogonalize as orthogonalize_module
    from muon_recipes.optim.blocks import BlockPlan
    from muon_recipes.optim.orthogonalize import NSSettings

    kernel = RecordingWithSource(unwrap(transpose._transposed_copy_kernel)[0].arg_names)
    launcher = FastLaunch(kernel)
    launcher.enabled = True
    monkeypatch.setattr(transpose, "_launch_transposed_copy", launcher)
    monkeypatch.setattr(dispatch, "copy_transposed_on_triton",   # the GPU's decision, on CPU tensors
                        lambda dst, src: dispatch.is_transposed_view(src) and dst.stride(-1) == 1)
    monkeypatch.setattr(orthogonalize_module, "newton_schulz", lambda batch, **settings: batch)
    ns = NSSettings(5, "keller", torch.bfloat16, "torch", 1e-7, "gram")
    shapes = [((8, 1536, 512), (768, 768)), ((8, 512, 768), None), ((1536, 512), (768, 768)), ((512, 768), None)]
    jobs = [(torch.zeros(shape, dtype=torch.bfloat16), BlockPlan.build(shape, split, experts), ns)
            for _ in range(2) for shape, split in shapes]
    orthogonalize_module.orthogonalize(jobs)
    assert kernel.launches
    assert all(grid_batch == batch for batch, grid_batch in kernel.launches), kernel.launches


def test_ceil_div_matches_triton_cdiv():
    """The grids' host-side ceil division against Triton's own, at the edges (exact multiples, one past, one)."""
    import triton

    from muon_recipes.optim.kernels.fast_launch import ceil_div

    for a in (0, 1, 63, 64, 65, 1023, 1024, 1025, 5632, 14336 * 4096):
        for b in (1, 16, 32, 64, 128, 256):
            assert ceil_div(a, b) == triton.cdiv(a, b), (a, b)


def test_bounded_programs_caps_a_pass_and_restores_the_outer_bound():
    """A pass's launch: one program per block, or within `bounded_programs(k)` at most k programs in all off the
    GPU (k per SM on one); nested bounds restore the outer one; a bound under 1 is refused."""
    from muon_recipes.optim.kernels.fast_launch import bounded_programs, programs

    cpu = torch.device("cpu")
    assert programs(1000, cpu) == 1000
    with bounded_programs(3):
        assert programs(1000, cpu) == 3 and programs(2, cpu) == 2
        with bounded_programs(5):
            assert programs(1000, cpu) == 5
        assert programs(1000, cpu) == 3
    assert programs(1000, cpu) == 1000
    with pytest.raises(ValueError, match=r"bounded_programs: per_sm=0, expected at least 1"):
        with bounded_programs(0):
            pass


def test_a_bounded_normalization_loops_over_every_block(monkeypatch):
    """Within the bound the division launches 2 programs for 5 matrices of 2 blocks each: 5 rounds per program."""
    from muon_recipes.optim.kernels.fast_launch import bounded_programs

    launcher, kernel = recording(normalize._divide_kernel)
    monkeypatch.setattr(normalize, "_launch_divide", launcher)
    x = torch.ones(5, 128, 96)   # 12288 elements per matrix: two blocks of 8192
    with bounded_programs(2):
        normalize.divide_matrices(x, torch.ones(5), out=torch.empty_like(x))
    normalize.divide_matrices(x, torch.ones(5), out=torch.empty_like(x))
    assert [grid for _, grid in kernel.launches] == [(2, 1, 1), (10, 1, 1)]
