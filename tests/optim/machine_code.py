"""Compiling a kernel for a GPU that is not here, and reading what the compiler made of it.

Triton compiles ahead of time for any target it is given: `ptxas` and `cuobjdump` ship inside the triton
wheel, so a CPU machine can build the Hopper (sm_90) binary of every kernel and tile configuration and read
its resource usage (registers, local memory, shared memory) and its instructions. That checks what the CPU
interpreter cannot: that the GPU-only branches (`INTERPRETED=False`) compile at all, that a tile
configuration neither spills its accumulators to local memory nor overflows shared memory, that a matmul runs
on Hopper's warpgroup tensor-core instruction (HGMMA in the machine code) rather than the older per-warp HMMA
or plain FMAs, and that an elementwise pass reads and writes with 16-byte vector accesses (LDG.E.128).

Arguments are described the way Triton's launcher specializes them (`muon_recipes/optim/kernels/ahead_of_time.py`:
a tensor by its dtype, an integer by its value, a float as fp32). Nothing is timed: speed still comes from the GPU
benchmarks (recipes/bench_newton_schulz.py).
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field

import triton
from muon_recipes.optim.kernels.ahead_of_time import specialized_source

# Dynamic shared memory one block may use on Hopper (H100/H200): 227 KB.
HOPPER_SHARED_MEMORY = 227 * 1024

# An instruction line of `cuobjdump -sass`: /*0150*/  @!P0 LDG.E.128 R4, desc[UR6][R2.64] ;
_SASS_INSTRUCTION = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Za-z0-9_]+)*)")
_RESOURCES = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


@dataclass
class MachineCode:
    """What one compiled kernel uses per thread and per block, and its instruction counts (static, in SASS)."""
    registers: int
    stack_bytes: int          # per-thread stack frame (spilled registers live here or in local memory)
    local_bytes: int
    shared_bytes: int         # dynamic shared memory per block (pipeline buffers, layout exchanges)
    instructions: collections.Counter = field(repr=False)

    def count(self, opcode: str) -> int:
        """How many instructions are `opcode` or `opcode` with modifiers (count("LDG") includes LDG.E.128)."""
        return sum(n for op, n in self.instructions.items() if op == opcode or op.startswith(opcode + "."))

    def opcodes(self, prefix: str) -> dict[str, int]:
        return {op: n for op, n in sorted(self.instructions.items()) if op == prefix or op.startswith(prefix + ".")}


def _tool(name: str) -> str | None:
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.path.exists(path) else shutil.which(name)


def toolchain_available() -> bool:
    """True when this Triton can build CUDA binaries and disassemble them (ptxas and cuobjdump found)."""
    return _tool("ptxas") is not None and _tool("cuobjdump") is not None


def compile_for_hopper(kernel, args: dict, constexprs: dict, *, num_warps: int = 4,
                       num_stages: int = 3) -> MachineCode:
    """Build `kernel` for sm_90 with the runtime `args` (name -> torch.dtype for a tensor, int, float) and the
    `constexprs` (the caller's and the tile configuration's); return its resource usage and instructions."""
    source = specialized_source(kernel, args, constexprs)
    target = triton.backends.compiler.GPUTarget("cuda", 90, 32)
    compiled = triton.compile(source, target=target, options={"num_warps": num_warps, "num_stages": num_stages})
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        sass = subprocess.run([_tool("cuobjdump"), "-sass", cubin], capture_output=True, text=True, check=True)
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", cubin], capture_output=True, text=True,
                               check=True)
    resources = _RESOURCES.search(usage.stdout)
    if resources is None:
        raise RuntimeError(f"cuobjdump -res-usage printed no resource line:\n{usage.stdout}")
    registers, stack, _static_shared, local = map(int, resources.groups())
    return MachineCode(registers=registers, stack_bytes=stack, local_bytes=local,
                       shared_bytes=int(compiled.metadata.shared),
                       instructions=collections.Counter(_SASS_INSTRUCTION.findall(sass.stdout)))
