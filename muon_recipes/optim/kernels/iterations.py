"""The Newton-Schulz loops on the Triton kernels, with an optional CUDA graph per (shape, dtype, schedule).

One iteration (Keller Jordan's Muon; the polynomial X <- a X + b (X X^T) X + c (X X^T)^2 X) is three products:

    A  = X X^T              symmetric: upper-triangle tiles, mirrored        (symmetric.py)
    B  = b A + c A A        symmetric again, b A fused into the epilogue      (symmetric.py)
    X' = a X + B X          a X fused into the epilogue                       (update.py)

With `kernels="auto"` (the default) each of the three products runs on whichever of the Triton kernel, its
persistent TMA-fed form (`persistent.py`, where the tiles divide the rows) and the cuBLAS product with the same
fused epilogue (`bmm`, `baddbmm`) measured fastest for this shape, timed once per (device, shape, dtype,
precision) on the first call. Halving the FLOPs of the symmetric products wins
for large matrices; for small batched ones cuBLAS's batched kernels are sometimes faster per FLOP than the
halved work is cheap (see docs/benchmarks.md). `kernels="triton"` always uses the Triton kernels.

The Gram form (`gram_iterations_triton`; the algorithm and its sources are in `newton_schulz.py`) iterates on
m x m polynomials of R = X X^T instead of on X. Its products are X X^T (for R, at the start and after each
restart), b R + c R R (the same symmetric kernels), Z Q + a Q for commuting symmetric Z, Q (the symmetric
kernel with two operands, `commuting_product`, timed on its own: `Plan.commuting`), and Q X (the update kernel
with a = 0, run where the plan runs the update).

A bucket of many small matrices (fewer rows than `dispatch.PERSISTENT_MIN_SIDE`) may run in pieces: its batch cut
into 2 or 4 contiguous pieces, each piece's loop on its own CUDA stream, side by side (`Plan.pieces`,
`_in_pieces`). Each product of such a bucket is a few tiles per matrix with short reductions: it does not fill
the GPU to its end, and the next product, which needs its result, cannot start before it ends. Two independent
loops fill each other's gaps. On one H100 the small-expert bucket (128 x 256 x 1024, Gram form, captured) ran
0.449 ms in two pieces on two streams against 0.532 whole, 64 x 768 x 2048 2.49 against 2.74; the same pieces one
after another on one stream gained nothing (docs/benchmarks.md, "A bucket in pieces"). The plan times the counts
that `piece_counts` offers, after the products, as whole loops, and keeps the fastest; `MUON_NS_PIECES=N` runs
every bucket in N pieces instead. Every matrix takes the same products either way; only the tiles a piece's own
tile search picks (the batch is part of its key) or the kernel cuBLAS picks for a smaller batch can round
differently (with the same tiles the results are equal bit for bit: the interpreter tests).

The first call of a shape compiles the tile candidates of all its Triton products at once, in parallel, before
any of them is timed (`_precompile`, `tile_search.compile_candidates`): a shape's searches then only time.

Buffers are allocated once per call and X ping-pongs between two of them, so the caller's tensor is never
written. Small matrices are bound by launch latency (15 launches for 5 iterations, each a few microseconds
of GPU work): `cuda_graph=True` captures the whole loop once per (device, shape, dtype, coefficients, kernel
choice) and replays it, which leaves one graph launch, one copy in and one copy out per call.
"""

from __future__ import annotations

import functools
import os
import statistics
import warnings
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch

from muon_recipes.choices import (ITERATION_KERNELS, NS_PIECES, NS_PIECES_DEFAULT, NS_PIECES_ENV, PLAN_TIMING_DEFAULT,
                                  PLAN_TIMING_ENV, PLAN_TIMINGS, env_choice)
from muon_recipes.optim.dispatch import KERNEL_DTYPES, PERSISTENT_MIN_SIDE, PIECE_MIN_BATCH, interpreting
from muon_recipes.optim.kernels import persistent, plan_store, tile_search
from muon_recipes.optim.kernels.symmetric import launch_symmetric_matmul
from muon_recipes.optim.kernels.tuning import input_precision
from muon_recipes.optim.kernels.update import launch_update, launch_update_cublas


