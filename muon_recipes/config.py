"""Typed configuration for every part of a run, and its validation.

The dataclasses here are the schema Hydra composes `conf/` into (registered with the ConfigStore by
`register_configs`). `validate` checks every value before any process group or GPU is touched and raises
`ConfigError` with one line naming the key, the value and what would be valid.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from muon_recipes.choices import (ADJUST_LR, ALGORITHMS, BACKENDS, CORPUS_SCOPES, CUDA_GRAPH_MODES, ENV_CHOICES,
                                  EXPERT_MODES, LR_SCHEDULES, METHODS, NS_DTYPES, ROLES, SCHEDULES,
                                  SIDE_PROGRAMS_ENV, SPLIT_MODES, STREAM_PRIORITY_ENVS, is_stream_priority)


class ConfigError(ValueError):
    """A configuration value is invalid. The message is one line: key, value, what is valid."""

    def __init__(self, key: str, value: Any, valid: str):
        self.key, self.value, self.valid = key, value, valid
        super().__init__(f"invalid config: {key}={value!r}: {valid}")


def first_line(e: BaseException, empty: str = "") -> str:
    """The first line of an error's message (`empty` when it has none): what a one-line error quotes of a
    library's error."""
    text = str(e).strip()
    return text.splitlines()[0] if text else empty


# --------------------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    """A Llama-style decoder; MoE when `n_experts > 0`."""

    name: str = "dense_tiny"
    vocab_size: int = 320
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 4
    ffn_dim: int = 384
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    fused_qkv: bool = True
    fused_gate_up: bool = True
    init_std: float = 0.02
    # Mixture of experts (n_experts == 0 means every layer is dense).
    n_experts: int = 0
    top_k: int = 2
    n_shared_experts: int = 0
    expert_ffn_dim: int = 0  # 0: use ffn_dim
    first_dense_layers: int = 0  # the first k layers keep a dense MLP (as in DeepSeek-V3)
    router_bias_update_rate: float = 1e-3  # auxiliary-loss-free balancing step (DeepSeek-V3, eq. 16)
    aux_loss_coef: float = 0.0  # optional Switch-style load-balancing loss; 0 disables


# --------------------------------------------------------------------------------------------------------------
# Optimizer
# --------------------------------------------------------------------------------------------------------------
@dataclass
class AdamWConfig:
    """Hyperparameters of the AdamW half (and of the whole optimizer when `algorithm=adamw`)."""

    lr: float = 3e-3
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1


@dataclass
class SplitConfig:
    """How fused weights are orthogonalized: per logical block (`split`, `per_expert`) or whole (`fused`)."""

    qkv: str = "split"  # split | fused
    gate_up: str = "split"  # split | fused
    experts: str = "per_expert"  # per_expert | fused


@dataclass
class OptimConfig:
    name: str = "muon_split"
    # What the hidden matrices get: muon, or adamw (then everything is AdamW).
    algorithm: str = "muon"
    lr: float = 0.02
    momentum: float = 0.95
    nesterov: bool = True
    weight_decay: float = 0.0
    adjust_lr: str = "spectral_norm"  # spectral_norm | rms_norm | none
    ns_steps: int = 5
    ns_schedule: str = "keller"  # keller | polar_express
    ns_method: str = "gram"  # gram | standard (the same iteration; gram is its Gram form on non-square blocks)
    ns_dtype: str = "bfloat16"  # bfloat16 | float32
    backend: str = "auto"  # auto | torch | triton
    split: SplitConfig = field(default_factory=SplitConfig)
    # Parameter roles declared by the model that go to AdamW even when algorithm=muon.
    adamw_roles: list = field(default_factory=lambda: ["embedding", "output", "norm", "bias", "router"])
    adamw: AdamWConfig = field(default_factory=AdamWConfig)
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    # The whole step as one CUDA graph (optim/cuda_graph.py): auto (where it can: one GPU, CUDA tensors) | on | off
    cuda_graph: str = "auto"


