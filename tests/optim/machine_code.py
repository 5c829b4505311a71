"""Compiling a kernel for a GPU that is not here, and reading what the compiler made of it.

Triton compiles ahead of time for any target it is given: `ptxas` and `cuobjdump` ship inside the triton
wheel, so a CPU machine can build the Hopper (sm_90) binary of every kernel and tile configuration and read
its resource usage (registers, local memory, shared memory) and its instructions. That checks what the CPU
interpreter cannot: that the GPU-only branches (`INTERPRETED=False`) compile at all, that a tile
configuration neither spills its accumulators to local memory nor overflows shared memory, that a matmul runs
on Hopper's warpgroup tensor-core instruction (HGMMA in the machine code) rather than the older per-warp HMMA
or plain FMAs, and that an elementwise pass reads and writes with 16-byte vector accesses (LDG.E.128).

Arguments are described the way Triton's launcher specializes them: a tensor by its dtype (its address is 16-byte
aligned, as every torch allocation is), an integer by its value (1 becomes a constant, a multiple of 16 is marked
divisible, unless the kernel says `do_not_specialize` for it), a float as fp32. The kernel's `triton.heuristics` are
evaluated on those values and the tile configuration, as at launch. Nothing is timed: speed still comes from the GPU
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

import torch
import triton
from triton.runtime.jit import JITFunction

from muon_recipes.optim.kernels.fast_launch import unwrap

# Dynamic shared memory one block may use on Hopper (H100/H200): 227 KB.
HOPPER_SHARED_MEMORY = 227 * 1024

_POINTER_TYPES = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}
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
    fn, rules = unwrap(kernel)
    if not isinstance(fn, JITFunction):
        raise RuntimeError(f"{fn!r} is not a JIT function (TRITON_INTERPRET=1 interprets kernels instead of "
                           "compiling them)")
    named = {**args, **constexprs}
    for name, rule in rules.items():
        named[name] = rule(named)
    signature, constants, attrs = {}, {}, {}
    for index, name in enumerate(fn.arg_names):
        value = named[name]
        if getattr(fn.params[index], "do_not_specialize", False) and type(value) is int:
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"   # neither 1 nor multiples of 16 special
        elif name in constexprs or name in rules or (type(value) is int and value == 1):
            signature[name] = "constexpr"   # the launcher also turns an integer argument equal to 1 into one
            constants[(index,)] = value
        elif isinstance(value, torch.dtype):
            signature[name] = _POINTER_TYPES[value]
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name}={value!r}: describe a tensor by its torch.dtype, a scalar by an int or float")
        elif isinstance(value, int):
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "fp32"
    source = triton.compiler.ASTSource(fn, signature, constexprs=constants, attrs=attrs)
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