@dataclass(frozen=True)
class Plan:
    """Which implementation runs each product of an iteration: "triton" (the pointer kernels), "persistent"
    (`persistent.py`) or "cublas". `final` is the Gram form's last product, Q X written in the result's dtype:
    the Triton kernels round straight into it, cuBLAS writes X's dtype (float16) and a cast pass follows.
    `pieces`: into how many pieces the batch is cut, each run on its own CUDA stream (`_in_pieces`)."""
    gram: str = "triton"
    polynomial: str = "triton"
    update: str = "triton"
    final: str = "triton"
    commuting: str = "triton"   # the Gram form's Z Q + a Q products of two m x m matrices
    pieces: int = 1


ALL_TRITON = Plan()
PRODUCTS = ("gram", "polynomial", "update", "final", "commuting")
# The piece counts a plan may time (`piece_counts`).
PIECE_COUNTS = (1, 2, 4)

# (device, batch, m, n, dtype, precision, Gram form?, result dtype, MUON_NS_PIECES as `pieces_setting`) -> Plan,
# measured once per process.
_plans: dict[tuple, Plan] = {}
# (device, shape, dtype, coefficients, kernels, precision) -> captured loop
_graphs: dict[tuple, "_CapturedNewtonSchulz"] = {}
# (device, shape, dtype, precision, (coefficients, restarts, out dtype)): tile candidates compiled ahead of searches
_precompiled: set[tuple] = set()


def _gram_cublas(X, A):
    torch.bmm(X, X.mT, out=A)


def _polynomial_cublas(A, B, b, c):
    torch.baddbmm(A, A, A, beta=b, alpha=c, out=B)


def _commuting_cublas(Z, Q, a, out):
    torch.baddbmm(Q, Z, Q, beta=a, alpha=1.0, out=out)


def _commuting_triton(Z, Q, a, out):
    launch_symmetric_matmul(Z, out, alpha=1.0, beta=a, c=Q, y=Q)


def _gram_triton(X, A):
    launch_symmetric_matmul(X, A)


def _polynomial_triton(A, B, b, c):
    launch_symmetric_matmul(A, B, alpha=c, beta=b, c=A)


def _gram_persistent(X, A):
    persistent.launch_symmetric(X, A)


def _polynomial_persistent(A, B, b, c):
    persistent.launch_symmetric(A, B, alpha=c, beta=b, c=A)


def _commuting_persistent(Z, Q, a, out):
    persistent.launch_symmetric(Z, out, alpha=1.0, beta=a, c=Q, y=Q)


_GRAM = {"triton": _gram_triton, "cublas": _gram_cublas, "persistent": _gram_persistent}
_POLYNOMIAL = {"triton": _polynomial_triton, "cublas": _polynomial_cublas, "persistent": _polynomial_persistent}
_UPDATE = {"triton": launch_update, "cublas": launch_update_cublas, "persistent": persistent.launch_update}
_COMMUTING = {"triton": _commuting_triton, "cublas": _commuting_cublas, "persistent": _commuting_persistent}


def _final_cublas(X, Q, out):
    """Q X into `out`: cuBLAS writes X's dtype, so a result in another dtype takes a second pass (the cast)."""
    if out.dtype == X.dtype:
        launch_update_cublas(X, Q, 0.0, out)
    else:
        product = torch.empty_like(X)
        launch_update_cublas(X, Q, 0.0, product)
        out.copy_(product)


_FINAL = {"triton": lambda X, Q, out: launch_update(X, Q, 0.0, out), "cublas": _final_cublas,
          "persistent": lambda X, Q, out: persistent.launch_update(X, Q, 0.0, out)}


