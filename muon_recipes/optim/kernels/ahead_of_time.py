"""A kernel's source specialized the way Triton's launcher specializes a launch, to compile it ahead of time.

Triton compiles for any target it is given (`ptxas` ships inside the triton wheel), so a machine without the GPU
can build a kernel's binary: tests/optim/machine_code.py reads the machine code of the Hopper (sm_90) build, and
recipes/bench_tile_search.py times the compilation of the tile candidates. Both must build what a launch on the
GPU would build, so the specialization rules live here once: a tensor is described by its dtype (its address is
16-byte aligned, as every torch allocation is), an integer by its value (1 becomes a constant and a multiple of 16
is marked divisible, unless the kernel says `do_not_specialize` for it), a float is fp32, and the kernel's
`triton.heuristics` are evaluated on those values and the constexprs, as at launch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
from triton.runtime.jit import JITFunction

from muon_recipes.optim.kernels.fast_launch import unwrap

POINTER_TYPES = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.int32: "*i32"}


@dataclass(frozen=True)
class DescriptorOf:
    """A `TensorDescriptor` argument as the launcher specializes it: its element type and block shape."""
    dtype: torch.dtype
    block: tuple[int, ...]

    def signature(self) -> str:
        return f"tensordesc<{POINTER_TYPES[self.dtype][1:]}[{', '.join(map(str, self.block))}]>"


def _integer_type(value: int) -> str:
    return "i32" if -2**31 <= value < 2**31 else "i64"


def specialized_source(kernel, args: dict, constexprs: dict):
    """`triton.compiler.ASTSource` of `kernel` (possibly under `triton.autotune` / `triton.heuristics`) for the
    runtime `args` (name -> torch.dtype for a tensor, `DescriptorOf` for a tensor descriptor, int, float) and
    the `constexprs` (the caller's and the tile
    configuration's)."""
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
            signature[name] = _integer_type(value)   # neither 1 nor multiples of 16 special
        elif name in constexprs or name in rules or (type(value) is int and value == 1):
            signature[name] = "constexpr"   # the launcher also turns an integer argument equal to 1 into one
            constants[(index,)] = value
        elif isinstance(value, DescriptorOf):
            signature[name] = value.signature()
        elif isinstance(value, torch.dtype):
            signature[name] = POINTER_TYPES[value]
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name}={value!r}: describe a tensor by its torch.dtype, a scalar by an int or float")
        elif isinstance(value, int):
            signature[name] = _integer_type(value)
            if value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "fp32"
    return triton.compiler.ASTSource(fn, signature, constexprs=constants, attrs=attrs)
