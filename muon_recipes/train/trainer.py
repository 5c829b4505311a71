"""The training loop: build everything from a validated `RunConfig`, then step, evaluate, log.

Order of start-up (`entry.run`): config validated (before any process group) -> process group + mesh ->
model built whole on the device with the run's seed, then sharded with FSDP2 (so the initial weights are the same
for every world size) -> optimizer from the model's declared parameter layouts -> data -> resume -> loop.

What a checkpoint must hold for a resumed run to repeat the straight run's losses bit for bit is listed in
`checkpoint_extras` (counters, LR schedule, data position, RNG states); model and optimizer go through DCP
(`checkpoint.py`). Non-finite loss or gradients are caught the step they appear, before the optimizer or the
LR schedule moves (`train.nonfinite`).
"""

from __future__ import annotations

import math
import time
from typing import Optional

import torch
import torch.nn.functional as F
from torch.optim.lr_scheduler import LambdaLR
from torch.profiler import record_function

from muon_recipes.config import RunConfig
from muon_recipes.train.schedules import lr_multiplier
from muon_recipes.parallel.distributed import DistributedContext, all_reduce_mean, all_reduce_sum
from muon_recipes.parallel.fsdp import resharding_frees_memory
from muon_recipes.train.loggers import Loggers, token_count
from muon_recipes.train.metrics import Stopwatch, bits_per_byte, device_peak_flops, peak_memory_gib


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in nats, computed in float32 whatever the logits' dtype.

    Eager, `logits.float()` materializes a float32 copy of the `[B, T, V]` logits and the log-softmax another (with
    a 32k vocabulary and 32 x 1024 tokens, 4 GiB each, and as much again in the backward): memory traffic that takes
    a tenth of a moe_small step on a GPU. Compiled (`Trainer`, with `train.compile` on a GPU), the upcast, the
    log-sum-exp and the gradient are fused kernels that read the bf16 logits and keep float32 in registers."""
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))


class NonFiniteError(RuntimeError):
    """Loss, gradient norm or parameters are NaN/inf and the policy says stop."""


def rng_state(device: torch.device) -> dict:
    """This process's torch RNG states as plain lists of byte values (JSON, no pickle)."""
    state = {"cpu": torch.get_rng_state().tolist()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device).tolist()
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(torch.tensor(state["cpu"], dtype=torch.uint8))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8), device)


def _grad_norm_and_clip(params: list, max_norm: float) -> torch.Tensor:
    """Global L2 grad norm over all (DTensor or plain) grads; clips in place when max_norm > 0.

    `clip_grad_norm_` reduces DTensor norms over their mesh (sharded and replicated dims alike), so the norm is
    the one of the full unsharded gradient on every rank. DTensor ops cannot mix meshes: under expert parallelism
    (experts on their own mesh next to the FSDP one) each mesh's norm is reduced on its own, then combined.
    """
    grads = [p for p in params if p.grad is not None]
    meshes = []  # in parameter order, the same on every rank (a set's order follows per-process string hashes)
    for p in grads:
        if getattr(p.grad, "device_mesh", None) not in meshes:
            meshes.append(getattr(p.grad, "device_mesh", None))
    if len(meshes) > 1:
        from muon_recipes.optim.muon import local

        norms = [torch.nn.utils.get_total_norm([p.grad for p in grads if getattr(p.grad, "device_mesh", None) == m],
                                               foreach=True) for m in meshes]
        norm = torch.linalg.vector_norm(torch.stack([n.full_tensor() if hasattr(n, "full_tensor") else n
                                                     for n in norms]))
        if max_norm > 0:  # torch.nn.utils.clip_grads_with_norm_, on the local shards
            torch._foreach_mul_([local(p.grad) for p in grads], (max_norm / (norm + 1e-6)).clamp(max=1.0))
        return norm
    norm = torch.nn.utils.clip_grad_norm_(grads, max_norm if max_norm > 0 else float("inf"), foreach=True)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return norm