def _check_input(X: torch.Tensor) -> None:
    if not isinstance(X, torch.Tensor) or X.ndim != 3:
        shape = tuple(X.shape) if isinstance(X, torch.Tensor) else type(X).__name__
        raise ValueError(f"X: expected a batch of matrices [B, m, n], got {shape}")
    batch, m, n = X.shape
    if m > n:
        raise ValueError(f"X.shape={tuple(X.shape)}: needs m <= n (transpose tall matrices before the call)")
    if X.dtype not in KERNEL_DTYPES:
        raise ValueError(f"X.dtype={X.dtype}: must be one of {', '.join(map(str, KERNEL_DTYPES))}")
    if not X.is_contiguous():
        raise ValueError("X: must be contiguous (call .contiguous() first)")
    if batch > 65535:
        raise ValueError(f"X.shape[0]={batch}: at most 65535 matrices per call (the launch grid's batch axis)")
    if not X.is_cuda and not interpreting():
        raise ValueError(f"X.device={X.device}: the Triton kernels need a CUDA tensor "
                         "(or TRITON_INTERPRET=1 set before triton is imported)")


def _check_coefficients(coefficients: Sequence) -> tuple[tuple[float, float, float], ...]:
    try:
        coeffs = tuple((float(a), float(b), float(c)) for a, b, c in coefficients)
    except (TypeError, ValueError):
        raise ValueError(f"coefficients={coefficients!r}: must be a sequence of (a, b, c) number triples, "
                         "one per iteration") from None
    return coeffs


def plan_timing() -> str:
    """How plans time their products: `PLAN_TIMING_ENV` ("graph" or "launch", see `_prepared`)."""
    return env_choice(PLAN_TIMING_ENV, PLAN_TIMING_DEFAULT, PLAN_TIMINGS)


def _prepared(fn: Callable[[], None], per_replay: int = 4) -> tuple[Callable[[], None], int]:
    """`fn` made ready to be timed: (what one timing runs, calls of `fn` it makes).

    `MUON_NS_PLAN_TIMING=graph` (the default) captures `per_replay` calls in a CUDA graph and times its replays:
    what the captured step runs, each kernel right after the previous one. `=launch` times each call launched from
    the host between two events. Timed from the host, a product of 20 us waits for its own launch (the
    Triton launcher's is longer than cuBLAS's): the plan put every product of 128 x 256 x 1024 on cuBLAS, whose
    Gram loop then ran 0.703 ms from a graph against 0.639 all-Triton (one H100, docs/benchmarks.md, "Clocks and
    power"). Where the calls cannot be captured, they are timed as launched."""
    fn()   # compiles and autotunes on the first call of a Triton kernel
    if plan_timing() == "graph":
        torch.cuda.synchronize()
        graph, side = torch.cuda.CUDAGraph(), torch.cuda.Stream()
        try:   # (not `torch.cuda.graph`, which collects garbage and empties the cache on entry: dozens of times a step)
            with torch.cuda.stream(side):
                graph.capture_begin(capture_error_mode="thread_local")
                try:
                    for _ in range(per_replay):
                        fn()
                finally:
                    graph.capture_end()
            graph.replay()
            return graph.replay, per_replay
        except Exception:   # noqa: BLE001 - not capturable here: time the calls as launched
            torch.cuda.synchronize()
    return fn, 1


def _gpu_sampler(run: Callable[[], None], calls: int) -> Callable[[], Callable[[], float]]:
    """A sampler for `interleaved_medians`: records one timing of `run` between two CUDA events, read as ms per call
    once the GPU has got there."""
    def sample() -> Callable[[], float]:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()

        def read() -> float:
            end.synchronize()
            return start.elapsed_time(end) / calls
        return read
    return sample


def interleaved_medians(samplers: dict[str, Callable[[], Callable[[], float]]], rounds: int = 6) -> dict[str, float]:
    """The median of `rounds` timings of each candidate, taken in turns: each round times every candidate once, in
    the order of `samplers` and, every other round, in the reverse order. A sampler starts one timing and returns
    the function that reads it, called once every timing has been started (no wait for the GPU between two).

    Timed one after another, the candidates would see different clocks: the GPU's clock falls as a power-capped
    run goes on (1,980 to about 1,510 MHz within a second on an H100, docs/benchmarks.md, "Clocks and power"),
    which favours whichever is timed first by more than two close implementations differ. In turns, a drift in
    time costs each candidate the same."""
    readers: dict[str, list[Callable[[], float]]] = {name: [] for name in samplers}
    order = list(samplers)
    for round_ in range(rounds):
        for name in (order if round_ % 2 == 0 else order[::-1]):
            readers[name].append(samplers[name]())
    return {name: statistics.median(read() for read in reads) for name, reads in readers.items()}


