"""Triton kernels for Newton-Schulz: symmetric products, fused epilogues, batching, CUDA graphs.

`ns_iterations_triton(X, coefficients)` runs the iterations on a normalized, batched X [B, m, n] with m <= n
(the caller normalizes and transposes: `muon_recipes.optim.newton_schulz`); `gram_iterations_triton` runs
their Gram form. `prefer_triton(X)` says whether the kernels measured faster than torch for that shape on
this machine; `triton_available()` whether they can run here at all. The kernels themselves
(`symmetric_gram`, `symmetric_polynomial`, `commuting_product`, `fused_update`, and the normalization
`divide_matrices`) are exported for tests and benchmarks; `copy_transposed` moves tall blocks
into and out of their buckets (`muon_recipes.optim.blocks.copy_block`); `momentum_update` and
`scaled_add_` are Muon's momentum and its final weight update, one pass each (`muon_recipes.optim.muon`).

Nothing here imports Triton until it is known to import, so the package loads on machines without it
(then only `triton_available`/`prefer_triton` exist and both answer False).
"""

from muon_recipes.optim.kernels.availability import _triton_imports, prefer_triton, triton_available

__all__ = ["prefer_triton", "triton_available"]

if _triton_imports():
    from muon_recipes.optim.kernels.iterations import (clear_cuda_graphs, gram_iterations_triton,
                                                       ns_iterations_triton)
    from muon_recipes.optim.kernels.elementwise import (momentum_applies, momentum_update, scaled_add_,
                                                        scaled_add_applies)
    from muon_recipes.optim.kernels.normalize import divide_matrices
    from muon_recipes.optim.kernels.symmetric import commuting_product, symmetric_gram, symmetric_polynomial
    from muon_recipes.optim.kernels.transpose import copy_transposed, copy_transposed_applies
    from muon_recipes.optim.kernels.update import fused_update

    __all__ += ["ns_iterations_triton", "gram_iterations_triton", "symmetric_gram", "symmetric_polynomial",
                "commuting_product", "fused_update", "divide_matrices", "momentum_update", "momentum_applies",
                "scaled_add_", "scaled_add_applies",
                "copy_transposed", "copy_transposed_applies", "clear_cuda_graphs"]
