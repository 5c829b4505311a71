"""Every closed set of names the optimizer accepts, in one place, free of torch.

`config.py` validates a run's config against these before torch is imported (the sweep launcher checks
configs without it), and the optimizer, its blocks and its kernels check their arguments against the same
tuples, so a value the config accepts can never fail later inside the optimizer, nor the reverse. The first
entry of each tuple is not special; defaults live with the code that uses them.
"""

import os

# Which update a param group gets (`Muon` param groups, `optim.algorithm`).
ALGORITHMS = ("muon", "adamw")
# Newton-Schulz coefficient schedules (newton_schulz.py): Keller Jordan's quintic, or Polar Express.
SCHEDULES = ("keller", "polar_express")
# Two forms of the same Newton-Schulz iteration (newton_schulz.py): the Gram form on m x m matrices, or the
# classic loop on X.
METHODS = ("gram", "standard")
# Where Newton-Schulz runs: the Triton kernels where they measured faster (auto), or always one of the two.
BACKENDS = ("auto", "torch", "triton")
# Newton-Schulz dtypes a config may name (`Muon` also takes the torch.dtype itself).
NS_DTYPES = ("bfloat16", "float32")
# Per-block lr ratio (blocks.adjust_lr_ratio): Muon's sqrt(max(1, rows/cols)), Moonlight's RMS match, or none.
ADJUST_LR = ("spectral_norm", "rms_norm", "none")
# A 3-D expert weight [E, out, in]: E matrices, or their [E*out, in] concatenation.
EXPERT_MODES = ("per_expert", "fused")
# A fused QKV or gate/up weight: orthogonalized per logical block, or as one matrix.
SPLIT_MODES = ("split", "fused")
# What a model says a parameter is (blocks.ParamLayout.role); `matrix` is what Muon is for.
ROLES = ("embedding", "output", "norm", "bias", "router", "matrix")
# What may be stacked along the rows of one weight (blocks.ParamLayout.fuse_kind).
FUSE_KINDS = ("qkv", "gate_up")
# Whether sharded (HSDP) Muon spreads Newton-Schulz over the replicas too (sharded.py): "auto" when every rank
# of the mesh still gets a matrix, or always (True) / never (False).
REPLICA_SPREAD = ("auto", True, False)
# Whether the whole optimizer step runs as one captured CUDA graph (optim/cuda_graph.py): where it can, with one
# line saying why not where it cannot (auto), always (on: an error where it cannot), or never (off).
CUDA_GRAPH_MODES = ("auto", "on", "off")
# The lr schedule's shape (train/schedules.py).
LR_SCHEDULES = ("cosine", "wsd", "constant")
# The products of the Triton Newton-Schulz iteration (kernels/iterations.py): each on whichever of the Triton
# kernel and cuBLAS measured faster for its shape, or always on the Triton kernels.
ITERATION_KERNELS = ("auto", "triton")
# What the embedded corpus reads from the running Python installation (data/sources.py).
CORPUS_SCOPES = ("stdlib", "site-packages")
# How much of the Newton-Schulz kernels' tile candidates a new problem shape searches (kernels/tuning.py), read from
# the environment variable TILE_SEARCH_ENV: the cost model's best few, all of them, or its first choice untimed.
TILE_SEARCHES = ("bounded", "full", "heuristic")
TILE_SEARCH_ENV = "MUON_NS_AUTOTUNE"
TILE_SEARCH_DEFAULT = "bounded"   # as fast as "full" on moe_small's buckets at half its cold start (docs/benchmarks.md)
# How the Newton-Schulz plan times each product's implementations on a shape's first call (kernels/iterations.py),
# read from PLAN_TIMING_ENV: each call launched from the host between two events, or replayed from a CUDA graph as
# the captured step runs them. "graph" by default: on one H100 three processes timing their own plans chose the same
# plans under "graph" and two different ones under "launch", with equal or shorter steps (docs/benchmarks.md, "The
# plans timed in turns and kept on disk").
PLAN_TIMINGS = ("launch", "graph")
PLAN_TIMING_ENV = "MUON_NS_PLAN_TIMING"
PLAN_TIMING_DEFAULT = "graph"
# Whether the Newton-Schulz plans are kept on disk for the next process (kernels/plan_store.py), read from
# PLAN_CACHE_ENV: "1" every process of the machine runs the first one's plan, "0" each process times its own.
PLAN_CACHES = ("1", "0")
PLAN_CACHE_ENV = "MUON_NS_PLAN_CACHE"
PLAN_CACHE_DEFAULT = "1"
# Into how many pieces a Newton-Schulz bucket's batch is cut, each run on its own CUDA stream beside the others
# (kernels/iterations.py, `Plan.pieces`), read from NS_PIECES_ENV: "auto" the plan times the counts that
# `iterations.piece_counts` offers and keeps the fastest; a number runs every bucket in that many pieces (before-and-
# after timings, ablations). "auto" by default: on one H200 the small-expert bucket's captured loop ran 0.412 ms
# on the plan's pieces against 0.466 whole, and moe_small's and dense_1b's captured steps as fast as whole
# (docs/benchmarks.md, "A bucket in pieces").
NS_PIECES = ("auto", "1", "2", "4")
NS_PIECES_ENV = "MUON_NS_PIECES"
NS_PIECES_DEFAULT = "auto"
# Where a single-process Muon step runs its passes over memory on a second CUDA stream (optim/step_streams.py), read
# from STEP_STREAMS_ENV: the captured step on a GPU, none, or every single-process step.
STEP_STREAMS = ("auto", "0", "1")
STEP_STREAMS_ENV = "MUON_STEP_STREAMS"
# moe_small's captured step 3.68-3.93 ms against 3.98-4.03 on one stream, dense_1b's within its noise (one H200,
# docs/benchmarks.md, "The passes over memory beside the products"); the GPU test of two streams against one passed.
STEP_STREAMS_DEFAULT = "auto"
# The closed-choice settings above that the kernels and the optimizer read from the environment (`env_choice`), long
# after start-up, as (variable, default, choices): a run's config validation checks each before anything starts.
ENV_CHOICES = ((TILE_SEARCH_ENV, TILE_SEARCH_DEFAULT, TILE_SEARCHES),
               (PLAN_TIMING_ENV, PLAN_TIMING_DEFAULT, PLAN_TIMINGS),
               (PLAN_CACHE_ENV, PLAN_CACHE_DEFAULT, PLAN_CACHES),
               (NS_PIECES_ENV, NS_PIECES_DEFAULT, NS_PIECES),
               (STEP_STREAMS_ENV, STEP_STREAMS_DEFAULT, STEP_STREAMS))
