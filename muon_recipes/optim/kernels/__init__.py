"""Triton kernels for Muon: Newton-Schulz (symmetric products, fused epilogues, batching, CUDA graphs) and the
memory-bound passes of a step.

`ns_iterations_triton(X, coefficients)` runs the iterations on a normalized, batched X [B, m, n] with m <= n
(the caller normalizes and transposes: `muon_recipes.optim.newton_schulz`); `gram_iterations_triton` runs
their Gram form. The kernels themselves (`symmetric_gram`, `symmetric_polynomial`, `commuting_product`,
`fused_update`, and the normalization `divide_matrices`) are exported for tests and benchmarks;
`copy_transposed` moves tall blocks into and out of their buckets (`muon_recipes.optim.blocks.copy_block`);
`momentum_update` and `scaled_add_` are Muon's momentum and its final weight update, one pass each, and
`momentum_into` the momentum written straight into a bucket's slot (`muon_recipes.optim.muon`).

When each of them runs instead of torch is decided in one place, `muon_recipes.optim.dispatch`, which also
says whether Triton is here at all. This package imports Triton only when it imports (`dispatch.triton_imports`),
so it loads on machines without it, and then exports no kernels.
"""

from muon_recipes.optim.dispatch import triton_imports

__all__: list[str] = []

if triton_imports():
    from muon_recipes.optim.kernels.elementwise import momentum_into, momentum_update, scaled_add_
    from muon_recipes.optim.kernels.iterations import (clear_cuda_graphs, gram_iterations_triton,
                                                       ns_iterations_triton)
    from muon_recipes.optim.kernels.normalize import divide_matrices
    from muon_recipes.optim.kernels.symmetric import commuting_product, symmetric_gram, symmetric_polynomial
    from muon_recipes.optim.kernels.transpose import copy_transposed
    from muon_recipes.optim.kernels.update import fused_update

    __all__ += ["ns_iterations_triton", "gram_iterations_triton", "symmetric_gram", "symmetric_polynomial",
                "commuting_product", "fused_update", "divide_matrices", "momentum_update", "momentum_into",
                "scaled_add_",
                "copy_transposed", "clear_cuda_graphs"]