# --------------------------------------------------------------------------------------------------------------
# Mesh, data, train, logging
# --------------------------------------------------------------------------------------------------------------
@dataclass
class MeshConfig:
    """`single`: no sharding; `fsdp`: shard over all ranks; `hsdp`: replicate x shard (sizes multiply to world);
    `ep`: FSDP over all ranks, the routed experts of MoE layers spread whole over groups of `ep` ranks
    (`muon_recipes/parallel/expert_parallel.py`)."""

    name: str = "fsdp"
    kind: str = "fsdp"  # single | fsdp | hsdp | ep
    replicate: int = 1  # hsdp only; 0 = world // shard
    shard: int = 0  # 0 = all ranks (fsdp) or world // replicate (hsdp)
    ep: int = 1  # ep only: ranks one MoE layer's routed experts are spread over; must divide world and n_experts


# A byte-level BPE's smallest vocabulary: the 256 byte values and the end-of-sequence token.
MIN_BPE_VOCAB_SIZE = 257


def check_bpe_vocab_size(vocab_size: int) -> None:
    """data.tokenizer=bpe fits a vocabulary of `model.vocab_size` entries, which holds at least the byte alphabet."""
    if vocab_size < MIN_BPE_VOCAB_SIZE:
        raise ConfigError("model.vocab_size", vocab_size,
                          f"data.tokenizer=bpe needs at least {MIN_BPE_VOCAB_SIZE} entries (256 bytes + EOS)")


@dataclass
class DataConfig:
    name: str = "embedded"
    source: str = "embedded"  # embedded | files | hub
    paths: list = field(default_factory=list)  # files: local .txt/.jsonl/.json/.parquet files or globs
    text_field: str = "text"
    hub_name: str = ""  # hub: dataset name, e.g. "HuggingFaceFW/fineweb-edu"
    hub_config: str = ""
    hub_split: str = "train"
    scope: str = "stdlib"  # embedded: stdlib | site-packages
    tokenizer: str = "byte"  # byte | bpe (fitted to the corpus, model.vocab_size entries) | a local HF tokenizer dir
    bpe_sample_chars: int = 50_000_000  # bpe: characters of training documents the merges are learned from
    cache_dir: str = ""  # fitted tokenizers and tokenized corpora; "" = $MUON_RECIPES_CACHE or ~/.cache/muon-recipes
    eval_fraction: float = 0.02  # held-out share of documents (embedded/files)
    eval_docs: int = 64  # hub: first N documents of the stream are held out
    max_chars: int = 0  # embedded/files: cap on corpus characters; 0 = all
    num_proc: int = 1  # worker processes for `datasets.map` tokenization


@dataclass
class CheckpointConfig:
    every: int = 0  # steps between checkpoints; 0 disables
    keep: int = 2  # how many complete checkpoints to keep
    async_save: bool = False


@dataclass
class TrainConfig:
    recipe: str = "smoke"  # the name of the recipe (conf/recipe/) these values come from
    steps: int = 200
    tokens: int = 0  # stop after this many tokens when > 0 (whichever of steps/tokens comes first)
    seq_len: int = 128
    global_batch_tokens: int = 0  # > 0: tokens per step on any world size; micro-batch and accumulation derived
    batch_size: int = 8  # sequences per rank per micro-batch (with global_batch_tokens: the most that fit)
    grad_accum: int = 1
    lr_schedule: str = "cosine"  # cosine | wsd | constant
    warmup_steps: int = 20
    decay_fraction: float = 0.2  # wsd: share of steps in the final linear decay
    min_lr_ratio: float = 0.1
    eval_every: int = 50  # 0 disables
    eval_batches: int = 4
    log_every: int = 1
    compile: bool = False
    activation_checkpointing: bool = False
    mixed_precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    resume: str = "auto"  # auto | never | <path to a checkpoint>
    nonfinite: str = "abort"  # abort | skip
    max_skipped_steps: int = 5
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


@dataclass
class WandbConfig:
    enabled: bool = True
    mode: str = "offline"  # offline | online | disabled
    project: str = "muon-recipes"
    entity: str = ""
    group: str = ""  # empty: the experiment name (sweeps) or none
    tags: list = field(default_factory=list)
    name: str = ""  # empty: derived from the arm (model, optim, seed)


