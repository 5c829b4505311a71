"""The kernels as Hopper (sm_90) machine code, built here on the CPU: what the interpreter cannot show.

test_kernels.py runs the kernels in Triton's CPU interpreter, which checks their arithmetic but never compiles
the GPU branches and says nothing about registers, shared memory or instructions. Here every kernel is
compiled for sm_90 with the Triton and ptxas of this machine (`tests/optim/machine_code.py`) and its machine code
is read back:

* every autotuning tile of the matmul kernels, at the real block shapes, keeps its accumulators in
  registers (no local-memory spills), fits Hopper's shared memory, multiplies on the tensor cores (the
  warpgroup instruction HGMMA wherever the tile has a warpgroup of 4 warps, per-warp HMMA otherwise) and
  reads and writes global memory in 16-byte vectors only, the tiles on the diagonal of a symmetric product
  included;
* each dtype path compiles and multiplies the way torch would (bf16, fp16 and TF32 on HGMMA with that input
  type, true fp32 on FMAs);
* the elementwise passes move their data in 16-byte vectors, which is what they are for (one pass over
  memory at full bandwidth instead of torch's unvectorized mixed-dtype kernels).

Both checks failed on the symmetric kernel before it changed: with bounds masks on every tile its 128 x 256,
256 x 128 and 4-warp 128 x 128 tiles spilled 88-136 bytes per thread, and a tile crossing the diagonal
masked each triangle per element, which compiles to 2-byte stores (128 to 256 per thread). Speed is measured
on a GPU (recipes/bench_newton_schulz.py), never here.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

try:
    import machine_code  # noqa: E402
    from muon_recipes.optim.kernels import elementwise, normalize, symmetric, transpose, update  # noqa: E402
except RuntimeError as error:   # Triton 3.3's autotuner asks for a GPU driver when the kernel is defined
    pytest.skip(f"this Triton cannot define autotuned kernels without a GPU: {error}", allow_module_level=True)

if not machine_code.toolchain_available():
    pytest.skip("this Triton has no ptxas/cuobjdump to build CUDA binaries with", allow_module_level=True)
from muon_recipes.optim.kernels.tuning import matmul_configs, prune_configs, tile_label  # noqa: E402

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
# The register allocation is the compiler's: Triton 3.6 (the GPU image's) and 3.9 keep every tile below in
# registers, Triton 3.4 spills the symmetric kernel's 128 x 256 tiles (240 bytes per thread), which the
# autotuner then times slower and passes over. The spill check holds from 3.6 on.
SPILL_FREE_FROM = (3, 6)
TRITON_VERSION = tuple(int(part) for part in triton.__version__.split(".")[:2])
# dense_1b's MLP blocks (the bulk of its Newton-Schulz work): m x n = 2048 x 5632, a bucket of 48.
BATCH, M, N = 48, 2048, 5632


def symmetric_args(m: int, k: int, dtype: torch.dtype, out_dtype: torch.dtype | None = None) -> dict:
    """out = alpha x y^T + beta c for a batch of x, y [BATCH, m, k]. y is its own pointer argument even when
    it is x, so X X^T, b A + c A A and Z Q + a Q compile to the same code for one dtype and HAS_C."""
    return dict(x_ptr=dtype, y_ptr=dtype, c_ptr=dtype, out_ptr=out_dtype or dtype, M=m, K=k, BATCH=BATCH,
                stride_xb=m * k, stride_xm=k, stride_yb=m * k, stride_ym=k, stride_cb=m * m, stride_cm=m,
                stride_ob=m * m, stride_om=m, alpha=1.0, beta=0.5)


def update_args(m: int, n: int, dtype: torch.dtype, out_dtype: torch.dtype | None = None) -> dict:
    """out = alpha x + b x for b [BATCH, m, m], x [BATCH, m, n]."""
    return dict(b_ptr=dtype, x_ptr=dtype, out_ptr=out_dtype or dtype, M=m, N=n, K=m, BATCH=BATCH,
                stride_bb=m * m, stride_bm=m, stride_xb=m * n, stride_xm=n, stride_ob=m * n, stride_om=n,
                alpha=1.0)


# The products of one Newton-Schulz step as the optimizer launches them on the dense_1b MLP bucket.
MATMULS = {
    # standard form, bf16: B = b A + c A A (C = A; X X^T is the same kernel with fewer live values), X' = a X + B X
    "polynomial-bf16": (symmetric._symmetric_matmul_kernel, symmetric_args(M, M, BF16), {"HAS_C": True}),
    "update-bf16": (update._update_kernel, update_args(M, N, BF16), {"ADD_X": True}),
    # Gram form, fp16: Z Q + a Q (two operands), and the last Q X written in bf16
    "commuting-fp16": (symmetric._symmetric_matmul_kernel, symmetric_args(M, M, FP16), {"HAS_C": True}),
    "update-fp16-to-bf16": (update._update_kernel, update_args(M, N, FP16, out_dtype=BF16), {"ADD_X": False}),
}


def _kept_configs(args: dict, dtype: torch.dtype) -> list:
    named = {**args, "x_ptr": torch.empty(0, dtype=dtype)}
    return prune_configs(matmul_configs(), named, INPUT_PRECISION="tf32")


def _cases():
    for name, (kernel, args, constexprs) in MATMULS.items():
        dtype = args["x_ptr"]
        for config in _kept_configs(args, dtype):
            yield pytest.param(kernel, args, constexprs, config, id=f"{name}-{tile_label(config)}")


def _compile_matmul(kernel, args, constexprs, config, precision="tf32"):
    return machine_code.compile_for_hopper(
        kernel, args, {**constexprs, "INPUT_PRECISION": precision, "INTERPRETED": False, **config.kwargs},
        num_warps=config.num_warps, num_stages=config.num_stages)


def test_every_block_shape_keeps_some_tiles():
    """The cases below are not vacuous: the pruner keeps most tiles for the dense_1b blocks."""
    for name, (_, args, _) in MATMULS.items():
        assert len(_kept_configs(args, args["x_ptr"])) >= 8, name


@pytest.mark.parametrize("kernel, args, constexprs, config", list(_cases()))
def test_matmul_tile_fits_hopper_without_spills(kernel, args, constexprs, config):
    code = _compile_matmul(kernel, args, constexprs, config)
    if TRITON_VERSION >= SPILL_FREE_FROM:
        assert code.stack_bytes == 0 and code.local_bytes == 0, (
            f"{code.registers} registers and {code.stack_bytes} bytes of stack per thread: the tile spills")
        assert code.count("LDL") == 0 and code.count("STL") == 0, "local-memory loads/stores in the machine code"
    assert code.shared_bytes <= machine_code.HOPPER_SHARED_MEMORY, code.shared_bytes
    assert _narrow_accesses(code) == 0, {**code.opcodes("LDG"), **code.opcodes("STG")}
    if config.num_warps % 4 == 0:
        assert code.count("HGMMA") > 0, f"no warpgroup MMA: {code.opcodes('HMMA')}"
    else:   # fewer than 4 warps: no warpgroup, the per-warp tensor-core MMA
        assert code.count("HMMA") > 0 and code.count("HGMMA") == 0


SMALL_TILE = [c for c in matmul_configs() if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"],
                                              c.num_warps) == (64, 64, 32, 4)][0]


@pytest.mark.parametrize("dtype, precision, expect", [
    (BF16, "tf32", {"BF16"}), (FP16, "tf32", set()), (FP32, "tf32", {"TF32"}), (FP32, "ieee", None)])
@pytest.mark.parametrize("m, k", [(512, 2048), (17, 45)], ids=["even", "ragged"])
def test_each_dtype_and_edge_path_compiles(dtype, precision, expect, m, k):
    """The bf16, fp16, TF32 and true-fp32 paths, evenly tiled and with masked edges (odd sizes), all compile;
    the 16-bit and TF32 products run on HGMMA with that input type, true fp32 on FMAs (torch's 'highest').

    Odd sizes may spill: rows of 17 elements are not 16-byte aligned, so the symmetric kernel's epilogue
    reads C and writes both triangles element by element, each with its own address (255 registers and 32
    bytes of stack at 17 x 45 in bf16). Real blocks are multiples of 64; only the even case is held to no
    spills."""
    codes = [
        _compile_matmul(symmetric._symmetric_matmul_kernel, symmetric_args(m, k, dtype), {"HAS_C": True},
                        SMALL_TILE, precision),
        _compile_matmul(update._update_kernel, update_args(m, k, dtype), {"ADD_X": True}, SMALL_TILE, precision),
    ]
    for code in codes:
        if m % 64 == 0:
            assert code.stack_bytes == 0
        if expect is None:
            assert code.count("HGMMA") == 0 and code.count("HMMA") == 0 and code.count("FFMA") > 0
        else:
            assert code.count("HGMMA") > 0
            # the input type is the opcode's last modifier, none for fp16: HGMMA.64x64x16.F32[.BF16|.TF32]
            inputs = {tuple(set(op.split(".")[3:])) for op in code.opcodes("HGMMA")}
            assert inputs == {tuple(expect)}, code.opcodes("HGMMA")


def test_gram_form_q_x_reads_no_tile_of_x_in_its_epilogue():
    """Q X (a = 0) is compiled without the epilogue's read of X; a X + B X keeps it. The operands of the
    product itself arrive by asynchronous copies (LDGSTS), so any plain global load is the epilogue's."""
    config = [c for c in matmul_configs() if tile_label(c) == "128x128x64-s4-w8"][0]
    kernel, args, _ = MATMULS["update-fp16-to-bf16"]
    without = _compile_matmul(kernel, args, {"ADD_X": False}, config)
    with_x = _compile_matmul(kernel, args, {"ADD_X": True}, config)
    assert without.count("LDG") == 0 and with_x.count("LDG") > 0
    assert without.count("LDGSTS") > 0


# ------------------------------------------------------------------ elementwise passes: 16-byte vectors

NUMEL = M * N   # one dense_1b MLP weight
# Loop rounds of a pass (`fast_launch.bounded_programs`): a number Triton does not specialize on (1 would unroll the
# loop away), so the loop is compiled as it runs on the side stream.
ROUNDS = 3

ELEMENTWISE = {
    "momentum-nesterov": (elementwise._momentum_kernel,
                          dict(grad_ptr=FP32, buf_ptr=FP32, out_ptr=BF16, numel=NUMEL, rounds=ROUNDS, momentum=0.95),
                          dict(NESTEROV=True, BLOCK=elementwise._BLOCK, ROUNDS=1), 0),
    "momentum-heavy-ball": (elementwise._momentum_kernel,
                            dict(grad_ptr=FP32, buf_ptr=FP32, out_ptr=BF16, numel=NUMEL, rounds=ROUNDS, momentum=0.95),
                            dict(NESTEROV=False, BLOCK=elementwise._BLOCK, ROUNDS=1), 0),
    "scaled_add": (elementwise._scaled_add_kernel,
                   dict(w_ptr=FP32, o_ptr=BF16, numel=NUMEL, rounds=ROUNDS, decay=0.999, alpha=-0.02),
                   dict(BLOCK=elementwise._BLOCK, ROUNDS=1, SCALARS_IN_MEMORY=False), 0),
    # the captured step's form: decay and alpha read from memory, two scalar loads per program
    "scaled_add-scalars-in-memory": (elementwise._scaled_add_kernel,
                                     dict(w_ptr=FP32, o_ptr=BF16, numel=NUMEL, rounds=ROUNDS, decay=FP32, alpha=FP32),
                                     dict(BLOCK=elementwise._BLOCK, ROUNDS=1, SCALARS_IN_MEMORY=True), 2),
    # one scalar load per program: the matrix's divisor
    "divide-to-fp16": (normalize._divide_kernel,
                       dict(x_ptr=BF16, d_ptr=FP32, out_ptr=FP16, matrices=2, per_matrix=NUMEL, rounds=ROUNDS),
                       dict(BLOCK=normalize._BLOCK, ROUNDS=1), 1),
    # a tall fp32 block (column-major view) into its bf16 bucket
    "transposed-copy": (transpose._transposed_copy_kernel,
                        dict(src_ptr=FP32, dst_ptr=BF16, R=N, C=M, src_stride_b=NUMEL, src_stride_r=1,
                             src_stride_c=N, dst_stride_b=NUMEL, dst_stride_r=M, dst_stride_c=1),
                        dict(TILE=transpose._TILE), 0),
    # the momentum of a tall block (a gate half, row-major fp32) written transposed into its bf16 bucket slot
    "momentum-into-transposed-slot": (elementwise._momentum_strided_kernel,
                                      dict(grad_ptr=FP32, buf_ptr=FP32, out_ptr=BF16, B=2, R=N, C=M,
                                           grad_stride_b=NUMEL, grad_stride_r=M, grad_stride_c=1,
                                           buf_stride_b=NUMEL, buf_stride_r=M, buf_stride_c=1,
                                           out_stride_b=NUMEL, out_stride_r=1, out_stride_c=N, rounds=ROUNDS,
                                           momentum=0.95),
                                      dict(NESTEROV=True, TILE=elementwise._TILE, ROUNDS=1), 0),
    # its weight update, read back transposed from the result's slot; decay and alpha from memory
    "scaled_add-from-transposed-slot": (elementwise._scaled_add_strided_kernel,
                                        dict(w_ptr=FP32, o_ptr=BF16, B=2, R=N, C=M, w_stride_b=NUMEL, w_stride_r=M,
                                             w_stride_c=1, o_stride_b=NUMEL, o_stride_r=1, o_stride_c=N,
                                             rounds=ROUNDS, decay=FP32, alpha=FP32),
                                        dict(TILE=elementwise._TILE, ROUNDS=1, SCALARS_IN_MEMORY=True), 2),
}


def _narrow_accesses(code: machine_code.MachineCode) -> int:
    """Global loads and stores narrower than 16 bytes."""
    return sum(n for op, n in code.instructions.items()
               if op.split(".")[0] in ("LDG", "STG") and not op.endswith(".128"))


@pytest.mark.parametrize("name", list(ELEMENTWISE))
def test_elementwise_pass_moves_16_byte_vectors(name):
    kernel, args, constexprs, scalar_loads = ELEMENTWISE[name]
    code = machine_code.compile_for_hopper(kernel, args, {**constexprs, "INTERPRETED": False})
    assert code.stack_bytes == 0
    assert code.count("LDG.E.128") > 0 and code.count("STG.E.128") > 0
    assert _narrow_accesses(code) == scalar_loads, {**code.opcodes("LDG"), **code.opcodes("STG")}


def test_vector_check_sees_scalar_accesses():
    """Control: a tensor whose length is not a multiple of 16 cannot be proven aligned, so the same momentum
    pass compiles to 4- and 2-byte accesses, and the check above would say so."""
    kernel, args, constexprs, _ = ELEMENTWISE["momentum-nesterov"]
    code = machine_code.compile_for_hopper(kernel, {**args, "numel": NUMEL + 3},
                                           {**constexprs, "INTERPRETED": False})
    assert _narrow_accesses(code) > 0


def _persistent_cases():
    """The persistent kernels (kernels/persistent.py) on their `tile_for` tiles, each epilogue variant."""
    from muon_recipes.optim.kernels import persistent
    from muon_recipes.optim.kernels.ahead_of_time import DescriptorOf

    def symmetric_case(dtype, has_c):
        t = persistent.tile_for("symmetric", interpreted=False)
        bm, bn, bk = t["BLOCK_M"], t["BLOCK_N"], t["BLOCK_K"]
        args = dict(x_desc=DescriptorOf(dtype, (bm, bk)), y_desc=DescriptorOf(dtype, (bn, bk)),
                    c_desc=DescriptorOf(dtype, (bm, bn)), out_desc=DescriptorOf(dtype, (bm, bm)), table_ptr=torch.int32,
                    M=M, K=M, TILES=136, TOTAL=136 * BATCH, alpha=1.0, beta=0.5)
        constexprs = dict(HAS_C=has_c, INTERPRETED=False, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, NUM_PROGRAMS=132)
        return persistent._symmetric_persistent_kernel, args, constexprs, t

    def update_case(dtype, out_dtype, adds_x):
        t = persistent.tile_for("update", adds_x=adds_x, interpreted=False)
        bm, bn, bk = t["BLOCK_M"], t["BLOCK_N"], t["BLOCK_K"]
        args = dict(b_desc=DescriptorOf(dtype, (bm, bk)), x_desc=DescriptorOf(dtype, (bk, bn)),
                    own_desc=DescriptorOf(dtype, (bm, bn)), out_desc=DescriptorOf(out_dtype, (bm, bn)),
                    M=M, TILES_M=M // bm, TILES_N=-(-N // bn), TOTAL=BATCH * (M // bm) * -(-N // bn), alpha=1.0)
        constexprs = dict(ADD_X=adds_x, INTERPRETED=False, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                          GROUP_M=persistent.GROUP_M, NUM_PROGRAMS=132)
        return persistent._update_persistent_kernel, args, constexprs, t

    yield pytest.param(*symmetric_case(BF16, False), id="gram-bf16")
    yield pytest.param(*symmetric_case(BF16, True), id="polynomial-bf16")
    yield pytest.param(*symmetric_case(FP16, True), id="commuting-fp16")
    yield pytest.param(*update_case(BF16, BF16, True), id="update-bf16")
    yield pytest.param(*update_case(FP16, BF16, False), id="q-x-fp16-to-bf16")


@pytest.mark.parametrize("kernel,args,constexprs,tile", list(_persistent_cases()))
def test_persistent_tile_fits_hopper_without_spills(kernel, args, constexprs, tile):
    """The tile each persistent product runs with fits Hopper's shared memory (its TMA store buffers included:
    the update's 128 x 256 tile with the a X term needs 278 KB and failed to launch on the GPU), keeps its
    accumulators in registers, and multiplies with HGMMA on operands that TMA loads and stores."""
    if TRITON_VERSION < SPILL_FREE_FROM:
        pytest.skip(f"register allocation of Triton {triton.__version__} is not held to the spill check")
    code = machine_code.compile_for_hopper(kernel, args, constexprs, num_warps=tile["num_warps"],
                                           num_stages=tile["num_stages"])
    assert code.shared_bytes <= machine_code.HOPPER_SHARED_MEMORY, code
    assert code.stack_bytes == 0 and code.local_bytes == 0, code
    assert code.count("HGMMA") > 0
    # Global loads: only the symmetric kernel's tile table (one 4-byte LDG.E per tile); stores: none but TMA's.
    assert set(code.opcodes("LDG")) <= {"LDG.E"} and code.count("STG") == 0, code.opcodes("LDG")