def _measure_plan(X: torch.Tensor, coefficient: tuple[float, float, float], gram: bool = False,
                  out_dtype: torch.dtype | None = None, loop_on=None,
                  pieces: int | None = None) -> tuple[Plan, dict[str, dict[str, float]]]:
    """Time each product with the Triton kernel, with cuBLAS and, where `persistent_offered`, with the persistent
    kernel on this shape (`_prepared`, `interleaved_medians`); keep the fastest of each. Returns the plan and
    {product: {implementation: ms}}. The Gram form's products of X are Q X, without the a X term (a = 0): that is
    the update it times; its Z Q + a Q products of two m x m matrices are timed on their own (`Plan.commuting`),
    since unlike the polynomial they run on two operands. Its last Q X (`Plan.final`) is timed as it runs: into
    `out_dtype`, and for cuBLAS with the cast pass after it. (On dense_1b's 48 x 2048 x 5632 bucket cuBLAS won the
    product by 5% and then spent half a product's time in the cast: docs/benchmarks.md, "Momentum straight into
    the buckets".) Then the count of pieces: `pieces` where one is given (`pieces_setting`); else, with `loop_on`
    (plan -> loop) and more than one count in `piece_counts`, the whole loop on the chosen products is timed in each
    count of pieces (`pieces` in the times)."""
    a, b, c = coefficient
    if gram:
        a = 0.0
    out_dtype = out_dtype or X.dtype
    A = torch.empty((X.shape[0], X.shape[1], X.shape[1]), dtype=X.dtype, device=X.device)
    B, C, out = torch.empty_like(A), torch.empty_like(A), torch.empty_like(X)
    _gram_triton(X, A)   # a realistic A (symmetric, the spectrum of X X^T) for the next products
    products = [("gram", _GRAM, lambda f: f(X, A), persistent_offered("symmetric", X)),
                ("polynomial", _POLYNOMIAL, lambda f: f(A, B, b, c), persistent_offered("symmetric", A)),
                ("update", _UPDATE, lambda f: f(X, B, a, out), persistent_offered("update", X))]
    if gram:
        final_out = torch.empty(X.shape, dtype=out_dtype, device=X.device)
        products += [("final", _FINAL, lambda f: f(X, B, final_out), persistent_offered("update", X)),
                     ("commuting", _COMMUTING, lambda f: f(B, A, coefficient[0], C),
                      persistent_offered("symmetric", A))]
    choices, times = {}, {}
    for product, table, run, offered in products:
        samplers = {}
        for name, fn in table.items():
            if name == "persistent" and not offered:
                continue
            try:
                samplers[name] = _gpu_sampler(*_prepared(functools.partial(run, fn)))
            except Exception as error:   # noqa: BLE001 - e.g. a Triton that cannot build it: the others remain
                if name != "persistent":
                    raise
                _persistent_failed(product, X, error)
        times[product] = interleaved_medians(samplers)
        choices[product] = min(times[product], key=times[product].get)
    choices.setdefault("final", choices["update"])
    choices.setdefault("commuting", choices["polynomial"])   # (the standard form has none)
    plan = Plan(**choices)
    counts = piece_counts(X)
    if pieces is not None:
        plan = replace(plan, pieces=pieces)
    elif loop_on is not None and len(counts) > 1:
        del A, B, C, out   # (the loops allocate their own)
        times["pieces"] = interleaved_medians({
            str(count): _gpu_sampler(*_prepared(functools.partial(loop_on(replace(plan, pieces=count)), X)))
            for count in counts})
        plan = replace(plan, pieces=int(min(times["pieces"], key=times["pieces"].get)))
    return plan, times