@dataclass
class LoggingConfig:
    console: bool = True
    jsonl: bool = True
    progress: bool = True
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class LauncherConfig:
    """How a job of a Hydra multirun (`python train.py -m ...`) runs; see muon_recipes/sweep.py."""

    # auto: one process per visible GPU (in-process on CPU); N: a torchrun world of N processes per job.
    nproc_per_node: Any = "auto"


@dataclass
class ExperimentConfig:
    name: str = ""
    description: str = ""


@dataclass
class RunConfig:
    """The root config composed by Hydra from conf/config.yaml."""

    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    run_dir: str = ""  # empty: Hydra's output directory


def register_configs() -> None:
    """Register the schemas so Hydra type-checks `conf/` against them."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
    cs.store(group="model", name="model_schema", node=ModelConfig)
    cs.store(group="optim", name="optim_schema", node=OptimConfig)
    cs.store(group="mesh", name="mesh_schema", node=MeshConfig)
    cs.store(group="data", name="data_schema", node=DataConfig)
    cs.store(group="train", name="train_schema", node=TrainConfig)
    cs.store(group="logging", name="logging_schema", node=LoggingConfig)
    cs.store(group="experiment", name="experiment_schema", node=ExperimentConfig)


def config_dirs(argv: list, conf_dir: str) -> Optional[list]:
    """The directories Hydra composes from: `conf_dir`, plus `--config-dir/-cd DIR` and the `file://` entries of
    `hydra.searchpath=[...]`. None when a search path names a package (`pkg://`) or `--config-path` replaces
    `conf_dir`: the options cannot be listed here, so the group check is left to Hydra."""
    dirs = [conf_dir]
    for i, arg in enumerate(argv):
        arg = str(arg)
        if arg in ("--config-path", "-cp") or arg.startswith("--config-path="):
            return None  # another primary config dir: its groups are Hydra's to check
        if arg in ("--config-dir", "-cd") and i + 1 < len(argv):
            dirs.append(str(argv[i + 1]))
        elif arg.startswith("--config-dir="):
            dirs.append(arg.split("=", 1)[1])
        elif arg.lstrip("+").startswith("hydra.searchpath="):
            for entry in arg.split("=", 1)[1].strip("[]").split(","):
                entry = entry.strip().strip("'\"")
                if entry.startswith("pkg://"):
                    return None
                if entry:
                    dirs.append(entry[len("file://"):] if entry.startswith("file://") else entry)
    return [os.path.abspath(os.path.expanduser(d)) for d in dirs]


def _command_line_overrides(argv: list) -> list:
    """The `key=value` overrides of a command line (flags and their arguments left out)."""
    overrides, skip = [], False
    for arg in map(str, argv):
        if skip:
            skip = False
        elif arg.startswith("-"):
            skip = arg in ("--config-dir", "-cd", "--config-path", "-cp", "--config-name", "-cn",
                           "--experimental-rerun", "--info", "-i")
        elif "=" in arg:
            overrides.append(arg)
    return overrides


def check_group_overrides(overrides: list, dirs: list) -> Optional[str]:
    """A one-line error for the first `group=option` override naming an option that none of `dirs` (the project's
    conf/ first, then the extra config dirs of the command line) has, or None.

    Hydra reports an unknown option over several lines (with the schema names mixed into the list of options)
    and exits with 1; this check runs first, on the command line alone, so the answer is one line naming the
    key, the value and the valid options. Comma lists of a sweep are checked item by item; sweep functions
    (`choice(...)`, `range(...)`, globs), interpolations and Hydra's own groups (`hydra/...`, whose options may
    come from installed plugins) are left to Hydra.
    """
    for override in overrides:
        key, sep, value = str(override).lstrip("+").partition("=")
        if not sep or key.startswith(("hydra", "~")) or any(c in value for c in "()*$[]{}"):
            continue
        group_dirs = [d for d in dirs if os.path.isdir(os.path.join(d, key))]
        if "." in key or not group_dirs:
            continue
        options = sorted({f[:-5] for d in group_dirs for f in os.listdir(os.path.join(d, key)) if f.endswith(".yaml")})
        for option in value.split(","):
            if option not in options and option != "null":
                where = " or ".join(f"conf/{key}/" if d == dirs[0] else f"{os.path.join(d, key)}/" for d in group_dirs)
                return f"invalid config: {key}={option!r}: must be one of {', '.join(options)} (files in {where})"
    return None


def check_value_overrides(overrides: list, dirs: Optional[list] = None) -> Optional[str]:
    """A one-line error for the first `key=value` override that the schema refuses (unknown key, a value of the
    wrong type such as `train.steps=abc` or `.nan` for an integer), or None. Each value is parsed by Hydra's own
    override grammar and set on the typed schema as Hydra would; sweep items are checked one by one. Group
    choices (a key that names a folder of one of `dirs`, or a config node) are the group check's."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    parser = OverridesParser.create()
    schema = OmegaConf.structured(RunConfig)
    for override in overrides:
        key = str(override).split("=", 1)[0].lstrip("+~")
        is_group = "." not in key and (OmegaConf.is_config(schema.get(key))
                                       or any(os.path.isdir(os.path.join(d, key)) for d in dirs or ()))
        if key.startswith("hydra") or is_group or "@" in key:
            continue  # Hydra's own keys, group choices (model=...), package overrides
        try:
            parsed = parser.parse_overrides([str(override)])[0]
        except HydraException:
            continue  # Hydra's own message says where the syntax breaks
        if parsed.is_delete() or parsed.is_add():
            continue
        if parsed.is_sweep_override():
            sweep = parsed.value()
            values = list(getattr(sweep, "list", None) or [])
            if not values:
                continue  # range(), glob(), intervals: left to Hydra
        else:
            values = [parsed.value()]
        for value in values:
            if isinstance(value, str) and "${" in value:
                continue
            try:
                OmegaConf.update(schema.copy(), key, value, merge=True)
            except OmegaConfBaseException as e:
                raw = str(override).split("=", 1)[1]
                return f"invalid config: {key}={raw}: {str(e).splitlines()[0]}"
    return None