class Trainer:
    def __init__(self, cfg: RunConfig, ctx: DistributedContext, run_dir: str, model, optimizer, tokenizer,
                 train_loader, eval_dataset, loggers: Optional[Loggers], checkpointer=None,
                 config_dict: Optional[dict] = None):
        self.cfg, self.ctx, self.run_dir = cfg, ctx, run_dir
        self.checkpointer = checkpointer  # a checkpoint.Checkpointer, or None (no saving)
        self.config_dict = config_dict or {}  # the resolved config, stored with each checkpoint
        self.model, self.optimizer, self.tokenizer = model, optimizer, tokenizer
        self.train_loader, self.eval_dataset, self.loggers = train_loader, eval_dataset, loggers
        t = cfg.train
        self.scheduler = LambdaLR(optimizer, lambda step: lr_multiplier(
            step, total_steps=t.steps, schedule=t.lr_schedule, warmup_steps=t.warmup_steps,
            min_lr_ratio=t.min_lr_ratio, decay_fraction=t.decay_fraction))
        self.step = 0
        self.tokens_seen = 0
        self.skipped_in_a_row = 0
        self.skipped_total = 0
        self.wall_time_offset = 0.0  # seconds trained before the checkpoint this run resumed from
        self.wandb_run_id: Optional[str] = None  # stored in checkpoints so a resumed run logs to the same run
        self.tokens_per_step = ctx.dp_world_size * t.batch_size * t.grad_accum * t.seq_len
        # An empty held-out split (data.eval_fraction=0, or a corpus too small for one eval window) turns
        # periodic evaluation off, said once here rather than failing at the first eval step mid-run.
        self.can_evaluate = eval_dataset is not None and len(eval_dataset) > 0
        if t.eval_every and not self.can_evaluate and ctx.is_main:
            print(f"note: train.eval_every={t.eval_every} but the held-out split holds no window of "
                  f"{t.seq_len + 1} tokens (data.eval_fraction={cfg.data.eval_fraction}): no evaluation",
                  flush=True)
        from muon_recipes.models.flops import flops_per_token

        self.flops_per_token = flops_per_token(cfg.model, t.seq_len)
        self.peak_flops, self.peak_source = device_peak_flops(ctx.device)
        self.params = [p for p in model.parameters()]
        from muon_recipes.data.tokenizer import token_byte_lengths

        # UTF-8 bytes per token id (on the CPU, where the loader's batches are): bits per byte of every loss.
        self.byte_lengths = torch.from_numpy(token_byte_lengths(tokenizer)) if tokenizer is not None else None
        self.autocast = (ctx.mesh is None and ctx.device.type == "cuda" and self._bf16())
        self.cross_entropy = cross_entropy
        if t.compile and ctx.device.type == "cuda":
            self.cross_entropy = torch.compile(cross_entropy, dynamic=False)
        self.history: list[dict] = []  # logged metrics, for callers that run the trainer in-process
        self.first_optimizer_step = True
        self.launch_time: Optional[float] = None  # perf_counter() when the run started
        self.time_to_first_step_s: Optional[float] = None

    def budget_tokens(self) -> int:
        """Tokens the whole run trains on: `train.steps` steps, or `train.tokens` if that comes first."""
        t = self.cfg.train
        total = t.steps * self.tokens_per_step
        return min(total, -(-t.tokens // self.tokens_per_step) * self.tokens_per_step) if t.tokens else total

    def describe_budget(self) -> str:
        """The start-up line about the batch the recipe asked for and what this world size makes of it, and the
        token budget against the data (a budget over one epoch repeats windows: said here, before training)."""
        t, world = self.cfg.train, self.ctx.dp_world_size
        sequences = self.tokens_per_step // t.seq_len
        line = (f"recipe {t.recipe} | batch {self.tokens_per_step:,} tokens/step = {sequences} x {t.seq_len} = "
                f"{world} rank{'s' if world > 1 else ''} x micro-batch {t.batch_size} x {t.grad_accum} accumulation "
                f"step{'s' if t.grad_accum > 1 else ''} | budget {token_count(self.budget_tokens())} tokens")
        rows = getattr(self.train_loader, "num_rows", None)
        if rows:
            epoch_tokens = rows * t.seq_len
            epochs = self.budget_tokens() / epoch_tokens
            line += f" = {epochs:.2f} epochs of {token_count(epoch_tokens)} training tokens"
            if epochs > 1:
                line += " (repeats data: lower train.steps or use a larger corpus, e.g. data.scope=site-packages)"
        return line

    def _bf16(self) -> bool:
        mp = self.cfg.train.mixed_precision
        return mp == "bf16" or (mp == "auto" and self.ctx.device.type == "cuda")

    # ---------------------------------------------------------------------------------------------------------
    def _forward_loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(self.ctx.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            out = self.model(inputs)
        return self.cross_entropy(out.logits, targets), out.aux_loss

    def _start_micro_batch(self, last: bool) -> None:
        """FSDP2's settings for the next micro-batch: gradients are reduced only after the last one (the others
        accumulate unsharded). Where resharding frees nothing (`fsdp.resharding_frees_memory`: one shard) the
        parameters also stay gathered until the last backward."""
        if not hasattr(self.model, "set_requires_gradient_sync"):
            return
        self.model.set_requires_gradient_sync(last)
        if not resharding_frees_memory(self.ctx.mesh):
            self.model.set_reshard_after_backward(last)

    def _to_device(self, batch: torch.Tensor) -> torch.Tensor:
        """A CPU batch on the device without holding up the host. A copy from pageable memory is staged by the
        driver through its own pinned buffer, and a batch larger than that buffer waits for the transfers queued
        before it (a wait on the GPU); from pinned memory the copy is one asynchronous transfer in stream order.
        The pinned block comes from torch's caching host allocator, which reuses it only after the copy has run.
        (At moe_small's 2 x 256 KiB per micro-batch the pageable copies did not wait on an H200: each call took
        under 0.1 ms. The step's saving came from keeping parameters gathered, `_start_micro_batch`.)"""
        if self.ctx.device.type != "cuda":
            return batch.to(self.ctx.device)
        return batch.pin_memory().to(self.ctx.device, non_blocking=True)

    def _update_router_biases(self) -> Optional[list]:
        if not self.cfg.model.n_experts:
            return None
        counts = self.model.expert_load_counts()
        if not counts:
            return None
        with record_function("trainer.router_bias_update"):
            # Every rank must apply the same bias update (biases are replicated buffers): sum the loads first.
            stacked = all_reduce_sum(torch.stack([c.float() for c in counts]))
            self.model.update_router_biases(list(stacked.unbind(0)))
        return stacked

    def train_step(self, profile: bool) -> dict:
        cfg, t = self.cfg, self.cfg.train
        watch = Stopwatch(self.ctx.device, enabled=profile)
        self.model.train()
        loss_sum = torch.zeros((), device=self.ctx.device)
        aux_sum = torch.zeros((), device=self.ctx.device)
        target_bytes = 0
        for micro in range(t.grad_accum):
            inputs, targets = next(self.train_loader)
            target_bytes += self._text_bytes(targets)
            inputs, targets = self._to_device(inputs), self._to_device(targets)
            self._start_micro_batch(last=micro == t.grad_accum - 1)
            loss, aux = self._forward_loss(inputs, targets)
            ((loss + aux) / t.grad_accum).backward()
            loss_sum += loss.detach()
            aux_sum += aux.detach()
        with record_function("trainer.grad_norm"):  # named ranges: a profile attributes their kernels (profiling.py)
            grad_norm = _grad_norm_and_clip(self.params, cfg.optim.grad_clip)
        forward_backward_s = watch.lap()
        # One collective and one device-to-host transfer per step, before the optimizer: what the host needs to
        # skip a non-finite step and what it logs. Nothing after the optimizer waits for the device, so its
        # kernels run while the host prepares the next step.
        means = self._means_over_ranks([loss_sum / t.grad_accum, aux_sum / t.grad_accum], target_bytes)
        loss_mean, aux_mean, bytes_mean, grad_norm = torch.cat([means, grad_norm.reshape(1).float()]).tolist()
        lr = self.optimizer.param_groups[0]["lr"]
        if not (math.isfinite(loss_mean) and math.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            for moe in getattr(self.model, "moe_layers", lambda: ())():
                moe.load_counts.zero_()  # the dropped step's expert loads must not steer the router biases
            self._on_nonfinite(loss_mean, grad_norm)
            return {"skipped": True}
        self.skipped_in_a_row = 0
        if hasattr(self.optimizer, "profile"):
            self.optimizer.profile = profile
        with record_function("trainer.optimizer_step"):
            if self.first_optimizer_step:
                self._first_optimizer_step()
            else:
                self.optimizer.step()
        # The optimizer's own time, comparable with recipes/bench_optimizer.py: the lr schedule, the gradients'
        # release and the MoE router-bias update (a collective and a few small kernels) come after the mark.
        optim_s = watch.lap()
        with record_function("trainer.after_optimizer"):
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
        loads = self._update_router_biases()
        metrics = {"loss": loss_mean, "lr": lr, "grad_norm": grad_norm,
                   "forward_backward_s": forward_backward_s, "optim_time_s": optim_s}
        bpb = bits_per_byte(loss_mean, t.grad_accum * t.batch_size * t.seq_len, bytes_mean)
        if bpb is not None:
            metrics["bpb"] = bpb
        if cfg.model.n_experts:
            metrics["aux_loss"] = aux_mean
        timings = getattr(self.optimizer, "last_step_timings", None)
        if profile and timings:
            for k, v in timings.items():
                metrics[f"optim_{k}_s"] = v
        if loads is not None and profile:
            # Max/mean load per MoE layer: 1.0 is perfectly balanced.
            frac = loads / loads.sum(-1, keepdim=True).clamp_min(1)
            imbalance = (frac.max(-1).values * frac.size(-1)).tolist()
            metrics["expert_load_max_over_mean"] = max(imbalance)
            for i, v in enumerate(imbalance):
                metrics[f"expert_load/layer{i}"] = v
        return metrics

    def _first_optimizer_step(self) -> None:
        """The process's first optimizer step, timed and said in one line: on a GPU it chooses the Newton-Schulz
        kernels' tiles for every new problem shape (compiling and timing a bounded set of candidates, or reading
        earlier choices from Triton's disk cache) and times each shape's plan of products (or reads an earlier
        process's, `plan_store`), which can take seconds before any training is seen; the line says how many choices
        were searched or read, how many binaries were built, the seconds of each part, and how many plans were
        timed or read."""
        self.first_optimizer_step = False
        accounting = _kernel_choices() if self.ctx.device.type == "cuda" else None
        if accounting:
            tile_search, plan_store = accounting
            tiles_before, plans_before = tile_search.progress(), plan_store.snapshot()
        watch = Stopwatch(self.ctx.device)
        self.optimizer.step()
        seconds = watch.lap()
        if accounting and self.ctx.is_main:
            print(f"optimizer: first step {seconds:.2f} s; Newton-Schulz kernel tiles: "
                  f"{tile_search.describe(tiles_before, tile_search.progress())}; "
                  f"{plan_store.describe(plans_before, plan_store.snapshot())}", flush=True)

    def _on_nonfinite(self, loss: float, grad_norm: float) -> None:
        t = self.cfg.train
        where = f"step {self.step + 1}: loss={loss} grad_norm={grad_norm}"
        if t.nonfinite == "abort":
            raise NonFiniteError(f"non-finite {where}; stopped before the optimizer step (train.nonfinite=abort); "
                                 f"no checkpoint is written from this state")
        self.skipped_in_a_row += 1
        self.skipped_total += 1
        if self.ctx.is_main:
            print(f"skipping non-finite {where} ({self.skipped_in_a_row} in a row)", flush=True)
        if self.skipped_in_a_row >= t.max_skipped_steps:
            raise NonFiniteError(f"non-finite loss/gradients in {self.skipped_in_a_row} steps in a row "
                                 f"(train.max_skipped_steps={t.max_skipped_steps}); last at {where}")

    def _text_bytes(self, targets: torch.Tensor) -> int:
        """UTF-8 bytes of text that a CPU batch of target ids stands for."""
        return int(self.byte_lengths[targets].sum()) if self.byte_lengths is not None else 0

    def _means_over_ranks(self, values: list, target_bytes: int) -> torch.Tensor:
        """This rank's device scalars `values` (the loss first) and the text bytes its targets stand for, each
        averaged over the ranks in one collective, as one device tensor (no host sync: `torch.full` passes the byte
        count as a kernel argument, where `torch.tensor(..., device=)` would be a blocking copy). With equal tokens
        per rank, the bits per byte of the whole batch follow from the loss and byte means."""
        return all_reduce_mean(torch.stack([*values, torch.full((), float(target_bytes), device=self.ctx.device)]))

    @torch.no_grad()
    def evaluate(self) -> dict:
        """{"eval_loss": nats per token, "eval_bpb": bits per byte} on the first `train.eval_batches` batches of the
        held-out split (the same windows at every evaluation)."""
        from muon_recipes.data import DistributedLoader

        t = self.cfg.train
        self.model.eval()
        loader = DistributedLoader(self.eval_dataset, batch_size=t.batch_size, rank=self.ctx.dp_rank,
                                   world_size=self.ctx.dp_world_size, seed=0, shuffle=False)
        total = torch.zeros((), device=self.ctx.device)
        target_bytes = 0
        for _ in range(t.eval_batches):
            inputs, targets = next(loader)
            target_bytes += self._text_bytes(targets)
            loss, _ = self._forward_loss(self._to_device(inputs), self._to_device(targets))
            total += loss
        # MoE layers count expert load only in training mode, so evaluation never moves the router biases.
        self.model.train()
        loss_mean, bytes_mean = self._means_over_ranks([total / t.eval_batches], target_bytes).tolist()
        result = {"eval_loss": loss_mean}
        bpb = bits_per_byte(loss_mean, t.eval_batches * t.batch_size * t.seq_len, bytes_mean)
        if bpb is not None:
            result["eval_bpb"] = bpb
        return result

    def done(self) -> bool:
        t = self.cfg.train
        return self.step >= t.steps or (t.tokens > 0 and self.tokens_seen >= t.tokens)

    def fit(self) -> list[dict]:
        t = self.cfg.train
        progress = None
        if self.ctx.is_main and self.cfg.logging.progress and not self.cfg.logging.console:
            progress = _progress_bar(t.steps, self.step)
        try:
            self._loop(progress)
        except NonFiniteError:
            if self.checkpointer is not None:
                self.checkpointer.finish()  # a pending asynchronous save holds an earlier, finite state
            raise
        finally:
            if progress is not None:
                progress.close()
        if self.checkpointer is not None:
            self.checkpointer.finish()
        return self.history

    def _loop(self, progress) -> None:
        t = self.cfg.train
        window_start, window_tokens = time.perf_counter(), 0
        while not self.done():
            log_now = (self.step + 1) % t.log_every == 0 or self.step == 0 or self.step + 1 == t.steps
            step_start = time.perf_counter()
            metrics = self.train_step(profile=log_now)
            if metrics.get("skipped"):
                continue
            self.step += 1
            self.tokens_seen += self.tokens_per_step
            window_tokens += self.tokens_per_step
            if progress is not None:
                progress.update(1)
            eval_now = t.eval_every and self.can_evaluate and (self.step % t.eval_every == 0 or self.done())
            if eval_now:
                metrics.update(self.evaluate())
            if log_now or eval_now:
                now = time.perf_counter()
                elapsed = now - window_start
                tokens_per_s = window_tokens / elapsed
                tokens_left = max(self.budget_tokens() - self.tokens_seen, 0)
                metrics.update(step=self.step, tokens=self.tokens_seen, step_time_s=now - step_start,
                               tokens_per_s=tokens_per_s, wall_time_s=self._wall_time(now),
                               skipped_steps=self.skipped_total, tokens_left=tokens_left,
                               eta_s=tokens_left / tokens_per_s)
                if self.launch_time is not None and self.time_to_first_step_s is None:
                    # Start-up through the end of the first step: data, model, compilation, kernel tuning.
                    self.time_to_first_step_s = now - self.launch_time
                    metrics["time_to_first_step_s"] = self.time_to_first_step_s
                if self.peak_flops:
                    metrics["mfu"] = self.flops_per_token * tokens_per_s / (self.peak_flops * self.ctx.world_size)
                mem = peak_memory_gib(self.ctx.device)
                if mem is not None:
                    metrics["peak_mem_gib"] = mem
                if self.ctx.is_main:
                    self.loggers.log(metrics)
                self.history.append(metrics)
                window_start, window_tokens = time.perf_counter(), 0
            if self.checkpointer is not None and self.checkpointer.due(self.step, final=self.done()):
                self.save_checkpoint()
                window_start, window_tokens = time.perf_counter(), 0  # saving is not training throughput

    start_time: float = 0.0

    def _wall_time(self, now: float) -> float:
        return self.wall_time_offset + now - self.start_time

    # ---------------------------------------------------------------------------------------------------------
    # Checkpoints
    # ---------------------------------------------------------------------------------------------------------
    def checkpoint_extras(self) -> tuple[dict, dict]:
        """Everything besides model and optimizer that the next step depends on, as plain JSON data:
        (the run's, this rank's). The data position is global (the loader counts rows of all ranks), so any
        world size can continue from it; RNG states are per rank."""
        scheduler = {k: v for k, v in self.scheduler.state_dict().items() if k != "lr_lambdas"}
        extras = {"step": self.step, "tokens_seen": self.tokens_seen, "skipped_total": self.skipped_total,
                  "skipped_in_a_row": self.skipped_in_a_row, "scheduler": scheduler,
                  "loader": self.train_loader.state_dict(), "wandb_run_id": self.wandb_run_id,
                  "wall_time_s": self._wall_time(time.perf_counter())}
        rank_extras = {"rng": rng_state(self.ctx.device), "loader": self.train_loader.state_dict()}
        return extras, rank_extras

    def load_checkpoint_extras(self, extras: dict, rank_extras: Optional[dict], saved_world_size: int) -> None:
        """Restore what `checkpoint_extras` saved. The LR schedule continues at the saved step with this run's base
        learning rates (unchanged config: exactly the saved ones)."""
        from muon_recipes.config import ConfigError
        from muon_recipes.data.loader import StreamingLoader

        self.step, self.tokens_seen = int(extras["step"]), int(extras["tokens_seen"])
        self.skipped_total = int(extras.get("skipped_total", 0))
        self.skipped_in_a_row = int(extras.get("skipped_in_a_row", 0))
        self.wall_time_offset = float(extras.get("wall_time_s", 0.0))
        self.wandb_run_id = extras.get("wandb_run_id")
        self.scheduler.load_state_dict(dict(extras["scheduler"], lr_lambdas=[None] * len(self.optimizer.param_groups)))
        self.scheduler.base_lrs = [g["initial_lr"] for g in self.optimizer.param_groups]
        for group, base, fn in zip(self.optimizer.param_groups, self.scheduler.base_lrs, self.scheduler.lr_lambdas):
            group["lr"] = base * fn(self.scheduler.last_epoch)  # as LambdaLR.get_lr computes it
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]
        if isinstance(self.train_loader, StreamingLoader):
            # A stream's position is per rank and its split depends on the world size.
            if saved_world_size != self.ctx.world_size or rank_extras is None:
                raise ConfigError("data.source", self.cfg.data.source,
                                  f"a streamed dataset resumes only on the world size it was saved with "
                                  f"({saved_world_size}, this run {self.ctx.world_size})")
            self.train_loader.load_state_dict(rank_extras["loader"])
        else:
            self.train_loader.load_state_dict(extras["loader"])
        if rank_extras is not None:
            set_rng_state(rank_extras["rng"], self.ctx.device)

    def _parameters_finite(self) -> bool:
        from muon_recipes.optim.muon import local

        flags = [torch.isfinite(local(p.detach())).all() for p in self.params]
        bad = (~torch.stack(flags)).sum().float() if flags else torch.zeros((), device=self.ctx.device)
        return float(all_reduce_sum(bad)) == 0  # one host sync, whatever the number of parameters

    def save_checkpoint(self) -> None:
        """Save the state after step `self.step` -- never a non-finite one (the check costs one pass over the
        local shards, small next to writing them)."""
        if not self._parameters_finite():
            raise NonFiniteError(f"non-finite parameters after step {self.step} (the losses and gradients were "
                                 f"finite); no checkpoint is written from this state")
        extras, rank_extras = self.checkpoint_extras()
        self.checkpointer.save(self.step, self.model, self.optimizer, extras, rank_extras, self.config_dict)


def _kernel_choices():
    """The Newton-Schulz kernels' accounting of their tile searches and plans (`optim/kernels/tile_search.py`,
    `plan_store.py`), or None where Triton is not in use."""
    from muon_recipes.optim.dispatch import triton_available

    if not triton_available():
        return None
    from muon_recipes.optim.kernels import plan_store, tile_search

    return tile_search, plan_store


def _progress_bar(total: int, initial: int):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm ships with datasets
        return None
    return tqdm(total=total, initial=initial, desc="train", unit="step")