def piece_counts(X: torch.Tensor) -> tuple[int, ...]:
    """The counts of pieces a plan times on X (`PIECE_COUNTS`): more than one only for matrices of fewer rows than
    `PERSISTENT_MIN_SIDE`, whose products leave the GPU part idle (the persistent kernel, offered from there, runs
    one program per SM and expects the GPU to itself), in pieces of at least `PIECE_MIN_BATCH` matrices."""
    if X.shape[1] >= PERSISTENT_MIN_SIDE:
        return (1,)
    return tuple(count for count in PIECE_COUNTS if X.shape[0] >= count * PIECE_MIN_BATCH or count == 1)


def pieces_setting() -> int | None:
    """`NS_PIECES_ENV` as a number of pieces for every bucket, or None for the plan's own ("auto")."""
    value = env_choice(NS_PIECES_ENV, NS_PIECES_DEFAULT, NS_PIECES)
    return None if value == "auto" else int(value)


# Per device, the CUDA streams that pieces run on (`_in_pieces`), created once and reused by every call.
_piece_streams: dict[int, list] = {}


def _streams_for(device: torch.device, count: int) -> list:
    streams = _piece_streams.setdefault(device.index, [])
    while len(streams) < count:
        streams.append(torch.cuda.Stream(device=device))
    return streams[:count]