# The CUDA priorities of the side stream and of the stream the step is captured on: 0 (the default streams' own, the
# lowest) or a negative integer (higher). Either one set makes the captured graph keep them (optim/cuda_graph.py).
SIDE_STREAM_PRIORITY_ENV = "MUON_SIDE_STREAM_PRIORITY"
MAIN_STREAM_PRIORITY_ENV = "MUON_MAIN_STREAM_PRIORITY"
STREAM_PRIORITY_ENVS = (SIDE_STREAM_PRIORITY_ENV, MAIN_STREAM_PRIORITY_ENV)
# At most this many programs per SM for each pass over memory on the side stream; 0: one program per block.
SIDE_PROGRAMS_ENV = "MUON_SIDE_PROGRAMS_PER_SM"


def is_stream_priority(value: str) -> bool:
    """Whether `value` (a STREAM_PRIORITY_ENVS value) is 0 or a negative integer."""
    value = value.strip()
    return value == "0" or (value.startswith("-") and value[1:].isdigit())


def env_choice(name: str, default: str, choices: tuple) -> str:
    """The environment variable `name` (`default` when unset), checked against `choices`: where the optimizer,
    used without a run's config validation, reads a closed-choice setting."""
    value = os.environ.get(name, default)
    if value not in choices:
        raise ValueError(f"{name}={value!r}: must be one of {', '.join(choices)}")
    return value