def check_command_line(argv: list, conf_dir: str) -> Optional[str]:
    """One line for the first override of `argv` that Hydra would refuse with several, or None (torch-free: the
    entry point runs it before importing torch)."""
    overrides = _command_line_overrides(argv)
    dirs = config_dirs(argv, conf_dir)
    error = check_group_overrides(overrides, dirs) if dirs is not None else None
    return error or check_value_overrides(overrides, dirs)


# --------------------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------------------
def _choice(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(key, value, "must be one of " + ", ".join(map(str, choices)))


def _positive(key: str, value: Any, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise ConfigError(key, value, "must be a finite number " + (">= 0" if allow_zero else "> 0"))


def _int(key: str, value: Any, low: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ConfigError(key, value, f"must be an integer >= {low}")


# The largest learning rate accepted: the update adds -lr x (per-block scale) to float32 weights, and torch refuses
# a scale factor beyond float32's range (3.4e38); 1e30 leaves room for any block's scale.
MAX_LR = 1e30
# Seeds seed torch and numpy; numpy takes integers in [0, 2**32).
MAX_SEED = 2**32 - 1


def _learning_rate(key: str, value: Any) -> None:
    _positive(key, value)
    if value > MAX_LR:
        raise ConfigError(key, value, f"must be <= {MAX_LR:g} (the update lr x scale must fit in float32)")


def validate_model(m: ModelConfig, prefix: str = "model") -> None:
    for k in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
        _int(f"{prefix}.{k}", getattr(m, k))
    if m.d_model % m.n_heads:
        raise ConfigError(f"{prefix}.n_heads", m.n_heads, f"must divide model.d_model={m.d_model}")
    if (m.d_model // m.n_heads) % 2:
        raise ConfigError(f"{prefix}.n_heads", m.n_heads,
                          f"head_dim = d_model/n_heads = {m.d_model // m.n_heads} must be even for rotary embeddings")
    if m.n_kv_heads > m.n_heads or m.n_heads % m.n_kv_heads:
        raise ConfigError(f"{prefix}.n_kv_heads", m.n_kv_heads, f"must divide model.n_heads={m.n_heads}")
    _positive(f"{prefix}.rope_theta", m.rope_theta)
    _positive(f"{prefix}.norm_eps", m.norm_eps)
    _positive(f"{prefix}.init_std", m.init_std)
    _int(f"{prefix}.n_experts", m.n_experts, low=0)
    if m.n_experts:
        _int(f"{prefix}.top_k", m.top_k)
        if m.top_k > m.n_experts:
            raise ConfigError(f"{prefix}.top_k", m.top_k, f"must be <= model.n_experts={m.n_experts}")
        _int(f"{prefix}.n_shared_experts", m.n_shared_experts, low=0)
        _int(f"{prefix}.expert_ffn_dim", m.expert_ffn_dim, low=0)
        _int(f"{prefix}.first_dense_layers", m.first_dense_layers, low=0)
        if m.first_dense_layers > m.n_layers:
            raise ConfigError(f"{prefix}.first_dense_layers", m.first_dense_layers,
                              f"must be <= model.n_layers={m.n_layers}")
        _positive(f"{prefix}.router_bias_update_rate", m.router_bias_update_rate, allow_zero=True)
        _positive(f"{prefix}.aux_loss_coef", m.aux_loss_coef, allow_zero=True)


def validate_optim(o: OptimConfig, prefix: str = "optim") -> None:
    _choice(f"{prefix}.algorithm", o.algorithm, ALGORITHMS)
    _learning_rate(f"{prefix}.lr", o.lr)
    _positive(f"{prefix}.momentum", o.momentum, allow_zero=True)
    if o.momentum >= 1:
        raise ConfigError(f"{prefix}.momentum", o.momentum, "must be in [0, 1)")
    _positive(f"{prefix}.weight_decay", o.weight_decay, allow_zero=True)
    _choice(f"{prefix}.adjust_lr", o.adjust_lr, ADJUST_LR)
    _int(f"{prefix}.ns_steps", o.ns_steps)
    _choice(f"{prefix}.ns_schedule", o.ns_schedule, SCHEDULES)
    _choice(f"{prefix}.ns_method", o.ns_method, METHODS)
    _choice(f"{prefix}.ns_dtype", o.ns_dtype, NS_DTYPES)
    _choice(f"{prefix}.backend", o.backend, BACKENDS)
    _choice(f"{prefix}.split.qkv", o.split.qkv, SPLIT_MODES)
    _choice(f"{prefix}.split.gate_up", o.split.gate_up, SPLIT_MODES)
    _choice(f"{prefix}.split.experts", o.split.experts, EXPERT_MODES)
    for r in o.adamw_roles:
        _choice(f"{prefix}.adamw_roles", r, ROLES)
    _learning_rate(f"{prefix}.adamw.lr", o.adamw.lr)
    betas = list(o.adamw.betas)
    if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
        raise ConfigError(f"{prefix}.adamw.betas", betas, "must be two numbers in [0, 1)")
    _positive(f"{prefix}.adamw.eps", o.adamw.eps)
    _positive(f"{prefix}.adamw.weight_decay", o.adamw.weight_decay, allow_zero=True)
    _positive(f"{prefix}.grad_clip", o.grad_clip, allow_zero=True)
    if o.cuda_graph in (True, False, "True", "False"):
        # YAML reads a bare `on` / `off` as a boolean, which the str field then holds as "True" / "False".
        o.cuda_graph = "on" if o.cuda_graph in (True, "True") else "off"
    _choice(f"{prefix}.cuda_graph", o.cuda_graph, CUDA_GRAPH_MODES)


def validate_mesh(mesh: MeshConfig, world_size: int, prefix: str = "mesh") -> tuple[int, int]:
    """Check the mesh against the world size; return (replicate, shard)."""
    _choice(f"{prefix}.kind", mesh.kind, ("single", "fsdp", "hsdp", "ep"))
    _int(f"{prefix}.replicate", mesh.replicate, low=0)
    _int(f"{prefix}.shard", mesh.shard, low=0)
    _int(f"{prefix}.ep", mesh.ep)
    if mesh.kind != "ep" and mesh.ep != 1:
        raise ConfigError(f"{prefix}.ep", mesh.ep, f"expert parallelism needs mesh=ep (this mesh is {mesh.kind}); "
                          f"leave mesh.ep=1 or use mesh=ep")
    if mesh.kind == "ep":
        if world_size % mesh.ep:
            raise ConfigError(f"{prefix}.ep", mesh.ep, f"must divide the world size {world_size}")
        if mesh.shard not in (0, world_size):
            raise ConfigError(f"{prefix}.shard", mesh.shard, f"ep shards dense weights over all ranks: 0 or {world_size}")
        return 1, world_size
    if mesh.kind == "single":
        if world_size != 1:
            raise ConfigError(f"{prefix}.kind", mesh.kind,
                              f"single runs one process but the world size is {world_size}; use mesh=fsdp or mesh=hsdp")
        return 1, 1
    if mesh.kind == "fsdp":
        if mesh.replicate not in (0, 1):
            raise ConfigError(f"{prefix}.replicate", mesh.replicate,
                              "fsdp shards over all ranks and replicates nothing: 0 or 1; for replicas use mesh=hsdp")
        shard = mesh.shard or world_size
        if shard != world_size:
            raise ConfigError(f"{prefix}.shard", mesh.shard, f"fsdp shards over all ranks: 0 or {world_size}")
        return 1, shard
    replicate = mesh.replicate or (world_size // mesh.shard if mesh.shard else 1)
    shard = mesh.shard or (world_size // replicate if replicate else 0)
    if replicate * shard != world_size:
        raise ConfigError(f"{prefix}.replicate", f"{mesh.replicate}x{mesh.shard}",
                          f"replicate x shard must equal the world size {world_size}")
    return replicate, shard


def validate_expert_parallel(mesh: MeshConfig, model: ModelConfig, prefix: str = "mesh") -> None:
    """mesh=ep needs routed experts, and a whole number of them on every rank of an ep group."""
    if mesh.kind != "ep":
        return
    if not model.n_experts:
        raise ConfigError(f"{prefix}.ep", mesh.ep, f"expert parallelism needs an MoE model, and model={model.name} "
                          f"has no experts (model.n_experts=0); use mesh=fsdp")
    if model.n_experts % mesh.ep:
        raise ConfigError(f"{prefix}.ep", mesh.ep, f"must divide model.n_experts={model.n_experts} (every rank of "
                          f"an ep group holds n_experts/ep whole experts)")


def validate_train(t: TrainConfig, model: ModelConfig, prefix: str = "train") -> None:
    _int(f"{prefix}.steps", t.steps)
    _int(f"{prefix}.tokens", t.tokens, low=0)
    _int(f"{prefix}.seq_len", t.seq_len)
    if t.seq_len > model.max_seq_len:
        raise ConfigError(f"{prefix}.seq_len", t.seq_len, f"must be <= model.max_seq_len={model.max_seq_len}")
    _int(f"{prefix}.batch_size", t.batch_size)
    _int(f"{prefix}.grad_accum", t.grad_accum)
    _int(f"{prefix}.global_batch_tokens", t.global_batch_tokens, low=0)
    _choice(f"{prefix}.lr_schedule", t.lr_schedule, LR_SCHEDULES)
    _int(f"{prefix}.warmup_steps", t.warmup_steps, low=0)
    if not 0 <= t.decay_fraction <= 1:
        raise ConfigError(f"{prefix}.decay_fraction", t.decay_fraction, "must be in [0, 1]")
    if not 0 <= t.min_lr_ratio <= 1:
        raise ConfigError(f"{prefix}.min_lr_ratio", t.min_lr_ratio, "must be in [0, 1]")
    _int(f"{prefix}.eval_every", t.eval_every, low=0)
    _int(f"{prefix}.eval_batches", t.eval_batches)
    _int(f"{prefix}.log_every", t.log_every)
    _choice(f"{prefix}.mixed_precision", t.mixed_precision, ("auto", "bf16", "fp32"))
    _choice(f"{prefix}.nonfinite", t.nonfinite, ("abort", "skip"))
    _int(f"{prefix}.max_skipped_steps", t.max_skipped_steps)
    _int(f"{prefix}.checkpoint.every", t.checkpoint.every, low=0)
    _int(f"{prefix}.checkpoint.keep", t.checkpoint.keep)
    if not isinstance(t.resume, str) or not t.resume:
        raise ConfigError(f"{prefix}.resume", t.resume, "must be auto, never or a checkpoint path")


def validate_data(d: DataConfig, prefix: str = "data") -> None:
    _choice(f"{prefix}.source", d.source, ("embedded", "files", "hub"))
    _choice(f"{prefix}.scope", d.scope, CORPUS_SCOPES)
    if not isinstance(d.tokenizer, str) or not d.tokenizer:
        raise ConfigError(f"{prefix}.tokenizer", d.tokenizer, "must be byte, bpe or a local tokenizer directory")
    if d.tokenizer == "bpe" and d.source == "hub":
        raise ConfigError(f"{prefix}.tokenizer", d.tokenizer,
                          "bpe is fitted on a local corpus: use data=embedded or data=files, or a tokenizer directory")
    _int(f"{prefix}.bpe_sample_chars", d.bpe_sample_chars)
    if d.source == "files" and not d.paths:
        raise ConfigError(f"{prefix}.paths", list(d.paths), "data=files needs at least one file or glob")
    if d.source == "hub" and not d.hub_name:
        raise ConfigError(f"{prefix}.hub_name", d.hub_name, "data=hub needs a dataset name")
    if not 0 <= d.eval_fraction < 1:
        raise ConfigError(f"{prefix}.eval_fraction", d.eval_fraction, "must be in [0, 1)")
    _int(f"{prefix}.eval_docs", d.eval_docs, low=0)
    _int(f"{prefix}.max_chars", d.max_chars, low=0)
    _int(f"{prefix}.num_proc", d.num_proc)


def validate_logging(lg: LoggingConfig, prefix: str = "logging") -> None:
    _choice(f"{prefix}.wandb.mode", lg.wandb.mode, ("offline", "online", "disabled"))


def validate_split_policy(m: ModelConfig, o: OptimConfig) -> None:
    """A `fused` policy needs a fused weight: without one, the two arms of a split ablation are the same run."""
    if o.algorithm != "muon":
        return
    for key, fused, weight in (("qkv", m.fused_qkv, "QKV"), ("gate_up", m.fused_gate_up, "gate/up")):
        if getattr(o.split, key) == "fused" and not fused:
            raise ConfigError(f"optim.split.{key}", "fused", f"model.fused_{key}=false has no fused {weight} weight "
                                                             f"to orthogonalize whole; set model.fused_{key}=true")


def validate_launcher(lc: LauncherConfig, prefix: str = "launcher") -> None:
    n = lc.nproc_per_node
    if n != "auto" and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
        raise ConfigError(f"{prefix}.nproc_per_node", n, "must be auto or an integer >= 1")


def derive_batch(t: TrainConfig, world_size: int) -> tuple[int, int]:
    """(per-rank micro-batch in sequences, gradient accumulation steps) for `world_size` data-parallel ranks.

    With `train.global_batch_tokens` > 0 the optimization is fixed in tokens per step, whatever the world size:
    G tokens are G / seq_len sequences, split evenly over the ranks; each rank runs micro-batches of at most
    `train.batch_size` sequences (what fits one device), as many as its share needs. So one recipe takes the same
    steps on 1, 2 or 8 GPUs. With 0, `batch_size` and `grad_accum` are taken as given (per rank).
    """
    if t.global_batch_tokens == 0:
        return t.batch_size, t.grad_accum
    key = "train.global_batch_tokens"
    if t.grad_accum != 1:
        raise ConfigError("train.grad_accum", t.grad_accum,
                          f"is derived when {key}={t.global_batch_tokens} > 0: leave it at 1, or set {key}=0")
    if t.global_batch_tokens % t.seq_len:
        raise ConfigError(key, t.global_batch_tokens, f"must be a multiple of train.seq_len={t.seq_len}")
    sequences = t.global_batch_tokens // t.seq_len
    if sequences % world_size:
        raise ConfigError(key, t.global_batch_tokens, f"its {sequences} sequences of {t.seq_len} tokens do not split "
                          f"evenly over {world_size} ranks; use a multiple of {world_size * t.seq_len} tokens")
    per_rank = sequences // world_size
    micro = min(t.batch_size, per_rank)
    if per_rank % micro:
        fits = [d for d in range(micro, 0, -1) if per_rank % d == 0][0]
        raise ConfigError("train.batch_size", t.batch_size,
                          f"the micro-batch must divide the {per_rank} sequences per rank ({key}="
                          f"{t.global_batch_tokens} = {sequences} x {t.seq_len} tokens over {world_size} ranks); "
                          f"the largest that does is {fits}")
    return micro, per_rank // micro


def validate(cfg: RunConfig, world_size: int) -> tuple[int, int]:
    """Validate the whole run config; return the mesh's (replicate, shard) sizes."""
    _choice("device", cfg.device, ("auto", "cpu", "cuda"))
    if not isinstance(cfg.seed, int) or isinstance(cfg.seed, bool) or not 0 <= cfg.seed <= MAX_SEED:
        raise ConfigError("seed", cfg.seed, f"must be an integer in [0, {MAX_SEED}] (numpy's seed range)")
    validate_model(cfg.model)
    validate_optim(cfg.optim)
    # Not config keys but part of the run's setup: how the Newton-Schulz kernels search their tiles and time and keep
    # their plans, whether the step runs its passes on a second CUDA stream (choices.ENV_CHOICES).
    for name, default, valid in ENV_CHOICES:
        _choice(name, os.environ.get(name, default), valid)
    for name in STREAM_PRIORITY_ENVS:
        priority = os.environ.get(name, "0")
        if not is_stream_priority(priority):
            raise ConfigError(name, priority, "must be 0 or a negative integer (a CUDA stream priority)")
    per_sm = os.environ.get(SIDE_PROGRAMS_ENV, "0")
    if not per_sm.isdigit():
        raise ConfigError(SIDE_PROGRAMS_ENV, per_sm, "must be 0 (one program per block) or a positive integer")
    validate_split_policy(cfg.model, cfg.optim)
    validate_data(cfg.data)
    if cfg.data.tokenizer == "bpe":
        check_bpe_vocab_size(cfg.model.vocab_size)
    validate_train(cfg.train, cfg.model)
    derive_batch(cfg.train, world_size)
    validate_logging(cfg.logging)
    validate_launcher(cfg.launcher)
    if cfg.optim.cuda_graph == "on" and world_size > 1:
        raise ConfigError("optim.cuda_graph", "on", f"the step is captured on one process only, this world has "
                          f"{world_size} (the sharded step's collectives stay eager); use auto or off")
    if cfg.optim.cuda_graph == "on" and cfg.device == "cpu":
        raise ConfigError("optim.cuda_graph", "on", "CUDA graphs need device=cuda or auto on a GPU; use auto or off")
    sizes = validate_mesh(cfg.mesh, world_size)
    validate_expert_parallel(cfg.mesh, cfg.model)
    return sizes


def to_dataclass(cfg: Any) -> RunConfig:
    """Turn a composed DictConfig (or a dict) into a RunConfig, with one-line errors for unknown keys."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        schema = OmegaConf.structured(RunConfig)
        merged = OmegaConf.merge(schema, cfg)
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        msg = str(e).splitlines()[0]
        raise ConfigError(key, getattr(e, "value", None), msg) from None


def compose(overrides: list, conf_dir: str) -> RunConfig:
    """The RunConfig that `train.py <overrides>` would run, composed with Hydra from `conf_dir` outside a Hydra app
    (recipes that build what a run builds). Not validated: `validate` (or `train.entry.prepare`) does that."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir), version_base=None):
        return to_dataclass(hydra_compose("config", overrides=list(overrides)))


def load_option(path: Any, group: str) -> Any:
    """One option file of a config group (`conf/<group>/<name>.yaml`) as its typed dataclass, without composing the
    whole run config (benchmarks and tests that need one model's or one optimizer's settings). Hydra's `defaults`
    list in the file (a model's recipe) selects other configs; it is not one of the group's values."""
    from omegaconf import OmegaConf

    raw = OmegaConf.load(path)
    raw.pop("defaults", None)
    return getattr(to_dataclass({group: raw}), group)