def _in_pieces(loop: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor], pieces: int,
               out_dtype: torch.dtype | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """X -> the loop on X's batch cut into `pieces` contiguous pieces, each written into its rows of one result.

    On a GPU each piece runs on its own stream, which first waits for the caller's stream (X is ready), and the
    caller's stream waits for all of them before anything reads the result. The result is allocated on the caller's
    stream, so it is freed and reused in that stream's order; a piece's buffers live and die on its own stream. Inside
    a CUDA graph capture the same waits become the graph's edges: the pieces are branches of the graph. Off a GPU
    the pieces run one after another (the same slicing, for the CPU tests)."""
    def run(X: torch.Tensor) -> torch.Tensor:
        if pieces == 1 or X.shape[0] < 2:
            return loop(X, None)
        out = torch.empty(X.shape, dtype=out_dtype or X.dtype, device=X.device)
        size = -(-X.shape[0] // pieces)
        starts = range(0, X.shape[0], size)
        if not X.is_cuda:
            for start in starts:
                loop(X[start:start + size], out[start:start + size])
            return out
        caller = torch.cuda.current_stream(X.device)
        streams = _streams_for(X.device, len(starts))
        for stream, start in zip(streams, starts):
            stream.wait_stream(caller)
            with torch.cuda.stream(stream):
                loop(X[start:start + size], out[start:start + size])
        for stream in streams:
            caller.wait_stream(stream)
        return out
    return run


def _persistent_failed(product: str, X: torch.Tensor, error: Exception) -> None:
    """Say once per process that the persistent kernel could not run, and leave it out of every later plan."""
    global _persistent_error
    _persistent_error = f"{type(error).__name__}: {error}"
    warnings.warn(f"Newton-Schulz: the persistent kernel failed on the {product} product of {tuple(X.shape)} "
                  f"({type(error).__name__}: {str(error).splitlines()[0][:200]}); using the other kernels",
                  RuntimeWarning, stacklevel=2)


def persistent_offered(product: str, x: torch.Tensor) -> bool:
    """Whether the plan times the persistent kernel for `product` on x: where it can run (`persistent.usable`),
    on matrices of at least `dispatch.PERSISTENT_MIN_SIDE` rows, unless it failed earlier in this process."""
    return (_persistent_error is None and x.shape[1] >= PERSISTENT_MIN_SIDE
            and persistent.usable(product, x))


# Why the persistent kernel is no longer offered in this process (`_persistent_failed`); None while it is.
_persistent_error: str | None = None


def _plan_for(X: torch.Tensor, coeffs, kernels: str, gram: bool = False,
              out_dtype: torch.dtype | None = None, loop_on=None) -> Plan:
    """The plan of X's shape: held by this process, else kept on disk by an earlier one (`plan_store`), else timed
    here on the first coefficients (`_measure_plan`, the pieces on `loop_on`'s loops) and kept. The setting of
    `MUON_NS_PIECES` is part of its key: a count forced once is not what a later process on "auto" reads.
    With every product on the Triton kernels (or off a GPU) there is nothing to time: `ALL_TRITON`, in the forced
    count of pieces."""
    pieces = pieces_setting()
    if kernels == "triton" or not X.is_cuda:
        return ALL_TRITON if pieces is None else replace(ALL_TRITON, pieces=pieces)
    key = (X.device.index, *X.shape, X.dtype, input_precision(X.dtype), gram, out_dtype, pieces)
    plan = _plans.get(key)
    if plan is None:
        if torch.cuda.is_current_stream_capturing():
            return ALL_TRITON   # cannot time inside a capture; the graph runner plans before capturing
        stored_key = plan_store.key_for(X, key[1:], plan_timing())
        stored = plan_store.load(stored_key, PRODUCTS)
        if stored is not None and (_persistent_error is None or "persistent" not in stored.values()):
            plan = Plan(**stored)
        else:
            plan, times = _measure_plan(X, coeffs[0], gram, out_dtype, loop_on, pieces)
            plan_store.store(stored_key, vars(plan), times)
        _plans[key] = plan
    return plan


def plans_held() -> list[dict]:
    """This process's plans, for reports: each shape, dtype, form ("standard" or "gram") and the implementation of
    each product."""
    return [{"shape": list(key[1:4]), "dtype": str(key[4]).removeprefix("torch."),
             "form": "gram" if key[6] else "standard", **vars(plan)} for key, plan in _plans.items()]


def _precompile(X: torch.Tensor, loop_on: Callable[[Plan], Callable[[torch.Tensor], torch.Tensor]],
                form: tuple) -> None:
    """Before the first call of a shape: compile the tile candidates of every Triton product of its loop at
    once (`tile_search.compile_candidates`), instead of one after another inside each product's search.

    A dry pass of the loop with every product on Triton records the launches without running them (the torch
    operations between them run on uninitialized buffers; their results are dropped). The plan's timing of
    Triton against cuBLAS and the searches that follow find the binaries compiled."""
    key = (X.device.index, tuple(X.shape), X.dtype, input_precision(X.dtype), form)
    if key in _precompiled or not X.is_cuda or torch.cuda.is_current_stream_capturing():
        return
    _precompiled.add(key)
    if not tile_search.precompile_enabled():
        return
    try:
        launches = _recorded(X, loop_on)
    except Exception:   # noqa: BLE001 - an optimization only: the real loop runs next and reports any error itself
        return
    tile_search.compile_candidates(launches)


def _recorded(X: torch.Tensor, loop_on) -> list[tuple]:
    """The dry pass's launches, each tensor argument replaced by its dtype (what Triton's `warmup` takes for a
    16-byte aligned tensor), so the pass's buffers are freed at once however many launches are kept."""
    with tile_search.recorded_launches() as launches:
        loop_on(ALL_TRITON)(X)
    return [(kernel, grid, tuple(a.dtype if isinstance(a, torch.Tensor) and a.data_ptr() % 16 == 0 else a
                                 for a in args), constexprs)
            for kernel, grid, args, constexprs in launches.values()]


def triton_launches(X: torch.Tensor, coefficients: Sequence, restarts: Sequence[int] | None = None,
                    out_dtype: torch.dtype | None = None) -> list[tuple]:
    """The Triton launches (kernel, grid, args, constexprs; tensors as their dtypes) one call of the iterations on X
    would make with every product on the Triton kernels, one per kernel specialization, without running any: the
    standard form, or the Gram form when `restarts` is given. X may be a CPU tensor (nothing runs on it), so a CPU
    machine can list and compile a GPU workload's kernels (recipes/bench_tile_search.py)."""
    restarts = None if restarts is None else tuple(restarts)
    loop_on = _loop_on(_check_coefficients(coefficients), restarts, out_dtype or X.dtype)
    return _recorded(X, loop_on)


def _iterate(X: torch.Tensor, coeffs: tuple[tuple[float, float, float], ...], plan: Plan,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """The standard form on the plan's products (not its pieces: see `_in_pieces`); the last product writes into
    `out` when one is given."""
    batch, m, n = X.shape
    A = torch.empty((batch, m, m), dtype=X.dtype, device=X.device)
    B = torch.empty_like(A)
    gram, polynomial, update = _GRAM[plan.gram], _POLYNOMIAL[plan.polynomial], _UPDATE[plan.update]
    buffers = (torch.empty_like(X), torch.empty_like(X) if len(coeffs) > 1 else None)
    current = X
    for step, (a, b, c) in enumerate(coeffs):
        gram(current, A)
        polynomial(A, B, b, c)
        target = out if out is not None and step == len(coeffs) - 1 else buffers[step % 2]
        update(current, B, a, target)
        current = target
    return current


def _iterate_gram(X: torch.Tensor, coeffs: tuple[tuple[float, float, float], ...], plan: Plan,
                  restarts: tuple[int, ...], out_dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """The Gram form on the plan's kernels: the same recurrences as `newton_schulz.gram_iterations_torch`.

    The a Q terms stay in the products' fp32 epilogues. Folding them into P = Z + a I first would make every
    m x m product plain (no copy of Q before cuBLAS's, no tile of Q read in the Triton kernels'), but it
    rounds P's diagonal, as large as a (8.2 in polar_express's first step), to float16: tried, the Gram form's
    error in float16 went from 0.013 to 0.024 and from 0.057 to 0.140 on test_gram_newton_schulz.py's matrices.

    The last product, Q X, is written in `out_dtype` by the Triton kernels (one rounding, no cast pass), into `out`
    when one is given."""
    batch, m, n = X.shape
    gram, polynomial, update = _GRAM[plan.gram], _POLYNOMIAL[plan.polynomial], _UPDATE[plan.update]
    commuting = _COMMUTING[plan.commuting]
    R, Z, RZ, Q, Q_next = (torch.empty((batch, m, m), dtype=X.dtype, device=X.device) for _ in range(5))
    restarted = [torch.empty_like(X), torch.empty_like(X) if len(restarts) > 1 else None]
    current = X
    gram(current, R)
    identity = True   # Q = I until the first iteration (and again after each restart)
    last = len(coeffs) - 1
    for step, (a, b, c) in enumerate(coeffs):
        if step in restarts:
            target = restarted[restarts.index(step) % 2]
            update(current, Q, 0.0, target)        # X <- Q X
            current = target
            gram(current, R)
            identity = True
        polynomial(R, Z, b, c)                     # Z = b R + c R R
        if identity:
            Q.copy_(Z)                             # Q = Z I + a I
            Q.diagonal(dim1=-2, dim2=-1).add_(a)
            identity = False
        else:
            commuting(Z, Q, a, Q_next)             # Q = Z Q + a Q
            Q, Q_next = Q_next, Q
        if step < last and step + 1 not in restarts:
            commuting(Z, R, a, RZ)                 # RZ = Z R + a R
            commuting(Z, RZ, a, R)                 # R = Z RZ + a RZ
    if out is None:
        out = torch.empty(X.shape, dtype=out_dtype, device=X.device)
    _FINAL[plan.final](current, Q, out)            # X_final = Q X
    return out


class _CapturedNewtonSchulz:
    """The whole loop for one (shape, dtype, coefficients, plan, form), captured in a CUDA graph and replayed."""

    def __init__(self, X: torch.Tensor, loop: Callable[[torch.Tensor], torch.Tensor]):
        self.input = X.clone()
        # Compile and autotune outside the capture (neither can be captured).
        side = torch.cuda.Stream(device=X.device)
        side.wait_stream(torch.cuda.current_stream(X.device))
        with torch.cuda.stream(side):
            loop(self.input)
        torch.cuda.current_stream(X.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.output = loop(self.input)

    def __call__(self, X: torch.Tensor) -> torch.Tensor:
        self.input.copy_(X)
        self.graph.replay()
        return self.output.clone()   # the next replay overwrites self.output


def clear_cuda_graphs() -> None:
    """Drop every captured graph (and the memory its buffers hold)."""
    _graphs.clear()


def ns_iterations_triton(X: torch.Tensor, coefficients: Sequence, *, cuda_graph: bool | None = None,
                         kernels: str = "auto") -> torch.Tensor:
    """Newton-Schulz iterations on a normalized batch X [B, m, n] (m <= n, contiguous, bf16, fp16 or fp32).

    Per (a, b, c) of `coefficients`: A = X X^T; B = b A + c A A; X = a X + B X, the same arithmetic as the
    torch loop, with fp32 accumulation and one rounding per product. Returns a new tensor; X is not written.

    kernels: "auto" runs each product on the Triton kernel or on cuBLAS, whichever measured faster for this
        shape (timed once per shape); "triton" always on the Triton kernels.
    cuda_graph: capture the loop per (shape, dtype, coefficients) and replay it (pays off for small,
        launch-bound matrices; keeps the graph's buffers for the life of the process, see
        `clear_cuda_graphs`). None reads the environment variable MUON_NS_CUDA_GRAPH ("1" enables it).
    """
    return _run(X, coefficients, None, cuda_graph, kernels)


def gram_iterations_triton(X: torch.Tensor, coefficients: Sequence, restarts: Sequence[int], *,
                           cuda_graph: bool | None = None, kernels: str = "auto",
                           out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The Gram form of the same iterations (`newton_schulz.gram_iterations_torch` is the reference): equal to
    `ns_iterations_triton` in exact arithmetic, with the m x m work on the symmetric kernels. `restarts` are
    the iteration indices (1 <= t < len(coefficients)) before which X is re-formed as Q X; `out_dtype` (X's
    by default) is the dtype of the result, rounded once from the last product. The arguments and the result
    are otherwise those of `ns_iterations_triton`. Meant for half precision: float16 (see `newton_schulz`).
    """
    restarts = tuple(sorted({int(t) for t in restarts}))
    if any(t < 1 or t >= len(coefficients) for t in restarts):
        raise ValueError(f"restarts={restarts}: each must be an iteration index in [1, {len(coefficients) - 1}]")
    return _run(X, coefficients, restarts, cuda_graph, kernels, out_dtype or X.dtype)


def _loop_on(coeffs, restarts, out_dtype) -> Callable[[Plan], Callable[[torch.Tensor], torch.Tensor]]:
    """plan -> the loop of one call on that plan's products and pieces: the standard form, or the Gram form with
    `restarts`."""
    if restarts is None:
        return lambda plan: _in_pieces(lambda inp, out: _iterate(inp, coeffs, plan, out), plan.pieces, out_dtype)
    return lambda plan: _in_pieces(lambda inp, out: _iterate_gram(inp, coeffs, plan, restarts, out_dtype, out),
                                   plan.pieces, out_dtype)


def _run(X, coefficients, restarts, cuda_graph, kernels, out_dtype=None) -> torch.Tensor:
    coeffs = _check_coefficients(coefficients)
    _check_input(X)
    if kernels not in ITERATION_KERNELS:
        raise ValueError(f"kernels={kernels!r}: must be one of {', '.join(ITERATION_KERNELS)}")
    if out_dtype is not None and out_dtype not in KERNEL_DTYPES:
        raise ValueError(f"out_dtype={out_dtype}: must be one of {', '.join(map(str, KERNEL_DTYPES))}")
    if not coeffs:
        return X.to(out_dtype or X.dtype, copy=True)
    loop_on = _loop_on(coeffs, restarts, out_dtype)
    _precompile(X, loop_on, (coeffs, restarts, out_dtype))
    plan = _plan_for(X, coeffs, kernels, gram=restarts is not None, out_dtype=out_dtype, loop_on=loop_on)
    loop = loop_on(plan)
    if cuda_graph is None:
        cuda_graph = os.environ.get("MUON_NS_CUDA_GRAPH", "0") == "1"
    if cuda_graph and X.is_cuda and not torch.cuda.is_current_stream_capturing():
        key = (X.device.index, tuple(X.shape), X.dtype, coeffs, plan, restarts, out_dtype,
               input_precision(X.dtype))
        runner = _graphs.get(key)
        if runner is None:
            runner = _graphs[key] = _CapturedNewtonSchulz(X, loop)
        return runner(X)
    return loop(X)
